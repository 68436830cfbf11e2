"""Small ONNX models made with the onnx package, for the tests of the built-in runner, and
PP-OCR's real networks from the rapidocr-onnxruntime wheel (examples/models/ppocr.py)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

WEIGHTS = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
BIAS = np.array([1.0, -1.0, 0.5], dtype=np.float32)


def affine(path: Path) -> Path:
    """y = x @ WEIGHTS + BIAS, x float32 [N, 4] (the batch open), y float32 [N, 3]."""
    from onnx import TensorProto, helper, numpy_helper, save

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(WEIGHTS, "w"), numpy_helper.from_array(BIAS, "b")],
    )
    save(_model(graph), str(path))
    return path


def channel_mean(path: Path, size: int = 8) -> Path:
    """The mean of each channel of one RGB image: float32 [1, 3, size, size] -> [1, 3], all fixed."""
    from onnx import TensorProto, helper, save

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["image"], ["mean"], axes=[2, 3], keepdims=0)],
        "channel_mean",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("mean", TensorProto.FLOAT, [1, 3])],
    )
    save(_model(graph, opset=17), str(path))
    return path


def identity(path: Path) -> Path:
    """y = x, float32 [N, 2]: containers/runtime-onnx/selftest.onnx, the images' build check."""
    from onnx import TensorProto, helper, save

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "selftest",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])])
    save(_model(graph), str(path))
    return path


def _model(graph, opset: int = 17):
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8  # readable by every ONNX Runtime the extra allows
    return model


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def in_process(path: Path, feed: dict) -> list[np.ndarray]:
    """The model's outputs from ONNX Runtime in this process: what the cluster must match."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
