"""The built-in runner: an inference's model files served with no code.

``python -m infinibrain.containers.runner`` is what a container runs when its
``inference_modules`` name a ``model`` and no ``script``, and it has no ``run_command``
(manager/settings.py, ``InferenceSettings.runner_modules``). The manager describes the
modules in ``INFINIBRAIN_MODELS`` (JSON: a list of {"sub", "model", "hooks",
"providers", "threads"}; paths relative to the working folder, where the inference's
files are) and how many model containers share this machine in
``INFINIBRAIN_MODEL_PEERS``: unless a module sets ``threads``, ONNX Runtime's intra-op
threads are the cores this process may use divided among them (and among this
container's modules), so that replicas on one machine add throughput instead of
fighting over every core.

Every model is loaded and warmed up before any module connects, so a container counts as
ready only once each can answer at once; one that does not load ends the program with
its reason, which fails the deployment with 302 (the manager shows the log's last lines).
Then one worker thread per module, each with its own Connector and Model; a batch of
requests runs as one call when the model's first dimension is open (model.py).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
from typing import Any

from .connector import Connector, _batch_default
from .model import CPU, Hooks, Model, ModelLoadError, provider_name

log = logging.getLogger("infinibrain.runner")

EXIT_LOAD_FAILED = 3


def module_specs(env: dict[str, str]) -> list[dict]:
    try:
        specs = json.loads(env.get("INFINIBRAIN_MODELS") or "[]")
    except ValueError as exc:
        raise ModelLoadError(f"INFINIBRAIN_MODELS is not JSON: {exc}") from None
    if not isinstance(specs, list) or not specs or not all(isinstance(s, dict) and s.get("sub") and s.get("model") for s in specs):
        raise ModelLoadError("INFINIBRAIN_MODELS names no module with a model: the manager starts this runner for inference_modules with a model and no script")
    return specs


def default_threads(env: dict[str, str], modules: int) -> int:
    """Intra-op threads per model: this process's cores shared among the model containers
    on this machine and this container's modules; at least one."""
    try:
        peers = max(int(env.get("INFINIBRAIN_MODEL_PEERS") or 1), 1)
    except ValueError:
        peers = 1
    return max(len(os.sched_getaffinity(0)) // (peers * max(modules, 1)), 1)


def load(spec: dict, threads: int | None, env: dict[str, str]) -> tuple[Model, bool]:
    """The module's model, warmed up, and whether it takes batches."""
    model = Model(spec["model"], providers=spec.get("providers"), threads=spec.get("threads") or threads,
                  hooks=Hooks(spec.get("hooks")))
    why = model.warm_up()
    batches, because = batching(model, spec, env)
    log.info("module %s: %s loaded (inputs %s; intra-op threads %s; %s: %s)%s", spec["sub"], spec["model"],
             model.describe_inputs(), model.threads or "ONNX Runtime's default",
             "batches" if batches else "one request per run", because, f"; {why}" if why else "")
    return model, batches


def batching(model: Model, spec: dict, env: dict[str, str]) -> tuple[bool, str]:
    """Whether the runner asks for batches, and why (docs/DECISIONS.md, "Models"): a model
    whose first dimension is open batches when max_batch_size was set; else when a run of
    several costs each request at most 80% of a run of its own (timed at load when the
    other dimensions are fixed), or, when they are open, on an accelerator's provider
    (on the CPU a batch of large inputs measured slower per request: benchmarks/bench_models.py)."""
    if not model.batchable:
        return False, "its first dimension is fixed"
    size = _batch_default(env.get("INFINIBRAIN_MAX_BATCH_SIZE"))
    if size < 2:
        return False, "max_batch_size is 1"
    if env.get("INFINIBRAIN_MODEL_BATCH") == "fixed":
        return True, f"max_batch_size {size} was set"
    gain = model.batch_gain(size)
    if gain is not None:
        return gain <= 0.8, f"a request in a run of {size} costs x{gain:.2f} of one alone"
    name = provider_name(model.providers[0])
    return name != CPU, f"open dimensions, provider {name}"


def serve(connector: Connector, model: Model, batches: bool) -> None:
    """Answer the module's requests until the program ends (the worker thread's loop)."""
    while True:
        if batches:
            items = connector.receive_request_image_batch()
        else:
            items = [connector.receive_request_image()]
        results = answer(model, items)
        if len(items) == 1:
            connector.send_response(results[0], items[0][2])
        else:
            connector.send_response_batch(results, [response for _, _, response in items])


def answer(model: Model, items: list[tuple[Any, dict, Any]]) -> list[Any]:
    """One result per request: its outputs, or the exception that ends it (a request the
    model refuses ends alone; the others run)."""
    results: list[Any] = [None] * len(items)
    feeds, batched, ran = [], [], []
    for i, (data, param, response) in enumerate(items):
        sent_array = bool(response.metadata_sys.get("arr"))  # infer_image; else infer's bytes
        try:
            feed, had_batch = model.feed(data, param, image=sent_array)
        except Exception as exc:  # 100 for data the model cannot take; a preprocess hook's own failure (999)
            results[i] = exc
            continue
        feeds.append(feed)
        batched.append(had_batch)
        ran.append(i)
    if feeds:
        try:
            outputs = model.run(feeds)
        except Exception as exc:
            outputs = [exc] * len(feeds)  # type: ignore[list-item]
        for i, out, had_batch in zip(ran, outputs, batched):
            if isinstance(out, BaseException):
                results[i] = out
                continue
            try:
                results[i] = model.answer(out, had_batch, items[i][1])
            except Exception as exc:  # the postprocess hook's own failure
                results[i] = exc
    return results


def check(path: str) -> int:
    """``--check MODEL``: whether MODEL loads and runs here (an image's build check, or a
    user's question before deploying); says what it takes and gives."""
    try:
        model = Model(path)
        why = model.warm_up()
    except ModelLoadError as exc:
        print(f"infinibrain runner: {exc}", file=sys.stderr)
        return EXIT_LOAD_FAILED
    print(f"{path}: takes {model.describe_inputs()}; gives {', '.join(t.describe() for t in model.outputs)}; "
          f"{'batches' if model.batchable else 'one request per run'}{f'; {why}' if why else ''}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--check":
        return check(argv[1])
    if argv:
        print("usage: python -m infinibrain.containers.runner [--check MODEL.onnx]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s runner %(levelname)s %(message)s")
    env = dict(os.environ)
    try:
        specs = module_specs(env)
        threads = default_threads(env, len(specs))
        models = [load(spec, threads, env) for spec in specs]
    except ModelLoadError as exc:
        print(f"infinibrain runner: {exc}", file=sys.stderr, flush=True)
        return EXIT_LOAD_FAILED
    failed = threading.Event()

    def worker(spec: dict, model: Model, batches: bool) -> None:
        try:
            serve(Connector(sub_name=spec["sub"]), model, batches)
        except BaseException:
            log.exception("module %s stopped", spec["sub"])
            failed.set()

    for spec, (model, batches) in zip(specs, models):
        threading.Thread(target=worker, args=(spec, model, batches), name=f"module-{spec['sub']}", daemon=True).start()
    failed.wait()
    return 1


if __name__ == "__main__":
    sys.exit(main())
