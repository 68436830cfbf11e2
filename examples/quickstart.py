"""Quick start: deploy the example classifier to the local board and classify a few images.

Needs a manager running with the embedded default (``infinibrain-manager``), and the
classifier's weights (``python examples/models/make_weights.py``); ``make demo`` does both.
"""
import os
import sys
import time

import numpy as np

from infinibrain import AICluster, ContainerConfig, InferenceModulesConfig

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_DIR = os.path.join(HERE, "models", "classifier")
sys.path.insert(0, MODEL_DIR)
from model import CLASSES, synthetic_image  # noqa: E402  (only to make test images)


def main() -> int:
    if not os.path.exists(os.path.join(MODEL_DIR, "weights.npz")):
        print("no weights yet: run python examples/models/make_weights.py", file=sys.stderr)
        return 1
    cluster = AICluster()  # the manager on this host, 127.0.0.1:5570
    config = ContainerConfig(
        name="classifier",
        implementation_type="process",
        input="Main",
        output="Main",
        max_send_num=2,
        script_path=MODEL_DIR,
        inference_modules=InferenceModulesConfig(sub_inference_name="classify", script="classify.py", model="weights.npz"),
        run_command="python classify.py",
    )
    started = time.perf_counter()
    handler = cluster.load_inference(config, "local")
    print(f"deployed {handler.name} as {handler.suffix_name} on {handler.allocated_coprocessor} "
          f"in {time.perf_counter() - started:.2f} s")

    rng = np.random.default_rng(42)
    correct = 0
    for i, label in enumerate(CLASSES * 2):
        image = synthetic_image(label, rng)
        t0 = time.perf_counter()
        result = cluster.infer_image("classifier", image, '{"frame": %d}' % i)
        latency_ms = (time.perf_counter() - t0) * 1000
        correct += result["label"] == label
        print(f"image {i}: {image.shape} {label:>5} -> {result['label']:>5} "
              f"scores={result['scores']}  latency {latency_ms:.2f} ms")
    print(f"{correct}/{len(CLASSES) * 2} correct")

    status = cluster.get_container_status("classifier")[0]
    print(f"container {status.suffix_name}: {status.status}, {status.connect_status}, cpu {status.cpu_proc}, "
          f"mem {status.mem_usage}, net {status.net_io}")
    cluster.unload_inference("classifier")
    cluster.release()
    return 0 if correct == len(CLASSES) * 2 else 1


if __name__ == "__main__":
    sys.exit(main())
