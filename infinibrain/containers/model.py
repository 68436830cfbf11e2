"""A model file served with no code: its ONNX Runtime session, what it takes and gives,
and how a request's data becomes its input and its outputs the request's answer.

The built-in runner (runner.py) holds one ``Model`` per module; ``Model`` is used by that
module's worker thread alone. Everything but the session is pure.

What a request may send (docs/DECISIONS.md, "Models"):
- ``infer_image(array)``: an array of the model's input dtype and shape, with or without
  the batch dimension (dimensions the model leaves open take any size);
- ``infer(bytes)``: an encoded image (PNG, JPEG, ... decoded with Pillow) when the input
  looks like an image (NCHW or NHWC with 1 or 3 channels): resized to the model's fixed
  height and width, scaled to 0..1 for a float input;
- with a ``preprocess`` hook, whatever the hook takes.
Anything else is refused with 100 naming the model's inputs. The answer is a dict of
output name → array, with the batch dimension when the request had one.
"""
from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import InfinibrainException, argument_error

# ONNX Runtime's tensor types and the numpy dtypes that carry them.
ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(uint16)": np.uint16, "tensor(int16)": np.int16,
    "tensor(uint32)": np.uint32, "tensor(int32)": np.int32, "tensor(uint64)": np.uint64, "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


CPU = "CPUExecutionProvider"  # the default provider


def provider_name(provider: Any) -> str:
    """A provider's name: the providers setting has names and [name, {options}] pairs."""
    return provider if isinstance(provider, str) else provider[0]


class ModelLoadError(Exception):
    """The model file cannot be served (the runner exits with it: the deployment fails with 302)."""


@dataclass(frozen=True)
class Tensor:
    """One input or output as the model declares it: dims None where they are open."""

    name: str
    dtype: Any  # a numpy dtype, or None for a type numpy cannot carry
    dims: tuple[int | None, ...]

    @property
    def batched(self) -> bool:
        """Whether its first dimension is open: requests can be stacked along it."""
        return bool(self.dims) and self.dims[0] is None

    def describe(self) -> str:
        dtype = np.dtype(self.dtype).name if self.dtype is not None else "?"
        return f"{self.name!r} {dtype} [{', '.join('N' if d is None else str(d) for d in self.dims)}]"

    @property
    def image_layout(self) -> str | None:
        """"NCHW" or "NHWC" when it looks like a batch of images (1 or 3 channels), else None."""
        if len(self.dims) != 4:
            return None
        if self.dims[1] in (1, 3):
            return "NCHW"
        if self.dims[3] in (1, 3):
            return "NHWC"
        return None


def _tensor(arg: Any) -> Tensor:
    dims = tuple(d if isinstance(d, int) and d >= 0 else None for d in (arg.shape or ()))
    return Tensor(arg.name, ORT_DTYPES.get(arg.type), dims)


