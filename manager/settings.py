"""Typed, frozen settings of an inference, and the policy the manager applies to them.

``InferenceSettings`` is one ContainerConfig as the manager keeps it: checked by
manager/validate.py, stored in the registry as ``to_dict()``, never changed in place (a
change of settings is a new object and a new revision). ``InferencePolicy`` is what the
router and the reconciler apply: every setting with its default filled in from the
manager's configuration (``resolve``). The defaults are here and in
``config.ManagerConfig``, nowhere else.

Pure: any thread.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass
from typing import Any

from infinibrain.protocol import DEFAULT_MAX_BATCH_SIZE

from .config import ManagerConfig

# Attributes that came after the first registry files: left out of ``to_dict`` while they
# hold their default, so that the files (and the settings hash of Docker containers made
# from them) of inferences that do not use them stay as they were.
ADDITIVE = {"max_queue_size": None, "retries": 0}

# Requests per run the built-in model runner may be sent when max_batch_size is not set.
RUNNER_MAX_BATCH_SIZE = 8
# What a container runs to serve its model files with no script (and no run_command).
RUNNER_COMMAND = ("python3", "-m", "infinibrain.containers.runner")


@dataclass(frozen=True)
class InferenceSettings:
    """A ContainerConfig (reference §7.1, then ours), validated. Field order is the wire's."""

    name: str
    implementation_type: str = "docker"
    input: str | None = None
    output: str | None = None
    send_timeout: int | None = None  # ms; None: the manager's default_send_timeout_ms
    wait_queue_timeout: int | None = None  # ms; None: default_wait_queue_timeout_ms
    force_update: bool = False
    max_send_num: int | None = None  # None: default_max_send_num
    script_path: str | None = None
    inference_modules: Any = None  # a module dict, or a list of them (validate._modules)
    image_path: str | None = None
    image_filename: str | None = None
    image_tag: str | None = None
    run_command: str | None = None
    run_option: str | None = None
    copy: Any = None  # a {"From", "To"} dict or a list of them
    # Ours, after the reference's sixteen.
    warmup: dict | None = None  # {"file", "param", "sub_inference_name"}
    ready_timeout: int | None = None  # ms; None: container_start_timeout_ms
    max_batch_size: int | None = None  # None: no batching (1)
    max_queue_delay: int | None = None  # ms
    max_queue_size: int | None = None  # None: the manager's send_queue_size
    retries: int = 0  # times a request whose container went away is sent to another

    @classmethod
    def from_dict(cls, data: dict) -> "InferenceSettings":
        """Settings from their stored form (already checked: validate.normalize_config)."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    def to_dict(self) -> dict:
        """The stored and wire form (plain values; additive attributes only when set)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key, default in ADDITIVE.items():
            if out[key] == default:
                del out[key]
        return out

    def replace(self, **changes: Any) -> "InferenceSettings":
        return dataclasses.replace(self, **changes)

    @property
    def modules(self) -> list[dict]:
        return one_or_many(self.inference_modules)

    @functools.cached_property
    def module_tags(self) -> dict[str, dict]:
        """Each module's ``model_tag``/``script_tag`` that are set (every answer's
        metadata_sys: worked out once per settings object, not per answer)."""
        return {m["sub_inference_name"]: {k: m[k] for k in ("model_tag", "script_tag") if m.get(k)} for m in self.modules}

    @property
    def module_names(self) -> list[str]:
        """The modules a request may name (the inference's name when it has none)."""
        return [m["sub_inference_name"] for m in self.modules] or [self.name]

    @property
    def default_sub(self) -> str:
        """The module a request goes to when its param names none: the first one."""
        return self.module_names[0]

    @property
    def runner_modules(self) -> list[dict]:
        """The modules the built-in model runner serves (infinibrain/containers/runner.py):
        all that name a model, when none names a script and there is no run_command."""
        modules = self.modules
        if self.run_command or any(m.get("script") for m in modules):
            return []
        return [m for m in modules if m.get("model")]

    @property
    def takes_input(self) -> bool:
        return self.input is not None

    @property
    def replies(self) -> bool:
        return self.output is not None

    @property
    def copies(self) -> list[dict]:
        return one_or_many(self.copy)

    @property
    def image_file(self) -> str | None:
        """The ``docker save`` tar these settings name (image_path joined with image_filename), if any."""
        if not self.image_filename and not self.image_path:
            return None
        return os.path.join(self.image_path or "", self.image_filename or "")


@dataclass(frozen=True)
class InferencePolicy:
    """What the manager applies to an inference: its settings with every default filled in."""

    send_timeout: float  # s a request may wait to be sent
    answer_timeout: float  # s its answer may take once sent (inf: no limit)
    max_send_num: int  # requests (batches, for a batching container) in flight per container
    max_batch_size: int  # requests per message to a container that takes batches (1: none)
    batch_delay: float  # s a short batch may be held back for more
    max_queue_size: int  # requests waiting to be sent; beyond it 305
    retries: int  # times a request whose container went away is sent to another
    ready_timeout: float  # s a new container has to become ready

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 1


def one_or_many(value: Any) -> list:
    """An attribute the reference lets be one item or a list of them, as a list (None: [])."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def resolve(settings: InferenceSettings, manager: ManagerConfig) -> InferencePolicy:
    """The policy of ``settings`` under ``manager``'s defaults."""
    answer_ms = settings.wait_queue_timeout or manager.default_wait_queue_timeout_ms
    return InferencePolicy(
        send_timeout=(settings.send_timeout or manager.default_send_timeout_ms) / 1000,
        # 0 in the manager's configuration: no limit on the answer (a container that goes
        # away still ends the request with 402; the client's liveness check still holds).
        answer_timeout=answer_ms / 1000 if answer_ms else math.inf,
        max_send_num=settings.max_send_num or manager.default_max_send_num,
        # The runner asks for batches only when its model's first dimension is open.
        max_batch_size=settings.max_batch_size or (RUNNER_MAX_BATCH_SIZE if settings.runner_modules else DEFAULT_MAX_BATCH_SIZE),
        batch_delay=(settings.max_queue_delay or 0) / 1000,
        max_queue_size=settings.max_queue_size or manager.send_queue_size,
        retries=settings.retries,
        ready_timeout=(settings.ready_timeout or manager.container_start_timeout_ms) / 1000,
    )


def runner_environment(settings: InferenceSettings, peers: int) -> dict[str, str]:
    """What the built-in model runner of ``settings`` reads from its environment: its
    modules, and how many model containers share its host (``peers``, this one included;
    the runner divides the cores it sees among them for ONNX Runtime's intra-op threads)."""
    under_workdir = settings.implementation_type == "process"  # there every path is under its folder

    def path(name: str) -> str:
        return name.lstrip("/") if under_workdir else name

    modules = []
    for m in settings.runner_modules:
        files = one_or_many(m["model"])
        model = next((f for f in files if f.endswith(".onnx")), files[0])
        spec = {"sub": m["sub_inference_name"], "model": path(model)}
        if m.get("hooks"):
            spec["hooks"] = path(m["hooks"])
        spec.update({k: m[k] for k in ("providers", "threads") if m.get(k)})
        modules.append(spec)
    return {"INFINIBRAIN_MODELS": json.dumps(modules), "INFINIBRAIN_MODEL_PEERS": str(max(peers, 1)),
            # max_batch_size set: the runner batches at that size; else it decides (runner.batching)
            "INFINIBRAIN_MODEL_BATCH": "fixed" if settings.max_batch_size else "auto"}
