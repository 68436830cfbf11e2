"""The runtime seam: how a container of one implementation type runs on one board.

A runtime is small on purpose (prepare, prepared, start, adopt, alive_now, stop, exited, stats,
put_file, remove, remove_image, logs, files_size); the reconciler and the views never know
which one they talk to: ``process``, ``Loop`` and ``other`` (runtimes/process.py, external.py)
and ``docker``/``nvidia`` (runtimes/docker_runtime.py) all answer the same calls. Every
method but ``exited`` (which reads a poll, never the network) runs on worker threads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..config import BoardConfig
from ..settings import InferenceSettings


@dataclass
class ContainerSpec:
    """Everything a runtime needs to run one container of an inference on a board."""

    container_id: str  # the instance's id (state.instance_id): names its files, process, Docker container
    inference: str
    board: BoardConfig
    config: InferenceSettings
    work_dir: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    suffix: str = ""  # ContainerHandler.suffix_name (the placement); "" = container_id
    files: Path | None = None  # what put_file gave the inference (registry.Overlay), laid over script_path

    @property
    def suffix_name(self) -> str:
        return self.suffix or self.container_id


@dataclass
class RunInfo:
    pid: int | None
    pid_start: int | None
    created: str


class Runtime(Protocol):
    kind: str  # the implementation_type it runs

    def prepare(self, spec: ContainerSpec) -> dict | None:
        """Put the container's files in place (may be slow; never called on the router thread).
        May return what it took (image bytes sent, seconds), reported with the container."""

    def prepared(self, spec: ContainerSpec) -> bool:
        """Whether what ``prepare`` makes is there, made from these settings."""

    def start(self, spec: ContainerSpec) -> RunInfo:
        """Start the container; raise a numbered error if it cannot start."""

    def adopt(self, spec: ContainerSpec, pid: int | None, pid_start: int | None) -> bool:
        """Take over a container left running by an earlier manager; False if it is gone."""

    def alive_now(self, spec: ContainerSpec) -> bool:
        """Whether the container runs, asked of the board now (worker threads only)."""

    def stop(self, spec: ContainerSpec) -> None:
        """Stop the container (politely, then by force); no error if it is not running."""

    def exited(self, spec: ContainerSpec) -> int | None:
        """The exit status if the container has ended, else None."""

    def stats(self, spec: ContainerSpec) -> dict:
        """cpu_proc, mem_usage, mem_proc, block_io, status: the runtime's own figures."""

    def put_file(self, spec: ContainerSpec, source: str, target_dir: str) -> str:
        """Replace one file in the running container atomically; return where it went."""

    def remove(self, spec: ContainerSpec) -> None:
        """Delete what prepare made."""

    def remove_image(self, spec: ContainerSpec) -> bool:
        """Delete the image the container was made from; False if there is none or it is in use."""

    def logs(self, spec: ContainerSpec, lines: int) -> str:
        """The last lines the container wrote."""

    def files_size(self, spec: ContainerSpec) -> int:
        """What get_images reports as the size of a container without an image (its files)."""
