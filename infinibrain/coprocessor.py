"""CoprocessorHandler: controls one AI extension board (reference chapter 3).

The caller's thread: each call hands off to its AICluster's client core (_client.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from . import _api
from ._api import Call
from .container import ContainerHandler
from .types import ContainerDistributionStatus, CoprocessorImages

if TYPE_CHECKING:
    from .inference import AICluster


class CoprocessorHandler:
    """One board (§7.3: ``name``, ``ip``), with the APIs that act on it."""

    def __init__(self, cluster: "AICluster | None" = None, name: str = "", ip: str = "") -> None:
        self._cluster = cluster
        self.name = name
        self.ip = ip

    def __repr__(self) -> str:
        return f"CoprocessorHandler(name={self.name!r}, ip={self.ip!r})"

    def to_dict(self) -> dict:
        return {"name": self.name, "ip": self.ip}

    def _client(self):
        return _api.attached_client(self._cluster, "CoprocessorHandler")

    def _distribution(self, name: str, inference_name: str, on: bool) -> Call:
        _api.require_str(inference_name, "inference_name", allow_empty=True)

        def convert(rows: list) -> Any:
            # One inference named: its container on this board; "" (all of them): a list.
            statuses = [ContainerDistributionStatus.from_dict(r) for r in rows]
            return statuses[0] if inference_name else statuses

        return Call(name, "board_distribution", {"board": self.name, "inference_name": inference_name, "on": on},
                    convert, safe=True)

    def _add(self, inference_name: str) -> Call:
        _api.require_str(inference_name, "inference_name")
        return Call(
            "add_inference",
            "add_inference",
            {"board": self.name, "inference_name": inference_name},
            lambda rows: [ContainerHandler(self._cluster, **r) for r in rows],
        )

    def _images(self) -> Call:
        return Call("get_images", "get_images", {"board": self.name}, lambda rows: [CoprocessorImages.from_dict(r) for r in rows], safe=True)

    def start_distribution(self, inference_name: str = "") -> Any:
        """Enable ``inference_name`` ("" = every inference) on this board.

        Returns its ContainerDistributionStatus; with "" a list of them, one per inference
        on the board.
        """
        return _api.run(self._client(), self._distribution("start_distribution", inference_name, True))

    def start_distribution_async(self, inference_name: str = "", func: Callable | None = None) -> str:
        """Enable distribution on this board; the outcome goes to ``func`` or the manage callback."""
        return _api.run_async(self._client(), self._distribution("start_distribution", inference_name, True), func)

    def stop_distribution(self, inference_name: str = "") -> Any:
        """Disable ``inference_name`` ("" = every inference) on this board."""
        return _api.run(self._client(), self._distribution("stop_distribution", inference_name, False))

    def stop_distribution_async(self, inference_name: str = "", func: Callable | None = None) -> str:
        """Disable distribution on this board; the outcome goes to ``func`` or the manage callback."""
        return _api.run_async(self._client(), self._distribution("stop_distribution", inference_name, False), func)

    def add_inference(self, inference_name: str) -> list[ContainerHandler]:
        """Add a registered inference to this board; returns the board's containers."""
        return _api.run(self._client(), self._add(inference_name))

    def add_inference_async(self, inference_name: str, func: Callable | None = None) -> str:
        """Add a registered inference to this board; the outcome goes to ``func`` or the manage callback."""
        return _api.run_async(self._client(), self._add(inference_name), func)

    def get_images(self) -> list[CoprocessorImages]:
        """This board's images."""
        return _api.run(self._client(), self._images())

    def get_images_async(self, func: Callable | None = None) -> str:
        """This board's images, to ``func`` or the manage callback."""
        return _api.run_async(self._client(), self._images(), func)


__all__ = ["CoprocessorHandler"]
