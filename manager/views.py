"""Read-only answers: handlers, status, images, logs and queues, as the reference shapes them.

Router thread, except the board figures (``stats``, ``logs``, image lists), which are
asked of the boards on worker threads: a view takes its snapshot of the routing state
here, and hands the runtime calls to ``Operations``.
"""
from __future__ import annotations

import concurrent.futures
import logging
import math
from datetime import datetime, timezone

from infinibrain import protocol as P
from infinibrain.errors import InfinibrainException, make_error
from infinibrain.types import CONTAINER_HANDLER_FIELDS

from .boards import Board
from .config import ManagerConfig
from .dispatch import Dispatcher
from .operations import Operations, gather
from .reconciler import Reconciler
from .registry import Registration
from .runtimes.process import human_bytes
from .settings import resolve
from .state import Instance, Request, State

log = logging.getLogger(__name__)


class Views:
    def __init__(self, dispatcher: Dispatcher, reconciler: Reconciler, boards: dict[str, Board], config: ManagerConfig,
                 operations: Operations) -> None:
        self.dispatcher = dispatcher
        self.reconciler = reconciler
        self.boards = boards
        self.config = config
        self.ops = operations

    @property
    def registrations(self) -> dict[str, Registration]:
        return self.reconciler.registrations

    # ---- lookups (raise the reference's errors) --------------------------------------------

    def registered(self, name: str) -> Registration:
        return self.reconciler.registry.registered(name)

    def board(self, name: str) -> Board:
        board = self.boards.get(name)
        if board is None:
            raise make_error(304, detail=f"board {name!r} (known: {', '.join(self.boards)})")
        return board

    def placement_of(self, suffix: str, board: str) -> tuple[str, str]:
        """(inference, board) of the container ``suffix`` on ``board``: 304 / 307."""
        self.board(board)
        for name, reg in self.registrations.items():
            if board in reg.boards and f"{name}-{board}" == suffix:
                return name, board
        raise make_error(307, detail=f"container {suffix!r} on board {board!r}")

    def placements(self, name: str = "", board: str = "") -> list[tuple[Registration, str]]:
        """(registration, board) of every placement (of ``name``, on ``board``), by suffix name."""
        found = [(reg, b) for n, reg in self.registrations.items() if not name or n == name
                 for b in reg.boards if not board or b == board]
        return sorted(found, key=lambda p: f"{p[0].name}-{p[1]}")

    # ---- handlers -------------------------------------------------------------------------

    def handler(self, reg: Registration, board: str) -> dict:
        """A placement as ContainerHandler attributes (+ what its last deployment took)."""
        cfg = reg.config.to_dict()
        out = {key: cfg[key] for key in CONTAINER_HANDLER_FIELDS if key in cfg}
        inst = self.reconciler.current(reg.name, board)
        policy = resolve(reg.config, self.config)  # the values in force
        out.update(
            suffix_name=f"{reg.name}-{board}",
            image_file=reg.config.image_filename,
            allocated_coprocessor=board,
            host_location=list(reg.boards),
            max_send_num=policy.max_send_num,
            send_timeout=round(policy.send_timeout * 1000),
            wait_queue_timeout=round(policy.answer_timeout * 1000) if policy.answer_timeout != math.inf else None,  # None: no limit
            deployment=dict(inst.deployment) if inst is not None else {},
        )
        return out

    def handlers(self, name: str = "", board: str = "") -> list[dict]:
        return [self.handler(reg, b) for reg, b in self.placements(name, board)]

    # ---- status ---------------------------------------------------------------------------

    def status(self, name: str = "", board: str = "") -> concurrent.futures.Future:
        """ContainerStatus rows (a future: the figures are asked of the boards)."""
        if name:
            self.registered(name)
        rows: list[tuple[Instance | None, dict]] = []
        for reg, b in self.placements(name, board):
            inst = self.reconciler.current(reg.name, b)
            row = self.handler(reg, b)
            placement = reg.boards[b]
            connected = inst is not None and inst.connected
            row.update(
                connect_status="connected" if connected else "disconnected",
                operate=("Busy" if inst.in_flight else "Free") if inst is not None and connected else "Unknown",
                queue_num=self.dispatcher.queued(reg.name),
                send_data_num=len(inst.in_flight) if inst is not None else 0,
                net_io=f"{human_bytes(inst.tx_bytes if inst else 0)} / {human_bytes(inst.rx_bytes if inst else 0)}",
                ports=f"{self.config.port + P.CONTAINER_OUT}/tcp, {self.config.port + P.CONTAINER_IN}/tcp",
                created=placement.created,
                distribution=placement.distribution,  # beyond §7.6, as the next ones
                state=str(inst.state) if inst is not None else str(State.PENDING),
                why=inst.why if inst is not None else "",
                revision=reg.revision,
                instances=len(self.reconciler.slots[(reg.name, b)].instances) if (reg.name, b) in self.reconciler.slots else 0,
            )
            rows.append((inst, row))
        return self.ops.pool.submit(_with_figures, rows)

    # ---- boards, images, logs ----------------------------------------------------------------

    def coprocessors(self, name: str = "") -> list[dict]:
        boards = list(self.boards.values()) if not name else [self.boards[b] for b in self.registered(name).boards if b in self.boards]
        return [{"name": b.name, "ip": b.ip} for b in boards]

    def images(self, boards: list[Board]) -> concurrent.futures.Future:
        """CoprocessorImages rows of ``boards`` (asked of the boards, in parallel)."""
        jobs = [(b, [i for reg, on in self.placements(board=b.name)
                     if (i := self.reconciler.current(reg.name, on)) is not None]) for b in boards]
        futures = [self.ops.pool.submit(_images_of, b, found) for b, found in jobs]
        return gather(futures)

    def logs(self, name: str, board: str, lines: int) -> concurrent.futures.Future:
        inst = self.reconciler.current(name, board)
        if inst is None:
            done: concurrent.futures.Future = concurrent.futures.Future()
            done.set_result("")
            return done
        return self.ops.pool.submit(inst.runtime.logs, inst.spec, lines)

    # ---- queues ---------------------------------------------------------------------------

    def queue_matches(self, name: str, rno: int, pid: int) -> list[Request]:
        if name:
            self.registered(name)
        return [r for r in self.dispatcher.waiting(name) if (not rno or r.rid == str(rno)) and (not pid or r.pid == pid)]

    @staticmethod
    def queue_info(requests: list[Request]) -> list[dict]:
        return [
            {
                "request_no": int(r.rid) if r.rid.isdigit() else 0,
                "inference_name": r.inference,
                "pid": r.pid,
                "mng_queue_in": datetime.fromtimestamp(r.queued_wall, timezone.utc).isoformat(timespec="milliseconds"),
                "priority": r.priority,  # beyond §7.7: the order is the queue's (waitqueue.py)
            }
            for r in requests
        ]


