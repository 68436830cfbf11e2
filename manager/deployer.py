"""The deployer: brings containers to the state the registry asks for.

It runs on worker threads (deploying is slow) and touches the router's state only through
``router.call``. It also owns persistence: ``persist`` snapshots a registration on the
router thread and a single writer thread writes it, in order, atomically.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import sys
import time

from infinibrain import protocol as P
from infinibrain.errors import make_error

from . import progress
from .boards import Board
from .config import ManagerConfig
from .registry import Registration, Registry
from .router import Router
from .runtimes.base import ContainerSpec, RunInfo
from .state import Container
from .validate import default_sub_name

log = logging.getLogger(__name__)


def container_id(inference: str, board: str) -> str:
    return f"{inference}-{board}"


class Deployer:
    def __init__(self, router: Router, boards: dict[str, Board], registry: Registry, config: ManagerConfig) -> None:
        self.router = router
        self.boards = boards
        self.registry = registry
        self.config = config
        self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry")

    def close(self) -> None:
        self._writer.shutdown(wait=True)

    # ---- persistence (router thread) ------------------------------------------------

    def persist(self, name: str) -> concurrent.futures.Future:
        """Write ``name``'s registration as it is now (or delete it if it is gone)."""
        reg = self.router.registrations.get(name)
        if reg is None:
            return self._writer.submit(self.registry.remove, name)
        # The snapshot is taken now, on the router thread, so the writes keep their order.
        return self._writer.submit(self.registry.write_dict, name, reg.to_dict())

    # ---- container records (router thread) ----------------------------------------------

    def spec(self, reg: Registration, board: Board) -> ContainerSpec:
        cid = container_id(reg.name, board.name)
        work_dir, log_path = board.paths(cid)
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFINIBRAIN_")}
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "/usr/bin:/bin")
        env["PYTHONUNBUFFERED"] = "1"
        env.update(
            INFINIBRAIN_HOST=board.config.manager_address,
            INFINIBRAIN_PUB_PORT=str(self.config.port + P.CONTAINER_IN),
            INFINIBRAIN_SUB_PORT=str(self.config.port + P.CONTAINER_OUT),
            INFINIBRAIN_CONTAINER=cid,
            INFINIBRAIN_INFERENCE=reg.name,
            INFINIBRAIN_SUB_NAME=default_sub_name(reg.config),
            INFINIBRAIN_BOARD=board.name,
            INFINIBRAIN_MAX_MESSAGE_SIZE=str(self.config.max_message_size),
        )
        env.update(self.router.guard.container_env())
        return ContainerSpec(cid, reg.name, board.config, reg.config, work_dir, log_path, env)

    def record(self, name: str, board_name: str) -> Container:
        """The router's record of ``name`` on ``board_name``, made if missing."""
        reg = self.router.registrations[name]
        board = self.boards[board_name]
        cid = container_id(name, board_name)
        existing = self.router.containers.get(cid)
        if existing is not None and existing.spec.config is reg.config:
            return existing
        runtime = board.runtime(reg.config["implementation_type"])
        c = Container(cid, name, board_name, self.spec(reg, board), runtime)
        if existing is not None:  # settings changed: keep what the wire knows about it
            c.subs, c.hello, c.running = existing.subs, existing.hello, existing.running
        self.router.containers[cid] = c
        return c

    def _mark_started(self, c: Container, info: RunInfo) -> concurrent.futures.Future:
        c.running, c.stopping = True, False
        placement = self.router.registrations[c.inference].boards[c.board]
        placement.running, placement.pid, placement.pid_start, placement.created = True, info.pid, info.pid_start, info.created
        return self.persist(c.inference)

    def _begin_stop(self, cid: str) -> Container | None:
        c = self.router.containers.get(cid)
        if c is not None:
            c.stopping = True
        return c

    def _end_stop(self, c: Container, forget: bool) -> None:
        self.router.container_lost(c.id, "it was stopped")
        c.running, c.stopping = False, False
        if forget:
            self.router.containers.pop(c.id, None)

    # ---- slow work (worker threads) --------------------------------------------------------

    def launch(self, name: str, board_name: str, rebuild: bool = True) -> Container:
        """Prepare (when ``rebuild`` or never prepared) and start ``name`` on ``board_name``;
        wait until it connects. A container made here that fails to start is removed again."""
        c: Container = self.router.call(self.record, name, board_name)
        # A container that runs but is not connected is asked about afresh: a remote board's
        # last poll may predate its loss (a board that lost power and came back).
        if c.running and c.runtime.exited(c.spec) is None and (c.connected or c.runtime.alive_now(c.spec)):
            return c
        started = time.monotonic()
        with progress.on_board(board_name):
            made = rebuild or not c.runtime.prepared(c.spec)
            if made:
                progress.report("preparing")
            figures = (c.runtime.prepare(c.spec) or {}) if made else {}
            try:
                progress.report("starting")
                info = c.runtime.start(c.spec)
                self.router.call(self._mark_started, c, info).result(30)
                self._wait_connected(c)
            except BaseException:
                if made:
                    self._remove_quietly(c)
                raise
            progress.report("ready", 1, 1)
        c.deployment = {**figures, "board": board_name, "seconds": round(time.monotonic() - started, 3)}
        self.router.metrics.deployed(name, board_name, c.deployment["seconds"])
        if figures.get("image_bytes"):
            self.router.metrics.sent_to_board(board_name, int(figures["image_bytes"]))
        return c

    @staticmethod
    def _remove_quietly(c: Container) -> None:
        """Remove what a failed launch made; the launch's own error is the one to report."""
        try:
            c.runtime.remove(c.spec)
        except Exception as exc:
            log.warning("could not remove the failed container %s: %s", c.id, exc)

    def _wait_connected(self, c: Container) -> None:
        if c.runtime.kind == "other":
            return
        deadline = time.monotonic() + self.config.container_start_timeout_ms / 1000
        while time.monotonic() < deadline:
            if c.connected_event.wait(0.05):
                return
            code = c.runtime.exited(c.spec)
            if code is not None:
                tail = c.runtime.logs(c.spec, 15)
                self.router.call(self._end_stop, c, False)
                raise make_error(
                    302,
                    detail=f"container {c.id} exited with status {code} while starting; last log lines:\n{tail}",
                )
        log.warning("container %s did not connect within %.0f s; it keeps running", c.id, self.config.container_start_timeout_ms / 1000)

    def halt(self, cid: str, remove_files: bool = False, forget: bool = False) -> None:
        """Stop container ``cid``; its in-flight requests end with 402."""
        c = self.router.call(self._begin_stop, cid)
        if c is None:
            return
        try:
            c.runtime.stop(c.spec)
        finally:
            self.router.call(self._end_stop, c, forget)
        if remove_files:
            c.runtime.remove(c.spec)

    # ---- start-up ---------------------------------------------------------------------------

    def restore(self, pool: concurrent.futures.Executor) -> None:
        """Before the loop runs: adopt containers an earlier manager left running, and
        start (on ``pool``) those the registry wants running."""
        for name, reg in self.registry.load_all().items():
            self.router.registrations[name] = reg
            for board_name, placement in reg.boards.items():
                if board_name not in self.boards:
                    log.error("inference %s is placed on unknown board %r; left alone", name, board_name)
                    continue
                try:
                    c = self.record(name, board_name)
                except Exception as exc:
                    log.error("cannot restore %s on %s: %s", name, board_name, exc)
                    continue
                try:
                    adopted = c.runtime.adopt(c.spec, placement.pid, placement.pid_start)
                except Exception as exc:  # e.g. the board's engine is down: try to start it later
                    log.error("cannot look for %s on %s: %s", name, board_name, exc)
                    adopted = False
                if adopted:
                    c.running = placement.running = True
                elif placement.running:
                    pool.submit(self._restart_logged, name, board_name)

    def _restart_logged(self, name: str, board_name: str) -> None:
        try:
            self.launch(name, board_name, rebuild=False)
        except Exception as exc:
            log.error("could not restart %s on %s: %s", name, board_name, exc)