class Hooks:
    """The optional functions of a module's hooks file (a plain Python file, not a loop):
    ``setup(session)`` once, with the ONNX Runtime session, before the warm-up (to read
    the model's metadata, say); ``preprocess(data, param)`` returns the model's input (an
    array, or a dict of them by input name) from a request's data (an image array from
    infer_image, bytes from infer); ``postprocess(outputs, param)`` returns the answer
    from the dict of output arrays. Both see the same ``param`` dict of one request, so
    preprocess may leave notes there for postprocess (a scale, the original size)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.setup: Callable | None = None
        self.preprocess: Callable | None = None
        self.postprocess: Callable | None = None
        if not path:
            return
        namespace: dict[str, Any] = {"__file__": path, "__name__": "infinibrain_hooks"}
        try:
            with open(path, encoding="utf-8") as fh:
                code = compile(fh.read(), path, "exec")
            exec(code, namespace)  # noqa: S102 - the user's own hooks file, as a script would run
        except Exception as exc:
            raise ModelLoadError(f"hooks file {path!r} cannot be loaded: {type(exc).__name__}: {exc}") from None
        self.setup = namespace.get("setup")
        self.preprocess = namespace.get("preprocess")
        self.postprocess = namespace.get("postprocess")
        if self.preprocess is None and self.postprocess is None:
            raise ModelLoadError(f"hooks file {path!r} defines neither preprocess(data, param) nor postprocess(outputs, param)")


class Model:
    """An ONNX model file's session and the rules of its requests."""

    def __init__(self, path: str, providers: list | None = None, threads: int | None = None,
                 hooks: Hooks | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelLoadError(f"ONNX Runtime is not installed here ({exc}): use an image with it "
                                 "(infinibrain/runtime-onnx) or `pip install infinibrain[onnx]` on the board") from None
        if not os.path.isfile(path):
            raise ModelLoadError(f"model file {path!r} is not in the container (script_path or a copy entry brings it)")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        wanted = providers or [CPU]
        offered = ort.get_available_providers()
        missing = [provider_name(p) for p in wanted if provider_name(p) not in offered]
        if missing:
            raise ModelLoadError(f"execution provider {missing[0]} is not in this ONNX Runtime (it has: {', '.join(offered)})")
        try:
            self.session = ort.InferenceSession(path, options, providers=[tuple(p) if isinstance(p, list) else p for p in wanted])
        except Exception as exc:
            raise ModelLoadError(f"model file {path!r} cannot be loaded by ONNX Runtime: {exc}") from None
        self.path = path
        self.providers = wanted
        self.threads = threads
        self.hooks = hooks or Hooks(None)
        if self.hooks.setup is not None:
            try:
                self.hooks.setup(self.session)
            except Exception as exc:
                raise ModelLoadError(f"hooks file {self.hooks.path!r}: setup(session) failed: {type(exc).__name__}: {exc}") from None
        self.inputs = [_tensor(a) for a in self.session.get_inputs()]
        self.outputs = [_tensor(a) for a in self.session.get_outputs()]
        self.output_names = [t.name for t in self.outputs]

    # ---- what it takes ---------------------------------------------------------------------

    @property
    def batchable(self) -> bool:
        """Whether requests can be stacked into one run: every input and output has an open first dimension."""
        return all(t.batched for t in self.inputs) and all(t.batched for t in self.outputs)

    def batch_gain(self, size: int) -> float | None:
        """What a request costs in a run of ``size`` against a run of its own (below 1:
        batches pay), timed on zeros; None when an input has open dimensions besides the
        batch (zeros of a made-up size would say nothing about the requests to come)."""
        if not self.batchable or any(None in t.dims[1:] for t in self.inputs):
            return None

        def timed(rows: int) -> float:
            feed = {t.name: np.zeros((rows, *(d or 1 for d in t.dims[1:])), dtype=np.dtype(t.dtype or np.float32))
                    for t in self.inputs}
            times = []
            for _ in range(3):
                start = time.perf_counter()
                self.session.run(self.output_names, feed)
                times.append(time.perf_counter() - start)
            return sorted(times)[1]

        timed(size)  # its first run at this size sets things up
        return timed(size) / size / max(timed(1), 1e-9)

    def describe_inputs(self) -> str:
        return ", ".join(t.describe() for t in self.inputs)

    def _refuse(self, why: str) -> InfinibrainException:
        return argument_error("data", f"{why}; model {os.path.basename(self.path)} takes {self.describe_inputs()}")

    def feed(self, data: Any, param: dict, image: bool) -> tuple[dict[str, np.ndarray], bool]:
        """The session's feed for one request, and whether the request had the batch
        dimension (its answer keeps it). 100 for data that does not fit."""
        if self.hooks.preprocess is not None:
            made = self.hooks.preprocess(data, param)
            return self._fit_all(made if isinstance(made, dict) else {self.inputs[0].name: made})
        if len(self.inputs) != 1:
            raise self._refuse("this model has several inputs: give the module a preprocess hook that returns a dict of them")
        if image:
            return self._fit_all({self.inputs[0].name: data})
        return self._fit_all({self.inputs[0].name: self.decode(bytes(data))})

    def _fit_all(self, arrays: dict[str, Any]) -> tuple[dict[str, np.ndarray], bool]:
        feed, had_batch = {}, set()
        for t in self.inputs:
            if t.name not in arrays:
                raise self._refuse(f"input {t.name!r} is missing")
            array, batched = self._fit(t, np.asarray(arrays[t.name]))
            feed[t.name] = array
            had_batch.add(batched)
        return feed, had_batch == {True}

    def _fit(self, t: Tensor, array: np.ndarray) -> tuple[np.ndarray, bool]:
        if t.dtype is not None and array.dtype != t.dtype:
            raise self._refuse(f"input {t.name!r} is {np.dtype(t.dtype).name}, not {array.dtype.name}")
        batched = array.ndim == len(t.dims)
        if not batched:
            if array.ndim != len(t.dims) - 1:
                raise self._refuse(f"input {t.name!r} has {len(t.dims)} dimensions (or {len(t.dims) - 1} without the batch), not {array.ndim}")
            array = array[np.newaxis]
        for axis, (want, have) in enumerate(zip(t.dims, array.shape)):
            if want is not None and want != have and not (axis == 0 and not batched):
                raise self._refuse(f"input {t.name!r} shape {list(array.shape)} differs in dimension {axis}")
        return array, batched

    def decode(self, data: bytes) -> np.ndarray:
        """An encoded image as the model's single image input (without the batch dimension)."""
        t = self.inputs[0]
        layout = t.image_layout
        if layout is None:
            raise self._refuse("infer() sends bytes, and this input is not an image: send an array with infer_image()")
        try:
            from PIL import Image
        except ImportError:
            raise self._refuse("decoding an image needs Pillow in the container (pip install infinibrain[onnx])") from None
        channels = int((t.dims[1] if layout == "NCHW" else t.dims[3]) or 3)
        height, width = (t.dims[2], t.dims[3]) if layout == "NCHW" else (t.dims[1], t.dims[2])
        try:
            picture: Any = Image.open(io.BytesIO(data))
            picture = picture.convert("L" if channels == 1 else "RGB")
            if height is not None and width is not None and picture.size != (width, height):
                picture = picture.resize((width, height), getattr(Image, "Resampling", Image).BILINEAR)  # Pillow < 9.1 too
        except Exception as exc:
            raise self._refuse(f"the bytes are not an image Pillow can decode ({exc})") from None
        pixels = np.asarray(picture).reshape(picture.size[1], picture.size[0], channels)
        if layout == "NCHW":
            pixels = pixels.transpose(2, 0, 1)
        dtype = np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.uint8)
        if dtype.kind == "f":
            return np.ascontiguousarray(pixels, dtype=dtype) / dtype.type(255)
        return np.ascontiguousarray(pixels, dtype=dtype)

    # ---- running ------------------------------------------------------------------------

    def run(self, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Each feed's outputs: in one run when they stack (same shapes but the first
        dimension), else one run each."""
        if len(feeds) > 1 and self.batchable and _stackable(feeds):
            rows = [len(next(iter(f.values()))) for f in feeds]
            stacked = {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}
            outputs = self.session.run(self.output_names, stacked)
            if all(len(o) == sum(rows) for o in outputs):
                cuts = np.cumsum(rows)[:-1]
                parts = [np.split(o, cuts) for o in outputs]
                return [dict(zip(self.output_names, (p[i] for p in parts))) for i in range(len(feeds))]
        return [dict(zip(self.output_names, self.session.run(self.output_names, f))) for f in feeds]

    def answer(self, outputs: dict[str, np.ndarray], batched: bool, param: dict) -> Any:
        """What the caller receives for one request."""
        if not batched:
            outputs = {k: v[0] if v.ndim and len(v) == 1 else v for k, v in outputs.items()}
        if self.hooks.postprocess is not None:
            return self.hooks.postprocess(outputs, param)
        return outputs

    def warm_up(self) -> str | None:
        """One run on zeros of the inputs' shapes (open dimensions: 1 for the batch, 32
        for the others), so the first request does not pay for the session's set-up.
        A model whose every dimension is fixed must run on them (ModelLoadError); with
        open ones the zeros may not suit it (a reason is returned, to be logged)."""
        feed = {t.name: np.zeros(tuple(d if d is not None else (1 if i == 0 else 32) for i, d in enumerate(t.dims)),
                                 dtype=t.dtype or np.float32) for t in self.inputs}
        try:
            self.session.run(self.output_names, feed)
        except Exception as exc:
            if all(None not in t.dims for t in self.inputs):
                raise ModelLoadError(f"model file {self.path!r} fails on zeros of its input shape: {exc}") from None
            return f"warm-up on zeros skipped ({exc})"
        return None


def _stackable(feeds: list[dict[str, np.ndarray]]) -> bool:
    first = feeds[0]
    return all(f.keys() == first.keys() and all(f[k].shape[1:] == first[k].shape[1:] for k in f) for f in feeds[1:])
