"""ContainerHandler: controls one inference container (reference chapter 4).

The caller's thread: each call hands off to its AICluster's client core (_client.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from . import _api
from ._api import Call
from .types import CONTAINER_HANDLER_FIELDS, ContainerDistributionStatus, ContainerStatus, modules_from_wire

if TYPE_CHECKING:
    from .inference import AICluster


class ContainerHandler:
    """One container (§7.5 attributes), with the APIs that act on it."""

    # The §7.5 attributes (CONTAINER_HANDLER_FIELDS), set from the manager's answer.
    name: str
    suffix_name: str
    image_path: str | None
    image_file: str | None
    image_tag: str | None
    run_command: str | None
    run_option: str | None
    allocated_coprocessor: str
    max_send_num: int | None
    host_location: list[str]
    implementation_type: str
    input: str | None
    output: str | None
    send_timeout: int | None
    wait_queue_timeout: int | None
    script_path: str | None
    inference_modules: Any
    copy: Any

    def __init__(self, cluster: "AICluster | None" = None, **attributes: Any) -> None:
        self._cluster = cluster
        for name in CONTAINER_HANDLER_FIELDS:
            setattr(self, name, attributes.get(name))
        self.inference_modules = modules_from_wire(self.inference_modules)
        self.host_location = list(self.host_location or [])
        # Not in the reference: what the container's last deployment took (image bytes sent
        # to the board, seconds to send, load and start it), e.g. from load_inference.
        self.deployment: dict = dict(attributes.get("deployment") or {})

    def __repr__(self) -> str:
        return f"ContainerHandler(name={self.name!r}, suffix_name={self.suffix_name!r}, allocated_coprocessor={self.allocated_coprocessor!r})"

    def to_dict(self) -> dict:
        from .types import _plain

        return {name: _plain(getattr(self, name)) for name in CONTAINER_HANDLER_FIELDS}

    # ---- calls -------------------------------------------------------------------------

    def _where(self) -> dict:
        return {"suffix_name": self.suffix_name, "board": self.allocated_coprocessor}

    def _distribution(self, name: str, inference_name: str, on: bool) -> Call:
        _api.require_str(inference_name, "inference_name", allow_empty=True)
        args = {**self._where(), "inference_name": inference_name, "on": on}
        return Call(name, "container_distribution", args, lambda rows: ContainerDistributionStatus.from_dict(rows[0]), safe=True)

    def _lifecycle(self, name: str) -> Call:
        return Call(name, f"container_{name}", self._where(), ContainerStatus.from_dict)

    def _client(self):
        return _api.attached_client(self._cluster, "ContainerHandler")

    def start_distribution(self, inference_name: str = "") -> ContainerDistributionStatus:
        """Enable distribution of requests to this container."""
        return _api.run(self._client(), self._distribution("start_distribution", inference_name, True))

    def start_distribution_async(self, inference_name: str = "", func: Callable | None = None) -> str:
        """Enable distribution; the outcome goes to ``func`` or the manage callback."""
        return _api.run_async(self._client(), self._distribution("start_distribution", inference_name, True), func)

    def stop_distribution(self, inference_name: str = "") -> ContainerDistributionStatus:
        """Disable distribution of requests to this container."""
        return _api.run(self._client(), self._distribution("stop_distribution", inference_name, False))

    def stop_distribution_async(self, inference_name: str = "", func: Callable | None = None) -> str:
        """Disable distribution; the outcome goes to ``func`` or the manage callback."""
        return _api.run_async(self._client(), self._distribution("stop_distribution", inference_name, False), func)

    def start(self) -> ContainerStatus:
        """Start the container; returns its status afterwards."""
        return _api.run(self._client(), self._lifecycle("start"))

    def start_async(self, func: Callable | None = None) -> str:
        """Start the container; the status goes to ``func`` or the manage callback."""
        return _api.run_async(self._client(), self._lifecycle("start"), func)

    def stop(self) -> ContainerStatus:
        """Stop the container; returns its status afterwards."""
        return _api.run(self._client(), self._lifecycle("stop"))

    def stop_async(self, func: Callable | None = None) -> str:
        """Stop the container; the status goes to ``func`` or the manage callback."""
        return _api.run_async(self._client(), self._lifecycle("stop"), func)


__all__ = ["ContainerHandler"]
