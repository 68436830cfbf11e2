"""The command table: every management command, its arguments, its locks and its reply.

Router thread, all of it. A command is a function of (the client's context, its
arguments) that returns its answer, or a generator that yields futures (a board check on
a worker, a change the reconciler converges, figures asked of a board) and is resumed
with each result on the router thread until it returns its answer. So a command reads as
one sequence, yet the loop never waits on it, and every line of this file runs on the
router thread.

Locks: a command that changes an inference holds it, or only its placements on the
boards it names (``Locks``); another command that needs any of them meanwhile gets 309
at once. Every command ends in exactly one reply.

Roles: a command that changes the cluster (``Spec.manage``) is refused with 110, naming
the role, for a client whose key may run inference only (auth.py; with CURVE off every
client manages). Queries are open to every allowed key.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import types
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterable

from infinibrain import protocol as P
from infinibrain.errors import InfinibrainException, make_error
from infinibrain.types import FILE_INFO_KEYS

from . import operations as ops
from .auth import MANAGE
from .boards import Board
from .changes import Changes
from .dispatch import Dispatcher
from .figures import Figures
from .loop import Loop
from .metrics import NullMetrics
from .operations import Operations, gather
from .reconciler import Reconciler
from .state import Client, Instance, State
from .validate import normalize_config
from .views import Views
from .wire import Wire

log = logging.getLogger(__name__)

Answer = Any
Step = Generator[concurrent.futures.Future, Any, Answer]
WHOLE = ""  # a lock on every board of an inference


@dataclass
class Context:
    """Who sent a command, and where its progress goes."""

    client: Client
    rid: str
    sink: Callable[[dict], None]


@dataclass
class Spec:
    fn: Callable[[Context, dict], Answer | Step]
    locks: Callable[[dict], list[tuple[str, str]]] | None = None  # (inference, board or WHOLE)
    manage: bool = False  # it changes the cluster: a "manage" key only


class Locks:
    """Which inferences (or placements) commands hold."""

    def __init__(self) -> None:
        self.held: list[tuple[str, str]] = []

    def conflicts(self, wanted: Iterable[tuple[str, str]]) -> list[str]:
        return sorted({n for n, b in wanted for hn, hb in self.held
                       if n == hn and (b == WHOLE or hb == WHOLE or b == hb)})

    def take(self, wanted: list[tuple[str, str]]) -> None:
        self.held.extend(wanted)

    def release(self, wanted: list[tuple[str, str]]) -> None:
        for key in wanted:
            self.held.remove(key)

    def busy(self, name: str) -> bool:
        return any(n == name for n, _ in self.held)


class Commands:
    def __init__(self, loop: Loop, wire: Wire, dispatcher: Dispatcher, figures: Figures, reconciler: Reconciler,
                 changes: Changes, views: Views, boards: dict[str, Board], operations: Operations, metrics: NullMetrics,
                 refusal: Callable[[], str] = lambda: "") -> None:
        """``refusal()``: why changes are refused now ("" = they are not): a manager group
        whose etcd has no quorum."""
        self.loop = loop
        self.refusal = refusal
        self.wire = wire
        self.dispatcher = dispatcher
        self.figures = figures
        self.metrics = metrics
        self.reconciler = reconciler
        self.changes = changes
        self.views = views
        self.boards = boards
        self.ops = operations
        self.locks = Locks()
        self.table: dict[str, Spec] = {
            "load_inference": Spec(self.load_inference, self._config_names, manage=True),
            "unload_inference": Spec(self.unload_inference, self._names_or_all, manage=True),
            "reload_inference": Spec(self.reload_inference, self._one_name, manage=True),
            "restart_inference": Spec(self.restart_inference, self._name_on_board, manage=True),
            "put_file": Spec(self.put_file, self._one_name, manage=True),
            "add_inference": Spec(self.add_inference, self._name_on_board, manage=True),
            "container_start": Spec(self.container_start, self._container, manage=True),
            "container_stop": Spec(self.container_stop, self._container, manage=True),
            "get_container_status": Spec(self.get_container_status),
            "get_coprocessor_images": Spec(self.get_coprocessor_images),
            "get_images": Spec(self.get_images),
            "remove_images": Spec(self.remove_images, manage=True),
            "logs": Spec(self.logs),
            "get_coprocessor_handler": Spec(lambda ctx, a: self.views.coprocessors(_str(a, "inference_name"))),
            "get_container_handler": Spec(self.get_container_handler),
            "get_queue_info": Spec(self.get_queue_info),
            "delete_queue": Spec(self.delete_queue, manage=True),
            "board_distribution": Spec(self.board_distribution, manage=True),
            "container_distribution": Spec(self.container_distribution, manage=True),
            "ping": Spec(lambda ctx, a: {"instance": self.wire.instance}),
            "stats": Spec(lambda ctx, a: self.figures.stats()),
            "boards": Spec(lambda ctx, a: self.figures.boards()),
        }

    # ---- running a command -------------------------------------------------------------------

    def submit(self, client: Client, rid: str, cmd: str, args: dict) -> None:
        spec = self.table.get(cmd)
        if spec is None:
            return self._reply(client.id, rid, make_error(900, detail=f"unknown command {cmd!r}"))
        held: list[tuple[str, str]] = []

        def tell(info: dict) -> None:  # progress of this command, to the client that sent it
            self.loop.call_soon(self.wire.to_client, client.id, P.PROGRESS, {"rid": rid, "info": info})

        try:
            if spec.manage and client.role != MANAGE:
                raise make_error(110, detail=f"{cmd} changes the cluster, and this client's key has the role {client.role!r}: "
                                             f"it may run inference and read only (a key in curve_client_keys/infer/); "
                                             f"managing needs a key in curve_client_keys itself (docs/DEPLOYMENT.md)")
            if not isinstance(args, dict):
                raise make_error(100, "args", detail="command arguments must be a map")
            if spec.manage and cmd != "delete_queue" and (why := self.refusal()):
                raise make_error(309, "the cluster", detail=f"{cmd} is refused: {why}; try again when it is back")
            wanted = spec.locks(args) if spec.locks else []
            taken = self.locks.conflicts(wanted)
            if taken:
                raise make_error(309, ", ".join(taken))
            outcome = spec.fn(Context(client, rid, tell), args)
        except Exception as exc:
            return self._reply(client.id, rid, _numbered(exc, cmd))
        if isinstance(outcome, types.GeneratorType):
            self.locks.take(wanted)
            held = wanted
            return self._drive(outcome, client.id, rid, cmd, held)
        if isinstance(outcome, concurrent.futures.Future):
            return self._wait(outcome, lambda f: self._reply_future(client.id, rid, cmd, f))
        self._reply(client.id, rid, None, outcome)

    def _drive(self, gen: Step, cid: str, rid: str, cmd: str, held: list, value: Any = None,
               error: BaseException | None = None) -> None:
        """Run ``gen`` on to its next future (or its end), with ``value`` or ``error`` from the last."""
        try:
            fut = gen.throw(error) if error is not None else gen.send(value)
        except StopIteration as stop:
            self.locks.release(held)
            return self._reply(cid, rid, None, stop.value)
        except Exception as exc:
            self.locks.release(held)
            return self._reply(cid, rid, _numbered(exc, cmd))

        def resume(f: concurrent.futures.Future) -> None:
            exc = f.exception()
            self._drive(gen, cid, rid, cmd, held, None if exc else f.result(), exc)

        self._wait(fut, resume)

    def _wait(self, fut: concurrent.futures.Future, then: Callable[[concurrent.futures.Future], None]) -> None:
        fut.add_done_callback(lambda f: self.loop.call_soon(then, f))

    def _reply_future(self, cid: str, rid: str, cmd: str, f: concurrent.futures.Future) -> None:
        exc = f.exception()
        self._reply(cid, rid, _numbered(exc, cmd) if exc else None, None if exc else f.result())

    def _reply(self, cid: str, rid: str, error: InfinibrainException | None, result: Any = None) -> None:
        if error is None:
            header = {"rid": rid, "code": 0, "msg": ""}
        else:
            header = {"rid": rid, "code": error.code, "msg": error.message, "detail": error.detail}
        self.wire.to_client(cid, P.REPLY, header, [P.pack_value(result)])

    # ---- locks ----------------------------------------------------------------------------------

    def _config_names(self, args: dict) -> list[tuple[str, str]]:
        configs = args.get("configs")
        if not isinstance(configs, list) or not configs:
            raise make_error(100, "container_config")
        names = [c.get("name") if isinstance(c, dict) else None for c in configs]
        return [(n, WHOLE) for n in names if isinstance(n, str)]

    def _names_or_all(self, args: dict) -> list[tuple[str, str]]:
        name, board = _str(args, "inference_name"), _str(args, "coprocessor_name")
        return [(n, board or WHOLE) for n in ([name] if name else list(self.reconciler.registrations))]

    def _one_name(self, args: dict) -> list[tuple[str, str]]:
        return [(_str(args, "inference_name", True), WHOLE)]

    def _name_on_board(self, args: dict) -> list[tuple[str, str]]:
        return [(_str(args, "inference_name", True), _str(args, "board"))]

    def _container(self, args: dict) -> list[tuple[str, str]]:
        return [self.views.placement_of(_str(args, "suffix_name", True), _str(args, "board", True))]

    # ---- AICluster: changes -----------------------------------------------------------------

    def load_inference(self, ctx: Context, args: dict) -> Step:
        configs = [normalize_config(c) for c in args.get("configs") or []]
        if not configs:
            raise make_error(100, "container_config")
        boards = self._board_list(args.get("boards"))
        plans = [self.changes.plan_load(cfg, boards) for cfg in configs]
        # Everything that can be checked is checked before anything is stopped.
        yield gather([self.ops.submit(ops.check_files, p.cfg) for p in plans if p.work]
                     + [self.ops.submit(ops.check_board, self.boards[b], p.cfg, board=b) for p in plans for b in p.work])
        yield gather([self.changes.load(p, ctx.sink) for p in plans])
        # The containers this call concerns: each config on each board it named, in that order.
        return [self.views.handler(self.views.registered(p.name), b) for p in plans for b in boards]

    def _board_list(self, value: Any) -> list[str]:
        if value == "all":
            return list(self.boards)
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise make_error(100, "coprocessor_name")
        for name in names:
            self.views.board(name)
        return list(dict.fromkeys(names))

    def unload_inference(self, ctx: Context, args: dict) -> Step:
        name, board = _str(args, "inference_name"), _str(args, "coprocessor_name")
        if board:
            self.views.board(board)
        names = [name] if name else list(self.reconciler.registrations)
        for n in names:
            self.views.registered(n)
        for n in names:
            self.changes.check_unload(n, board)  # all of them before any is touched
        images = [i for n in names for i in self.reconciler.instances_of(n) if not board or i.board == board]
        yield gather([self.changes.unload(n, board) for n in names])
        if args.get("delete_image", True):
            doomed = [i for i in self._one_per_image(images) if self._brought(i)]
            deleted = yield gather([self.ops.submit(_delete_image, i.runtime, i.spec, self._image_users(i)) for i in doomed])
            for inst, gone in zip(doomed, deleted):
                for b in self._sharing_engine(inst) if gone else ():
                    self.reconciler.registry.bring(b.name, inst.spec.config.image_tag or "", False)
        return self.views.handlers()

    def _sharing_engine(self, inst: Instance) -> list[Board]:
        """The boards whose engine is ``inst``'s board's (emulated boards share one)."""
        engine = self.boards[inst.board].engine
        return [b for b in self.boards.values() if b.engine is engine]

    def _brought(self, inst: Instance) -> bool:
        """Whether the manager brought ``inst``'s image to its engine (through any board of that
        engine): only such images are deleted again, never one built or put there by someone else."""
        tag = inst.spec.config.image_tag
        return any(tag in self.reconciler.registry.brought.get(b.name, ()) for b in self._sharing_engine(inst))

    @staticmethod
    def _one_per_image(instances: list[Instance]) -> list[Instance]:
        seen: dict[tuple[int, str], Instance] = {}
        for i in instances:
            tag = i.spec.config.image_tag
            if tag and i.runtime.kind in ("docker", "nvidia"):
                seen.setdefault((id(i.runtime), tag), i)
        return list(seen.values())

    def _image_users(self, gone: Instance) -> list:
        """The engines of the registered instances that still use ``gone``'s image."""
        tag = gone.spec.config.image_tag
        users = [i for i in self.dispatcher.containers.values()
                 if i.inference in self.reconciler.registrations and i.spec.config.image_tag == tag]
        return list({id(self.boards[i.board].engine): self.boards[i.board].engine for i in users}.values())

    def reload_inference(self, ctx: Context, args: dict) -> Step:
        name = _str(args, "inference_name", True)
        reg = yield self.ops.submit(self.reconciler.registry.read, name)  # 205 / 206 / 207 (a worker: etcd may be slow)
        unknown = [b for b in reg.boards if b not in self.boards]
        if unknown:
            raise make_error(207, detail=f"it places {name!r} on unknown board {unknown[0]!r}")
        yield gather([self.ops.submit(ops.check_files, reg.config)]
                     + [self.ops.submit(ops.check_board, self.boards[b], reg.config, board=b) for b in reg.boards])
        yield self.changes.reload(reg, ctx.sink)
        return self.views.handlers(name)

    def restart_inference(self, ctx: Context, args: dict) -> Step:
        """Not in the reference: new containers for every board, one by one (``rolling``),
        or each stopped and started again in place (one board, or ``rolling=False``)."""
        name, board = _str(args, "inference_name", True), _str(args, "board")
        reg = self.views.registered(name)
        if board:
            self.views.board(board)
            if board not in reg.boards:
                raise make_error(307, detail=f"inference {name!r} has no container on board {board!r}")
        if args.get("rolling", True) and not board:
            yield self.changes.restart(name, ctx.sink)
        else:
            boards = [board] if board else [b for b, p in reg.boards.items() if p.running]
            yield gather([self.changes.set_running("restart_inference", name, b, False, ctx.sink) for b in boards])
            yield gather([self.changes.set_running("restart_inference", name, b, True, ctx.sink) for b in boards])
        return self.views.handlers(name, board)

    def put_file(self, ctx: Context, args: dict) -> Step:
        name = _str(args, "inference_name", True)
        info = args.get("file_info")
        if not isinstance(info, dict) or not info:
            raise make_error(100, "file_info")
        bad = [k for k in info if k not in FILE_INFO_KEYS]
        if bad:
            raise make_error(101, bad[0])
        sources = [info[k] for k in ("script", "model", "file") if k in info]
        sources = [s for v in sources for s in (v if isinstance(v, list) else [v])]
        if not sources:
            raise make_error(201, detail="file_info needs one of 'script', 'model' or 'file'")
        for src in sources:
            if not isinstance(src, str) or not os.path.isfile(src) or not os.access(src, os.R_OK):
                raise make_error(301, detail=f"cannot open {src!r} on the main board")
        target = info.get("To") or "."
        if not isinstance(target, str):
            raise make_error(101, "To")
        reg = self.views.registered(name)
        instances = [i for b in reg.boards if (i := self.reconciler.current(name, b)) is not None and i.state is not State.PENDING]
        queued = self.dispatcher.queued(name)
        running = sum(len(i.in_flight) for i in self.reconciler.instances_of(name))
        if queued or running:
            raise make_error(303, detail=f"{name!r} has {queued} queued and {running} running requests")
        sizes = yield gather([self.ops.submit(_put_into, i.runtime, i.spec, sources, target, board=i.board) for i in instances])
        # Kept for the containers made later (a restart, a new board), once it worked here.
        yield self.ops.submit(_keep_files, self.reconciler.registry.files, name, sources, target)
        for inst, sent in zip(instances, sizes):
            self.metrics.sent_to_board(inst.board, sent)
        return None

    def add_inference(self, ctx: Context, args: dict) -> Step:
        board = self.views.board(_str(args, "board", True)).name
        name = _str(args, "inference_name", True)
        reg = self.views.registered(name)
        yield gather([self.ops.submit(ops.check_files, reg.config), self.ops.submit(ops.check_board, self.boards[board], reg.config)])
        yield self.changes.add(name, board, ctx.sink)
        return self.views.handlers("", board)

    def container_start(self, ctx: Context, args: dict) -> Step:
        name, board = self.views.placement_of(_str(args, "suffix_name", True), _str(args, "board", True))
        yield self.changes.set_running("start", name, board, True, ctx.sink)
        rows = yield self.views.status(name, board)
        return rows[0]

    def container_stop(self, ctx: Context, args: dict) -> Step:
        name, board = self.views.placement_of(_str(args, "suffix_name", True), _str(args, "board", True))
        yield self.changes.set_running("stop", name, board, False, ctx.sink)
        rows = yield self.views.status(name, board)
        return rows[0]

    # ---- AICluster: views ---------------------------------------------------------------------

    def get_container_handler(self, ctx: Context, args: dict) -> list[dict]:
        name = _str(args, "inference_name")
        if name:
            self.views.registered(name)
        return self.views.handlers(name)

    def get_container_status(self, ctx: Context, args: dict) -> concurrent.futures.Future:
        return self.views.status(_str(args, "inference_name"))

    def get_coprocessor_images(self, ctx: Context, args: dict) -> concurrent.futures.Future:
        name = _str(args, "inference_name")
        boards = list(self.boards.values()) if not name else [self.boards[b] for b in self.views.registered(name).boards]
        return self.views.images(boards)

    def get_images(self, ctx: Context, args: dict) -> concurrent.futures.Future:
        return self.views.images([self.views.board(_str(args, "board", True))])

    def remove_images(self, ctx: Context, args: dict) -> Step:
        """Not in the reference: remove image tags from boards (every board, or one), but
        never one a registered inference uses on that board's engine."""
        tags = args.get("tags")
        if not isinstance(tags, list) or not tags or not all(isinstance(t, str) and t for t in tags):
            raise make_error(100, "tags", detail="a list of image tags")
        board = _str(args, "board")
        boards = [self.views.board(board)] if board else list(self.boards.values())
        used = [(self.boards[i.board].engine, i.spec.config.image_tag, i.inference)
                for i in self.dispatcher.containers.values()
                if i.inference in self.reconciler.registrations and i.runtime.kind in ("docker", "nvidia")]
        engines: dict[int, Board] = {}
        for b in boards:  # boards that share an engine (emulated ones) are asked once
            engines.setdefault(id(b.engine), b)
        rows = yield gather([self.ops.submit(_remove_tags, b, tags, used, board=b.name) for b in engines.values()])
        return [r for found in rows for r in found]

    def logs(self, ctx: Context, args: dict) -> concurrent.futures.Future:
        name, board = self.views.placement_of(_str(args, "suffix_name", True), _str(args, "board", True))
        return self.views.logs(name, board, int(args.get("lines") or 100))

    def get_queue_info(self, ctx: Context, args: dict) -> list[dict]:
        return self.views.queue_info(self._queue_matches(args))

    def _queue_matches(self, args: dict) -> list:
        rno, pid = args.get("request_no") or 0, args.get("pid") or 0
        if not isinstance(rno, int) or not isinstance(pid, int):
            raise make_error(100, "request_no" if not isinstance(rno, int) else "pid", detail="must be an integer")
        return self.views.queue_matches(_str(args, "inference_name"), rno, pid)

    def delete_queue(self, ctx: Context, args: dict) -> list[dict]:
        matches = self._queue_matches(args)
        pid = args.get("pid") or 0
        client = ctx.client
        if not args.get("force_delete"):
            if pid and pid != client.pid:
                raise make_error(308, detail=f"the queue of pid {pid} belongs to another process; use force_delete=True")
            matches = [r for r in matches if r.pid == client.pid]
        doomed = set(map(id, matches))
        for r in self.dispatcher.take_waiting(lambda r: id(r) in doomed):
            self.dispatcher.end(r, 404, detail=f"deleted from the send-wait queue by delete_queue of pid {client.pid}")
        return self.views.queue_info(self.dispatcher.waiting())

    # ---- CoprocessorHandler / ContainerHandler switches -----------------------------------------

    def board_distribution(self, ctx: Context, args: dict) -> concurrent.futures.Future:
        board = self.views.board(_str(args, "board", True)).name
        name = _str(args, "inference_name")
        if name and board not in self.views.registered(name).boards:
            raise make_error(300, detail=f"inference {name!r} is not registered on board {board!r}")
        return self._switch([(reg.name, b) for reg, b in self.views.placements(name, board)], bool(args.get("on")))

    def container_distribution(self, ctx: Context, args: dict) -> concurrent.futures.Future:
        placement = self.views.placement_of(_str(args, "suffix_name", True), _str(args, "board", True))
        name = _str(args, "inference_name")
        if name and name != placement[0]:
            self.views.registered(name)
            raise make_error(307, detail=f"container {args['suffix_name']!r} does not serve {name!r}")
        return self._switch([placement], bool(args.get("on")))

    def _switch(self, pairs: list[tuple[str, str]], on: bool) -> concurrent.futures.Future:
        rows = [{"name": n, "suffix_name": f"{n}-{b}", "distribution": "on" if on else "off"} for n, b in pairs]
        written = self.changes.distribution(pairs, on)
        out: concurrent.futures.Future = concurrent.futures.Future()
        written.add_done_callback(lambda f: out.set_exception(f.exception()) if f.exception() else out.set_result(rows))
        return out


