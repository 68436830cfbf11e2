"""``other`` containers: registered and routed to, but run by someone else.

The manager starts and stops nothing; whoever runs the inference program starts it with
the connection environment (written to ``<work_dir>/connection.env``; the essential
variable is ``INFINIBRAIN_CONTAINER=<suffix_name>``) and its Connector is routed to like
any other. Use it for a program that must run outside the manager's control: on bare
metal next to a sensor, under a debugger, under another supervisor.

Worker threads (operations.py), but ``exited`` (the router thread; it never touches the board).
"""
from __future__ import annotations

from datetime import datetime, timezone

from .base import ContainerSpec, RunInfo
from .process import ProcessRuntime


class ExternalRuntime(ProcessRuntime):
    kind = "other"

    def __init__(self, stop_timeout: float, host=None) -> None:
        super().__init__(stop_timeout, host)
        self._started: set[str] = set()

    def start(self, spec: ContainerSpec) -> RunInfo:
        self._started.add(spec.container_id)
        return RunInfo(None, None, datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def adopt(self, spec: ContainerSpec, pid: int | None, pid_start: int | None) -> bool:
        self._started.add(spec.container_id)
        return True

    def stop(self, spec: ContainerSpec) -> None:
        self._started.discard(spec.container_id)

    def alive_now(self, spec: ContainerSpec) -> bool:
        return True  # someone else runs it

    def exited(self, spec: ContainerSpec) -> int | None:
        return None if spec.container_id in self._started else 0

    @staticmethod
    def _check_scripts(spec: ContainerSpec, root) -> None:  # type: ignore[override]
        return None

    def stats(self, spec: ContainerSpec) -> dict:
        state = "external" if spec.container_id in self._started else "stopped"
        return {"status": state, "cpu_proc": "-", "mem_usage": "-", "mem_proc": "-", "block_io": "-"}
