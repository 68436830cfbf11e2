"""Generate the example classifier's weights (trained here on generated images; nothing is downloaded)."""
import os
import sys

import numpy as np

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "classifier")
sys.path.insert(0, HERE)

from model import CLASSES, predict, synthetic_image, train  # noqa: E402


def main() -> None:
    path = os.path.join(HERE, "weights.npz")
    W = train()
    rng = np.random.default_rng(1)
    tests = [(label, synthetic_image(label, rng, (64, 64))) for label in CLASSES for _ in range(10)]
    accuracy = np.mean([predict(W, img)[0] == label for label, img in tests])
    np.savez(path, W=W)
    print(f"wrote {path} ({W.shape[0]}x{W.shape[1]}), accuracy on fresh generated images: {accuracy:.0%}")


if __name__ == "__main__":
    main()
