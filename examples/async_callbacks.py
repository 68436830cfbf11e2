"""The async API: requests return a request number at once; results arrive in callbacks.

Run with a manager on the embedded default (``infinibrain-manager`` in another shell).
"""
import threading
import time

import numpy as np

from infinibrain import AICluster, ContainerConfig

N = 50
done = threading.Event()
results = {}


def on_inference(code, message, result, response):
    """Runs on the SDK's callback thread for every infer_image_async."""
    results[response.request_no] = (code, message or result["shape"])
    if len(results) == N:
        done.set()


def on_manage(code, message, cmd, result):
    """Management outcomes, keepalive (112/113) and container loss (114)."""
    print(f"[manage] {cmd}: code={code} {message or result}")


cluster = AICluster()
cluster.set_callback(infer_callback=on_inference, manage_callback=on_manage)
loaded = threading.Event()
cluster.load_inference_async(
    ContainerConfig(name="loop", implementation_type="Loop", input="Main", output="Main", max_send_num=4),
    "local",
    func=lambda code, message, cmd, handler: (print(f"[load] code={code} {handler or message}"), loaded.set()),
)
loaded.wait(30)

start = time.perf_counter()
numbers = [cluster.infer_image_async("loop", np.zeros((224, 224, 3), np.uint8), {"i": i}) for i in range(N)]
done.wait(30)
elapsed = time.perf_counter() - start
ok = sum(1 for code, _ in results.values() if code == 0)
print(f"{ok}/{N} answered in {elapsed * 1000:.1f} ms ({N / elapsed:.0f} requests/s); request numbers {numbers[0]}..{numbers[-1]}")
cluster.get_container_status_async("loop")  # goes to on_manage
time.sleep(0.5)
cluster.unload_inference("loop")
cluster.release()