# ---- helpers ---------------------------------------------------------------------------------


def _str(args: dict, key: str, required: bool = False) -> str:
    value = args.get(key) or ""
    if not isinstance(value, str):
        raise make_error(100, key, detail=f"{key} must be a string")
    if required and not value:
        raise make_error(100, key)
    return value


def _numbered(exc: BaseException, cmd: str) -> InfinibrainException:
    if isinstance(exc, InfinibrainException):
        return exc
    log.error("command %s failed", cmd, exc_info=exc)
    return make_error(999, detail=f"{type(exc).__name__}: {exc}")


# ---- worker threads ---------------------------------------------------------------------------


def _put_into(runtime: Any, spec: Any, sources: list[str], target: str) -> int:
    sent = 0
    for src in sources:
        where = runtime.put_file(spec, src, target)
        sent += os.path.getsize(src)
        log.info("put_file: %s -> %s:%s", src, spec.container_id, where)
    return sent


def _keep_files(files: Any, name: str, sources: list[str], target: str) -> None:
    for src in sources:
        files.add(name, src, target)


def _remove_tags(board: Board, tags: list[str], used: list[tuple[Any, str, str]]) -> list[dict]:
    """Remove ``tags`` from ``board``'s engine, keeping those a registered inference uses."""
    mine = board.engine.identity()
    rows = []
    for tag in tags:
        users = sorted({name for engine, t, name in used if t == tag and engine.identity() == mine})
        removed, why = False, ""
        if users:
            why = f"used by {', '.join(users)}"
        else:
            try:
                with board.engine.errors(f"board {board.name!r}: removing image {tag}"):
                    removed = board.engine.remove_image(tag)
                why = "" if removed else "not there, or a container uses it"
            except InfinibrainException as exc:
                why = exc.text
        rows.append({"board": board.name, "tag": tag, "removed": removed, "why": why})
    return rows


def _delete_image(runtime: Any, spec: Any, users: list) -> bool:
    """Remove a gone container's image unless a registered container on the same engine
    still uses it (emulated boards share one engine: compared by the engine's own ID)."""
    mine = runtime.engine.identity()
    if any(engine.identity() == mine for engine in users):
        return False
    return bool(runtime.remove_image(spec))


__all__ = ["Commands"]
