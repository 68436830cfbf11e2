"""The data classes of the reference (chapter 7), with their wire form.

Attribute names, order and defaults are the reference's. Each class converts to a plain
dict (``to_dict``) and back (``from_dict``, which ignores keys it does not know so that
an older SDK can read a newer manager's answers).

Pure data: any thread.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union

T = TypeVar("T", bound="_Wire")

FileSpec = Union[dict, list]


class _Wire:
    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any] | None) -> T:
        data = data or {}
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})


def _plain(value: Any) -> Any:
    if isinstance(value, _Wire):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass
class InferenceModulesConfig(_Wire):
    """Scripts and models run by requests (§7.9).

    A module with a ``model`` (an ``.onnx`` file among the inference's files) and no
    ``script`` is served by the built-in runner on ONNX Runtime when the container has no
    ``run_command`` (docs/DEPLOYMENT.md, "Models"). Beyond the reference, for that runner:
    ``hooks``, a ``.py`` file of ``preprocess(data, param)`` / ``postprocess(outputs,
    param)`` functions called around the model; ``providers``, ONNX Runtime's execution
    providers in order (names, or ``[name, {option: value}]``; default CPU); ``threads``,
    its intra-op threads (default: the board's cores shared among the model containers on
    its host).
    """

    sub_inference_name: str = ""
    script_tag: str | None = None
    model_tag: str | None = None
    script: str | list[str] | None = None
    model: str | list[str] | None = None
    hooks: str | None = None
    providers: list | None = None
    threads: int | None = None


def modules_from_wire(value: Any) -> InferenceModulesConfig | list[InferenceModulesConfig] | None:
    if value is None or isinstance(value, InferenceModulesConfig):
        return value
    if isinstance(value, dict):
        return InferenceModulesConfig.from_dict(value)
    if isinstance(value, list):
        return [m if isinstance(m, InferenceModulesConfig) else InferenceModulesConfig.from_dict(m) for m in value]
    return value


@dataclass
class ContainerConfig(_Wire):
    """What the application fills in to register an inference container (§7.1).

    ``inference_modules`` may also be a list of InferenceModulesConfig: one container then
    serves several modules, chosen per request by ``param["sub_inference_name"]``.

    Beyond the reference, after its sixteen attributes (code written to it never sets them):
    ``warmup``, a sample input on the main board (a ``.npy`` file is sent as an image,
    anything else as bytes), or ``{"file": ..., "param": {...}, "sub_inference_name": ...}``:
    each new container must answer it before it receives requests; ``ready_timeout``
    (ms; None = the manager's ``container_start_timeout_ms``): a container not ready by
    then has failed its deployment.

    Dynamic batching (opt-in): ``max_batch_size`` (2 or more) lets the manager send up to
    that many waiting requests in one message to a container whose program receives them
    with ``Connector.receive_request_batch``/``receive_request_image_batch``; each
    request still gets its own result. ``max_send_num`` then counts batches.
    ``max_queue_delay`` (ms, default 0) holds a short batch back for up to that long while
    more requests may come (0: send what is waiting at once).

    Routing (docs/DECISIONS.md, "Routing"): ``max_queue_size`` bounds the requests waiting
    to be sent (None: the manager's ``send_queue_size``); one more is refused at once with
    305, whose exception's ``retry_after`` says when to come back. ``retries`` (default 0):
    how many times a request whose container went away before answering is sent to
    another container of the inference, within its deadline, instead of ending with 402
    (for models that are safe to run twice).
    """

    name: str | None = None
    implementation_type: str = "docker"
    input: str | None = None
    output: str | None = None
    send_timeout: int | None = None
    wait_queue_timeout: int | None = None
    force_update: bool = False
    max_send_num: int | None = None
    script_path: str | None = None
    inference_modules: InferenceModulesConfig | list[InferenceModulesConfig] | None = None
    image_path: str | None = None
    image_filename: str | None = None
    image_tag: str | None = None
    run_command: str | None = None
    run_option: str | None = None
    copy: FileSpec | None = None
    warmup: str | dict | None = None
    ready_timeout: int | None = None
    max_batch_size: int | None = None
    max_queue_delay: int | None = None
    max_queue_size: int | None = None
    retries: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "ContainerConfig":
        obj = super().from_dict(data)
        obj.inference_modules = modules_from_wire(obj.inference_modules)
        return obj


@dataclass
class InferenceResponse(_Wire):
    """Option information of one inference request and its result (§7.2).

    ``metadata`` is the request's ``param``; ``metadata_sys`` holds where it ran (board,
    container, module); ``time_stamp`` and ``elapsed_time`` are lists of
    ``[stage, seconds]`` pairs (wall clock, and durations between stages).
    """

    pid: int = 0
    tid: int = 0
    request_no: str = ""
    inference_name: str = ""
    metadata: dict = field(default_factory=dict)
    metadata_sys: dict = field(default_factory=dict)
    sub_inference_name: str = ""
    time_stamp: list = field(default_factory=list)
    elapsed_time: list = field(default_factory=list)


@dataclass
class CoprocessorImages(_Wire):
    """One board's images (§7.4)."""

    name: str = ""
    ip: str = ""
    images: list = field(default_factory=list)


@dataclass
class ContainerStatus(_Wire):
    """A container's state and settings (§7.6)."""

    name: str = ""
    suffix_name: str = ""
    cpu_proc: str = ""
    mem_usage: str = ""
    mem_proc: str = ""
    net_io: str = ""
    block_io: str = ""
    created: str = ""
    status: str = ""
    ports: str = ""
    connect_status: str = ""
    operate: str = "Unknown"
    queue_num: int = 0
    send_data_num: int = 0
    allocated_coprocessor: str = ""
    host_location: list = field(default_factory=list)
    implementation_type: str = ""
    input: str | None = None
    output: str | None = None
    send_timeout: int | None = None
    wait_queue_timeout: int | None = None
    max_send_num: int | None = None
    script_path: str | None = None
    inference_modules: Any = None
    image_path: str | None = None
    image_file: str | None = None
    image_tag: str | None = None
    run_command: str | None = None
    run_option: str | None = None
    copy: FileSpec | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "ContainerStatus":
        obj = super().from_dict(data)
        obj.inference_modules = modules_from_wire(obj.inference_modules)
        return obj


@dataclass
class QueueInfo(_Wire):
    """One request waiting in a send-wait queue (§7.7); ``priority`` (ours, after the
    reference's four) is the one it was sent with. get_queue_info lists a queue in the
    order it sends its requests."""

    request_no: int = 0
    inference_name: str = ""
    pid: int = 0
    mng_queue_in: str = ""
    priority: int = 0


@dataclass
class ContainerDistributionStatus(_Wire):
    """Whether requests are distributed to a container (§7.8). ``name`` is a str."""

    name: str = ""
    suffix_name: str = ""
    distribution: str = "on"


# The keys put_file's file_info may have (the reference leaves them open; docs/DECISIONS.md).
FILE_INFO_KEYS = ("script", "model", "file", "To")

# Attributes of ContainerHandler (§7.5), shared with the manager's container records.
CONTAINER_HANDLER_FIELDS = (
    "name",
    "suffix_name",
    "image_path",
    "image_file",
    "image_tag",
    "run_command",
    "run_option",
    "allocated_coprocessor",
    "max_send_num",
    "host_location",
    "implementation_type",
    "input",
    "output",
    "send_timeout",
    "wait_queue_timeout",
    "script_path",
    "inference_modules",
    "copy",
)

__all__ = [
    "ContainerConfig",
    "ContainerDistributionStatus",
    "ContainerStatus",
    "CoprocessorImages",
    "InferenceModulesConfig",
    "InferenceResponse",
    "QueueInfo",
    "CONTAINER_HANDLER_FIELDS",
    "FILE_INFO_KEYS",
]