# ---- worker threads ---------------------------------------------------------------------------


def _with_figures(rows: list[tuple[Instance | None, dict]]) -> list[dict]:
    out = []
    for inst, row in rows:
        if inst is None:
            row.update(status="pending", cpu_proc="0.00%", mem_usage="0B", mem_proc="0.00%", block_io="0B / 0B")
        else:  # a board that cannot be reached is 500, as the reference has it
            row.update(inst.runtime.stats(inst.spec))
        out.append(row)
    return out


def _images_of(board: Board, instances: list[Instance]) -> dict:
    """A board's images: its Docker engine's, and the working folder of each process
    container (which is what such a container is made from)."""
    images: list[dict] = []
    uses_engine = any(i.runtime.kind in ("docker", "nvidia") for i in instances)
    if board.link is not None:
        board.link.client()  # a board that cannot be reached is an error, not an empty list
    try:
        with board.engine.errors(f"board {board.name!r}: listing images"):
            images = board.engine.images()
    except InfinibrainException as exc:
        if uses_engine or exc.code != 500:
            raise
        log.debug("board %s has no Docker engine (%s); listing its process containers only", board.name, exc.text)
    for inst in instances:
        if inst.runtime.kind in ("docker", "nvidia"):
            continue
        cfg = inst.spec.config
        images.append(
            {
                "tag": cfg.image_tag or f"{inst.inference}:{cfg.implementation_type.lower()}",
                "inference_name": inst.inference,
                "implementation_type": cfg.implementation_type,
                "size": inst.runtime.files_size(inst.spec),
                "path": str(inst.spec.work_dir),
            }
        )
    return {"name": board.name, "ip": board.ip, "images": images}
