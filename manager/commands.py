"""Management commands: what the reference's management APIs ask of the cluster.

``Commands.submit`` is called on the router thread for every command. Quick commands
(queries, distribution, queues) run right there; slow ones (deploying, stopping, copying
files) run on worker threads, one at a time per inference: a second command on an
inference that is still busy gets 309. Every command ends in exactly one reply.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from infinibrain import protocol as P
from infinibrain.errors import InfinibrainException, format_message, make_error
from infinibrain.types import CONTAINER_HANDLER_FIELDS, FILE_INFO_KEYS

from . import progress
from .boards import Board
from .deployer import Deployer, container_id
from .registry import Placement, Registration
from .router import Router
from .runtimes.process import human_bytes
from .state import Client, Container
from .validate import normalize_config

log = logging.getLogger(__name__)


@dataclass
class Spec:
    fn: Callable[..., Any]
    slow: bool = False
    locks: Callable[[dict], list[str]] | None = None


class Commands:
    def __init__(self, router: Router, deployer: Deployer, boards: dict[str, Board]) -> None:
        self.router = router
        self.deployer = deployer
        self.boards = boards
        self.busy: set[str] = set()
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="mgmt")
        self.table: dict[str, Spec] = {
            "load_inference": Spec(self.load_inference, True, self._config_names),
            "unload_inference": Spec(self.unload_inference, True, self._names_or_all),
            "reload_inference": Spec(self.reload_inference, True, self._one_name),
            "put_file": Spec(self.put_file, True, self._one_name),
            "add_inference": Spec(self.add_inference, True, self._one_name),
            "container_start": Spec(self.container_start, True, self._container_name),
            "container_stop": Spec(self.container_stop, True, self._container_name),
            "get_container_status": Spec(self.get_container_status, True),
            "get_coprocessor_images": Spec(self.get_coprocessor_images, True),
            "get_images": Spec(self.get_images, True),
            "logs": Spec(self.logs, True),
            "get_coprocessor_handler": Spec(self.get_coprocessor_handler),
            "get_container_handler": Spec(self.get_container_handler),
            "get_queue_info": Spec(self.get_queue_info),
            "delete_queue": Spec(self.delete_queue),
            "board_distribution": Spec(self.board_distribution),
            "container_distribution": Spec(self.container_distribution),
            "ping": Spec(lambda client, args: {"instance": self.router.instance}),
            "stats": Spec(lambda client, args: self.router.stats()),
        }

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    # ---- dispatch (router thread) ----------------------------------------------------

    def submit(self, client: Client, rid: str, cmd: str, args: dict) -> None:
        spec = self.table.get(cmd)
        if spec is None:
            return self._reply(client.id, rid, make_error(900, detail=f"unknown command {cmd!r}"))
        try:
            if not isinstance(args, dict):
                raise make_error(100, "args", detail="command arguments must be a map")
            names = spec.locks(args) if spec.locks else []
            taken = sorted(n for n in names if n in self.busy)
            if taken:
                raise make_error(309, ", ".join(taken))
            if not spec.slow:
                outcome = spec.fn(client, args)
                if isinstance(outcome, concurrent.futures.Future):
                    outcome.add_done_callback(lambda f: self.router.call_soon(self._reply_future, client.id, rid, f))
                    return
                return self._reply(client.id, rid, None, outcome)
        except InfinibrainException as exc:
            return self._reply(client.id, rid, exc)
        except Exception as exc:
            log.exception("command %s failed", cmd)
            return self._reply(client.id, rid, make_error(999, detail=f"{type(exc).__name__}: {exc}"))
        self.busy.update(names)
        self.pool.submit(self._run_slow, spec, client, rid, cmd, args, names)

    def _run_slow(self, spec: Spec, client: Client, rid: str, cmd: str, args: dict, names: list[str]) -> None:
        error, result = None, None

        def tell(info: dict) -> None:  # progress of this command, to the client that sent it
            self.router.call_soon(self.router.send_client, client.id, P.PROGRESS, {"rid": rid, "info": info})

        try:
            with progress.reporting(tell):
                result = spec.fn(client, args)
        except InfinibrainException as exc:
            error = exc
        except Exception as exc:
            log.exception("command %s failed", cmd)
            error = make_error(999, detail=f"{type(exc).__name__}: {exc}")
        self.router.call_soon(self._finish_slow, client.id, rid, names, error, result)

    def _finish_slow(self, cid: str, rid: str, names: list[str], error: Exception | None, result: Any) -> None:
        self.busy.difference_update(names)
        self._reply(cid, rid, error, result)

    def _reply_future(self, cid: str, rid: str, fut: concurrent.futures.Future) -> None:
        exc = fut.exception()
        self._reply(cid, rid, exc if exc is not None else None, None if exc is not None else fut.result())

    def _reply(self, cid: str, rid: str, error: Exception | None, result: Any = None) -> None:
        if error is None:
            header = {"rid": rid, "code": 0, "msg": ""}
        elif isinstance(error, InfinibrainException):
            header = {"rid": rid, "code": error.code, "msg": error.message}
        else:
            header = {"rid": rid, "code": 999, "msg": format_message(999, detail=str(error))}
        self.router.send_client(cid, P.REPLY, header, [P.pack_value(result)])

    # ---- argument helpers ---------------------------------------------------------------

    @staticmethod
    def _str(args: dict, key: str, required: bool = False) -> str:
        value = args.get(key) or ""
        if not isinstance(value, str):
            raise make_error(100, key, detail=f"{key} must be a string")
        if required and not value:
            raise make_error(100, key)
        return value

    def _registered(self, name: str) -> Registration:
        reg = self.router.registrations.get(name)
        if reg is None:
            raise make_error(300, detail=f"inference {name!r}")
        return reg

    def _board(self, name: str) -> Board:
        board = self.boards.get(name)
        if board is None:
            raise make_error(304, detail=f"board {name!r} (known: {', '.join(self.boards)})")
        return board

    def _container(self, args: dict) -> Container:
        self._board(self._str(args, "board", True))
        c = self.router.containers.get(self._str(args, "suffix_name", True))
        if c is None or c.board != args["board"] or c.inference not in self.router.registrations:
            raise make_error(307, detail=f"container {args['suffix_name']!r} on board {args['board']!r}")
        return c

    def _config_names(self, args: dict) -> list[str]:
        configs = args.get("configs")
        if not isinstance(configs, list) or not configs:
            raise make_error(100, "container_config")
        names = [c.get("name") if isinstance(c, dict) else None for c in configs]
        return [n for n in names if isinstance(n, str)]

    def _names_or_all(self, args: dict) -> list[str]:
        name = self._str(args, "inference_name")
        return [name] if name else list(self.router.registrations)

    def _one_name(self, args: dict) -> list[str]:
        return [self._str(args, "inference_name", True)]

    def _container_name(self, args: dict) -> list[str]:
        return [self._container(args).inference]

    # ---- answers -------------------------------------------------------------------------

    def _handler(self, c: Container) -> dict:
        reg = self.router.registrations[c.inference]
        cfg = reg.config
        out = {key: cfg.get(key) for key in CONTAINER_HANDLER_FIELDS if key in cfg}
        out.update(
            suffix_name=c.id,
            image_file=cfg.get("image_filename"),
            allocated_coprocessor=c.board,
            host_location=list(reg.boards),
            max_send_num=cfg["max_send_num"] or self.router.config.default_max_send_num,
            send_timeout=cfg["send_timeout"] or self.router.config.default_send_timeout_ms,
            wait_queue_timeout=cfg["wait_queue_timeout"] or self.router.config.default_wait_queue_timeout_ms,
            deployment=dict(c.deployment),
        )
        return out

    def _containers_of(self, name: str = "", board: str = "") -> list[Container]:
        return sorted(
            (c for c in self.router.containers.values()
             if (not name or c.inference == name) and (not board or c.board == board)
             and c.inference in self.router.registrations and c.board in self.router.registrations[c.inference].boards),
            key=lambda c: c.id,
        )

    def _handlers(self, name: str = "", board: str = "") -> list[dict]:
        return [self._handler(c) for c in self._containers_of(name, board)]

    def _in_use(self, name: str, containers: list[Container]) -> str:
        queued = len(self.router.queues.get(name) or ())
        flying = sum(len(c.in_flight) for c in containers)
        return f"{name!r} has {queued} queued and {flying} running requests" if queued or flying else ""

    # ---- AICluster --------------------------------------------------------------------------

    def load_inference(self, client: Client, args: dict) -> list[dict]:
        configs = [normalize_config(c) for c in args.get("configs") or []]
        if not configs:
            raise make_error(100, "container_config")
        boards = self._board_list(args.get("boards"))
        handlers: list[dict] = []
        for cfg in configs:
            handlers.extend(self._load_one(cfg, boards))
        return handlers

    def _board_list(self, value: Any) -> list[str]:
        if value == "all":
            return list(self.boards)
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise make_error(100, "coprocessor_name")
        for name in names:
            self._board(name)
        return list(dict.fromkeys(names))

    def _load_one(self, cfg: dict, boards: list[str]) -> list[dict]:
        name = cfg["name"]
        created, replaced, written = self.router.call(self._register, cfg, boards)
        written.result(30)
        if replaced:  # new settings: the containers made from the old ones go first
            for board in replaced:
                self.deployer.halt(container_id(name, board))
            boards = list(dict.fromkeys([*replaced, *boards]))
        try:
            for board in boards:
                self.deployer.launch(name, board, rebuild=True)
        except BaseException:
            if created:  # leave nothing half-made behind
                self._roll_back(name, boards)
            raise
        return self.router.call(self._handlers, name)

    def _roll_back(self, name: str, boards: list[str]) -> None:
        """Undo a new registration whose load failed, as far as the boards let us."""
        for board in boards:
            try:
                self.deployer.halt(container_id(name, board), remove_files=True, forget=True)
            except Exception as exc:  # e.g. the board's engine is down: nothing was made there
                log.warning("rolling back %s on %s: %s", name, board, exc)
        self.router.call(self._unregister, name).result(30)

    def _register(self, cfg: dict, boards: list[str]) -> tuple[bool, list[str], concurrent.futures.Future]:
        """Router thread: record the registration; (is it new, the boards whose containers
        run on replaced settings, its write)."""
        name = cfg["name"]
        existing = self.router.registrations.get(name)
        if existing is None:
            self.router.registrations[name] = Registration(name, cfg, {b: Placement() for b in boards})
            return True, [], self.deployer.persist(name)
        old = existing.config
        replaced: list[str] = []
        if old.get("image_tag") != cfg.get("image_tag") and not cfg["force_update"]:
            raise make_error(203, old.get("image_tag"), cfg.get("image_tag"))
        if _settings(old) != _settings(cfg):
            if not cfg["force_update"]:
                raise make_error(302, detail=f"inference {name!r} is registered with other settings; set force_update=True to replace them")
            busy = self._in_use(name, self._containers_of(name))
            if busy:
                raise make_error(303, detail=busy)
            existing.config = cfg
            replaced = [b for b, p in existing.boards.items() if p.running]
        for board in boards:
            existing.boards.setdefault(board, Placement())
        return False, replaced, self.deployer.persist(name)

    def _unregister(self, name: str) -> concurrent.futures.Future:
        self.router.registrations.pop(name, None)
        for req in self.router.take_waiting(lambda r: True, name):
            self.router.end(req, 400, detail=f"inference {name!r} was unloaded while the request waited")
        self.router.queues.pop(name, None)
        for cid in [c.id for c in self.router.containers.values() if c.inference == name]:
            self.router.containers.pop(cid, None)
        return self.deployer.persist(name)

    def unload_inference(self, client: Client, args: dict) -> list[dict]:
        targets = self.router.call(self._unload_targets, args)
        for name, boards in targets.items():
            for board in boards:
                c = self.router.call(self.router.containers.get, container_id(name, board))
                self.deployer.halt(container_id(name, board), remove_files=True, forget=True)
                if c is not None and args.get("delete_image", True):
                    self._delete_image(c)
            self.router.call(self._drop_placements, name, boards).result(30)
        return self.router.call(self._handlers)

    def _delete_image(self, gone: Container) -> None:
        """Remove ``gone``'s image unless another inference on the same engine still uses it."""
        tag = gone.spec.config.get("image_tag")
        if not tag:
            return
        users = self.router.call(lambda: [c for c in self._containers_of() if c is not gone and c.spec.config.get("image_tag") == tag])
        engines = {id(self.boards[c.board].engine): self.boards[c.board].engine for c in users}.values()
        mine = self.boards[gone.board].engine.identity()
        if any(engine.identity() == mine for engine in engines):
            return
        gone.runtime.remove_image(gone.spec)

    def _unload_targets(self, args: dict) -> dict[str, list[str]]:
        """Router thread: inference -> boards to unload it from; 303 if that would cut requests."""
        name = self._str(args, "inference_name")
        board = self._str(args, "coprocessor_name")
        if board:
            self._board(board)
        targets = {}
        for n in [name] if name else list(self.router.registrations):
            reg = self._registered(n)
            boards = [b for b in reg.boards if not board or b == board]
            whole = len(boards) == len(reg.boards)
            affected = [c for c in self._containers_of(n) if c.board in boards]
            # Unloading some of its boards leaves the queue to the others: only running
            # requests are in the way then.
            cuts = whole or any(c.in_flight for c in affected)
            busy = self._in_use(n, affected) if cuts else ""
            if busy:
                raise make_error(303, detail=busy)
            targets[n] = boards
        return targets

    def _drop_placements(self, name: str, boards: list[str]) -> concurrent.futures.Future:
        reg = self.router.registrations.get(name)
        if reg is not None:
            for b in boards:
                reg.boards.pop(b, None)
            if not reg.boards:
                return self._unregister(name)
        return self.deployer.persist(name)

    def reload_inference(self, client: Client, args: dict) -> list[dict]:
        name = self._str(args, "inference_name", True)
        reg = self.deployer.registry.read(name)  # 205 / 206 / 207
        unknown = [b for b in reg.boards if b not in self.boards]
        if unknown:
            raise make_error(207, detail=f"it places {name!r} on unknown board {unknown[0]!r}")
        for cid in self.router.call(lambda: [c.id for c in self._containers_of(name)]):
            self.deployer.halt(cid, forget=True)
        self.router.call(self._replace_registration, reg).result(30)
        for board, placement in reg.boards.items():
            if placement.running:
                self.deployer.launch(name, board, rebuild=True)
            else:
                self.router.call(self.deployer.record, name, board)
        return self.router.call(self._handlers, name)

    def _replace_registration(self, reg: Registration) -> concurrent.futures.Future:
        self.router.registrations[reg.name] = reg
        return self.deployer.persist(reg.name)

    def put_file(self, client: Client, args: dict) -> None:
        name = self._str(args, "inference_name", True)
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
        sizes = {src: os.path.getsize(src) for src in sources}
        target = info.get("To") or "."
        if not isinstance(target, str):
            raise make_error(101, "To")

        def containers() -> list[Container]:
            self._registered(name)
            found = self._containers_of(name)
            busy = self._in_use(name, found)
            if busy:
                raise make_error(303, detail=busy)
            return found

        for c in self.router.call(containers):
            for src in sources:
                where = c.runtime.put_file(c.spec, src, target)
                self.router.metrics.sent_to_board(c.board, sizes[src])
                log.info("put_file: %s -> %s:%s", src, c.id, where)
        return None

    def get_container_status(self, client: Client, args: dict) -> list[dict]:
        name = self._str(args, "inference_name")

        def snapshot() -> list[tuple[Container, dict]]:
            if name:
                self._registered(name)
            rows = []
            for c in self._containers_of(name):
                row = self._handler(c)
                row.update(
                    connect_status="connected" if c.connected else "disconnected",
                    operate=("Busy" if c.in_flight else "Free") if c.connected else "Unknown",
                    queue_num=len(self.router.queues.get(c.inference) or ()),
                    send_data_num=len(c.in_flight),
                    net_io=f"{human_bytes(c.tx_bytes)} / {human_bytes(c.rx_bytes)}",
                    ports=f"{self.router.config.port + P.CONTAINER_OUT}/tcp, {self.router.config.port + P.CONTAINER_IN}/tcp",
                    created=self.router.registrations[c.inference].boards[c.board].created,
                    distribution=self.router.registrations[c.inference].boards[c.board].distribution,  # beyond §7.6
                )
                rows.append((c, row))
            return rows

        out = []
        for c, row in self.router.call(snapshot):
            row.update(c.runtime.stats(c.spec))
            out.append(row)
        return out

    def get_coprocessor_handler(self, client: Client, args: dict) -> list[dict]:
        return [{"name": b.name, "ip": b.ip} for b in self._boards_of(self._str(args, "inference_name"))]

    def _boards_of(self, name: str) -> list[Board]:
        if not name:
            return list(self.boards.values())
        reg = self._registered(name)
        return [self.boards[b] for b in reg.boards if b in self.boards]

    def get_coprocessor_images(self, client: Client, args: dict) -> list[dict]:
        name = self._str(args, "inference_name")
        boards = self.router.call(self._boards_of, name)
        return [self._images(b) for b in boards]

    def get_images(self, client: Client, args: dict) -> list[dict]:
        board = self._board(self._str(args, "board", True))
        return [self._images(board)]

    def _images(self, board: Board) -> dict:
        """A board's images: its Docker engine's, and the working directory of each
        process container (which is what such a container is made from)."""
        containers = self.router.call(self._containers_of, "", board.name)
        images = []
        uses_engine = any(c.runtime.kind in ("docker", "nvidia") for c in containers)
        if board.link is not None:
            board.link.client()  # a board that cannot be reached is an error, not an empty list
        try:
            with board.engine.errors(f"board {board.name!r}: listing images"):
                images = board.engine.images()
        except InfinibrainException as exc:
            if uses_engine or exc.code != 500:
                raise
            log.debug("board %s has no Docker engine (%s); listing its process containers only", board.name, exc.message)
        for c in containers:
            if c.runtime.kind in ("docker", "nvidia"):
                continue
            cfg = c.spec.config
            images.append(
                {
                    "tag": cfg.get("image_tag") or f"{c.inference}:{cfg['implementation_type'].lower()}",
                    "inference_name": c.inference,
                    "implementation_type": cfg["implementation_type"],
                    "size": c.runtime.files_size(c.spec),
                    "path": str(c.spec.work_dir),
                }
            )
        return {"name": board.name, "ip": board.ip, "images": images}

    def get_container_handler(self, client: Client, args: dict) -> list[dict]:
        name = self._str(args, "inference_name")
        if name:
            self._registered(name)
        return self._handlers(name)

    def _queue_matches(self, args: dict) -> list:
        name = self._str(args, "inference_name")
        if name:
            self._registered(name)
        rno, pid = args.get("request_no") or 0, args.get("pid") or 0
        if not isinstance(rno, int) or not isinstance(pid, int):
            raise make_error(100, "request_no" if not isinstance(rno, int) else "pid", detail="must be an integer")
        return [
            r
            for n, waiting in self.router.queues.items()
            if not name or n == name
            for r in waiting
            if (not rno or r.rid == str(rno)) and (not pid or r.pid == pid)
        ]

    @staticmethod
    def _queue_info(requests: list) -> list[dict]:
        return [
            {
                "request_no": int(r.rid) if r.rid.isdigit() else 0,
                "inference_name": r.inference,
                "pid": r.pid,
                "mng_queue_in": datetime.fromtimestamp(r.queued_wall, timezone.utc).isoformat(timespec="milliseconds"),
            }
            for r in requests
        ]

    def get_queue_info(self, client: Client, args: dict) -> list[dict]:
        return self._queue_info(self._queue_matches(args))

    def delete_queue(self, client: Client, args: dict) -> list[dict]:
        matches = self._queue_matches(args)
        force = bool(args.get("force_delete"))
        pid = args.get("pid") or 0
        if not force:
            if pid and pid != client.pid:
                raise make_error(308, detail=f"the queue of pid {pid} belongs to another process; use force_delete=True")
            matches = [r for r in matches if r.pid == client.pid]
        doomed = set(map(id, matches))
        for r in self.router.take_waiting(lambda r: id(r) in doomed):
            self.router.end(r, 306, detail=f"deleted from the send-wait queue by delete_queue of pid {client.pid}")
        return self._queue_info([r for w in self.router.queues.values() for r in w])

    # ---- CoprocessorHandler / ContainerHandler ------------------------------------------

    def board_distribution(self, client: Client, args: dict) -> concurrent.futures.Future:
        board = self._board(self._str(args, "board", True)).name
        name = self._str(args, "inference_name")
        on = "on" if args.get("on") else "off"
        if name:
            reg = self._registered(name)
            if board not in reg.boards:
                raise make_error(300, detail=f"inference {name!r} is not registered on board {board!r}")
        containers = self._containers_of(name, board)
        return self._set_distribution(containers, on)

    def container_distribution(self, client: Client, args: dict) -> concurrent.futures.Future:
        c = self._container(args)
        name = self._str(args, "inference_name")
        if name and name != c.inference:
            self._registered(name)
            raise make_error(307, detail=f"container {c.id!r} does not serve {name!r}")
        return self._set_distribution([c], "on" if args.get("on") else "off")

    def _set_distribution(self, containers: list[Container], on: str) -> concurrent.futures.Future:
        for c in containers:
            self.router.registrations[c.inference].boards[c.board].distribution = on
        names = sorted({c.inference for c in containers})
        for n in names:
            self.router.pump(n)
        result = [{"name": c.inference, "suffix_name": c.id, "distribution": on} for c in containers]
        writes = [self.deployer.persist(n) for n in names]
        done: concurrent.futures.Future = concurrent.futures.Future()
        if not writes:
            done.set_result(result)
            return done
        remaining = [len(writes)]

        def one_written(f: concurrent.futures.Future) -> None:
            remaining[0] -= 1
            if f.exception() is not None and not done.done():
                done.set_exception(f.exception())
            elif remaining[0] == 0 and not done.done():
                done.set_result(result)

        for w in writes:
            w.add_done_callback(one_written)
        return done

    def add_inference(self, client: Client, args: dict) -> list[dict]:
        board = self.router.call(lambda: self._board(self._str(args, "board", True)).name)
        name = self._str(args, "inference_name", True)

        def place() -> None:
            reg = self._registered(name)
            reg.boards.setdefault(board, Placement())
            return self.deployer.persist(name)

        self.router.call(place).result(30)
        self.deployer.launch(name, board, rebuild=True)
        return self.router.call(self._handlers, "", board)

    def container_start(self, client: Client, args: dict) -> dict:
        c = self.router.call(self._container, args)
        self.deployer.launch(c.inference, c.board, rebuild=False)
        return self._status_of(client, c)

    def container_stop(self, client: Client, args: dict) -> dict:
        c = self.router.call(self._container, args)
        self.deployer.halt(c.id)

        def mark_stopped() -> concurrent.futures.Future:
            self.router.registrations[c.inference].boards[c.board].running = False
            return self.deployer.persist(c.inference)

        self.router.call(mark_stopped).result(30)
        return self._status_of(client, c)

    def _status_of(self, client: Client, c: Container) -> dict:
        rows = self.get_container_status(client, {"inference_name": c.inference})
        return next(r for r in rows if r["suffix_name"] == c.id)

    def logs(self, client: Client, args: dict) -> str:
        c = self.router.call(self._container, args)
        lines = args.get("lines") or 100
        return c.runtime.logs(c.spec, int(lines))


def _settings(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k != "force_update"}
