"""A small colour classifier: colour-histogram features and a softmax layer, in numpy.

Shared by the weight generator (which trains it on generated images) and by the inference
script that runs in the container. No downloads: the training data are made here.
"""
from __future__ import annotations

import numpy as np

CLASSES = ["red", "green", "blue", "gray"]
BINS = 8


def features(image: np.ndarray) -> np.ndarray:
    """Per-channel colour histograms (8 bins each) plus channel means and spreads."""
    pixels = image.reshape(-1, image.shape[-1])[:, :3].astype(np.float32)
    hist = [np.histogram(pixels[:, c], bins=BINS, range=(0, 256))[0] for c in range(3)]
    hist = np.concatenate(hist).astype(np.float32) / len(pixels)
    mean = pixels.mean(axis=0) / 255.0
    spread = pixels.std(axis=0) / 128.0
    return np.concatenate([hist, mean, spread, [1.0]]).astype(np.float32)


def predict(weights: np.ndarray, image: np.ndarray) -> tuple[str, list[float]]:
    logits = features(image) @ weights
    scores = np.exp(logits - logits.max())
    scores /= scores.sum()
    return CLASSES[int(scores.argmax())], [round(float(s), 4) for s in scores]


def synthetic_image(label: str, rng: np.random.Generator, size: tuple[int, int] = (224, 224)) -> np.ndarray:
    """A noisy image whose dominant colour is ``label`` ("gray": no dominant colour)."""
    base = rng.integers(40, 120, size=3)
    if label != "gray":
        base[CLASSES.index(label)] = rng.integers(170, 250)
    else:
        base[:] = rng.integers(60, 200)
    noise = rng.normal(0, 25, size=(*size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def train(samples_per_class: int = 60, epochs: int = 300, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X, y = [], []
    for k, label in enumerate(CLASSES):
        for _ in range(samples_per_class):
            X.append(features(synthetic_image(label, rng, (32, 32))))
            y.append(k)
    X, y = np.stack(X), np.array(y)
    onehot = np.eye(len(CLASSES))[y]
    W = np.zeros((X.shape[1], len(CLASSES)), np.float32)
    for _ in range(epochs):  # plain gradient descent on the softmax cross-entropy
        logits = X @ W
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        W -= 2.0 * X.T @ (p - onehot) / len(X)
    return W
