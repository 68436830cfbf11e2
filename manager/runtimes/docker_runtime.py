"""``docker`` and ``nvidia`` containers: real containers on a board's Docker engine.

``prepare`` makes sure the image is there (loading ``image_path``/``image_filename``, a
``docker save`` tar, when ``image_tag`` is missing), creates the container from
``image_tag``, ``run_command`` and ``run_option`` and copies ``script_path`` and the
``copy`` entries into it; ``start`` starts it. Containers use the host network unless
``run_option`` names another, get the connection environment (so ``Connector()`` needs no
arguments) and carry labels naming the manager, board, inference and suffix, so several
boards and managers can share one engine. ``nvidia`` is the same with the NVIDIA runtime,
and fails with a clear 302 on an engine without it: never a silent fallback to runc.

Worker threads (operations.py), but ``exited``, which the router thread reads from the engine's poll (a thread of engine.py's).
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import posixpath
import shlex
import tarfile
import tempfile
import time
from datetime import datetime
from pathlib import Path

import docker.errors

from infinibrain.errors import make_error

from .base import ContainerSpec, RunInfo
from .engine import LABEL_MANAGER, Engine
from .process import human_bytes
from ..run_options import parse_run_option
from ..settings import RUNNER_COMMAND

log = logging.getLogger(__name__)

DEFAULT_WORKDIR = "/app"  # where script_path goes when neither run_option nor the image names one
LABEL_SPEC = "infinibrain.spec"


class DockerRuntime:
    def __init__(self, kind: str, engine: Engine, stop_timeout: float) -> None:
        self.kind = kind  # "docker" or "nvidia"
        self.engine = engine
        self.stop_timeout = stop_timeout
        self._ours: set[str] = set()  # containers this manager started or adopted
        self._cpu_samples: dict[str, tuple[int, int]] = {}

    # ---- names ------------------------------------------------------------------------

    def name(self, spec: ContainerSpec) -> str:
        return f"ib-{self.engine.manager_id}-{spec.container_id}"

    def labels(self, spec: ContainerSpec) -> dict[str, str]:
        return {
            LABEL_MANAGER: self.engine.manager_id,
            "infinibrain.board": spec.board.name,
            "infinibrain.inference": spec.inference,
            "infinibrain.suffix": spec.suffix_name,
            "infinibrain.instance": spec.container_id,
            LABEL_SPEC: spec_hash(spec),
        }

    def _doing(self, spec: ContainerSpec, what: str) -> str:
        return f"board {spec.board.name!r}: {what} {spec.container_id}"

    # ---- creating ------------------------------------------------------------------------

    def create_args(self, spec: ContainerSpec) -> dict:
        """The ``containers.create`` arguments of ``spec`` (302 for a bad setting)."""
        cfg = spec.config  # validated: image_tag is set (validate._check_docker)
        args = parse_run_option(cfg.run_option)
        if self.kind == "nvidia":
            if args.get("runtime", "nvidia") != "nvidia":
                raise make_error(302, detail=f"run_option --runtime {args['runtime']} contradicts implementation_type 'nvidia'")
            args["runtime"] = "nvidia"
        if "runtime" in args:
            offered = self.engine.runtimes()
            if args["runtime"] not in offered:
                raise make_error(
                    302,
                    detail=f"the Docker engine of board {spec.board.name!r} has no {args['runtime']!r} runtime "
                    f"(it has: {', '.join(offered)}); install the NVIDIA Container Toolkit there, or use implementation_type 'docker'",
                )
        env = [f"{k}={v}" for k, v in sorted(spec.env.items()) if k.startswith("INFINIBRAIN_")]
        args["environment"] = ["PYTHONUNBUFFERED=1", *env, *args.get("environment", [])]
        args.setdefault("network_mode", "host")
        # An init process as PID 1 passes docker stop's SIGTERM on to the module (a plain
        # PID 1 ignores it, and every stop would wait for the SIGKILL) and reaps zombies.
        args.setdefault("init", True)
        args.update(
            image=cfg.image_tag,
            command=shlex.split(cfg.run_command) if cfg.run_command else list(RUNNER_COMMAND) if cfg.runner_modules else None,
            name=self.name(spec),
            labels=self.labels(spec),
            detach=True,
        )
        return args

    def prepare(self, spec: ContainerSpec) -> dict:
        with self.engine.errors(self._doing(spec, "creating")):
            args = self.create_args(spec)
            tar = spec.config.image_file
            image, figures = self.engine.ensure_image(args["image"], tar)
            if spec.config.script_path and "working_dir" not in args and not image["Config"].get("WorkingDir"):
                args["working_dir"] = DEFAULT_WORKDIR
            self.remove(spec)
            container = self.engine.client.containers.create(**args)
        try:
            with self.engine.errors(self._doing(spec, "copying files into")):
                workdir = container.attrs["Config"].get("WorkingDir") or "/"
                if spec.config.script_path:
                    self._put(container, workdir, _tree_entries(Path(spec.config.script_path)))
                for entry in spec.config.copies:
                    self._copy_in(container, workdir, Path(entry["From"]), entry["To"])
                self._put_overlay(container, workdir, spec.files)
        except BaseException:
            self.remove(spec)  # leave no half-made container behind
            raise
        log.info("created %s from %s on %s", container.name, args["image"], self.engine.url)
        return figures

    def prepared(self, spec: ContainerSpec) -> bool:
        with self.engine.errors(self._doing(spec, "inspecting")):
            attrs = self.engine.refresh(self.name(spec))
        return attrs is not None and attrs["Config"]["Labels"].get(LABEL_SPEC) == spec_hash(spec)

    # ---- files ---------------------------------------------------------------------------

    def _put_overlay(self, container, workdir: str, files: Path | None) -> None:
        """What put_file gave the inference: relative targets under the working
        directory, absolute ones from the root (as put_file writes them)."""
        if files is None:
            return
        for part, base in (("rel", workdir), ("abs", "/")):
            if (files / part).is_dir():
                self._put(container, base, _tree_entries(files / part))

    def files_size(self, spec: ContainerSpec) -> int:
        return 0  # a Docker container's size is its image's (get_images lists the engine's)

    def _copy_in(self, container, workdir: str, source: Path, to: str) -> None:
        target = posixpath.join(workdir, to)
        if to.endswith("/") or self._is_dir(container, target):
            parent, name = target, source.name
        else:
            parent, name = posixpath.split(target.rstrip("/"))
        if source.is_dir():
            self._put(container, posixpath.join(parent, name), _tree_entries(source))
        else:
            self._put(container, parent, [(name, source)])

    def _is_dir(self, container, path: str) -> bool:
        stat = self._stat(container, path)
        return stat is not None and bool(stat.get("mode", 0) & (1 << 31))  # Go's os.ModeDir

    def _stat(self, container, path: str) -> dict | None:
        # HEAD /containers/{id}/archive tells whether a path exists without sending its
        # contents; the SDK has no call for it, but its client is a requests session.
        api = self.engine.client.api
        res = api.head(api._url("/containers/{0}/archive", container.id), params={"path": path})
        if res.status_code == 404:
            return None
        res.raise_for_status()
        return json.loads(base64.b64decode(res.headers["X-Docker-Container-Path-Stat"]))

    def _put(self, container, folder: str, entries: list[tuple[str, Path]]) -> None:
        """Write ``entries`` (path under ``folder`` -> file here) into the container,
        making ``folder`` and any folders it lacks."""
        folder = posixpath.normpath(folder)
        base, missing = folder, list[str]()
        while base != "/" and self._stat(container, base) is None:
            base, tail = posixpath.split(base)
            missing.insert(0, tail)
        prefix = posixpath.join(*missing) if missing else ""
        # On disk, not in memory: script_path may hold models of gigabytes.
        with tempfile.TemporaryFile() as buf:
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for i in range(len(missing)):
                    info = tarfile.TarInfo(posixpath.join(*missing[: i + 1]))
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
                    tar.addfile(info)
                for name, path in entries:
                    tar.add(str(path), arcname=posixpath.join(prefix, name) if prefix else name, recursive=False)
            buf.seek(0)
            container.put_archive(base, buf)

    def put_file(self, spec: ContainerSpec, source: str, target_dir: str) -> str:
        name = os.path.basename(source)
        with self.engine.errors(self._doing(spec, "copying a file into")):
            container = self._container(spec)
            folder = posixpath.join(container.attrs["Config"].get("WorkingDir") or "/", target_dir)
            final = posixpath.normpath(posixpath.join(folder, name))
            running = container.attrs["State"].get("Running")
            if not running:  # nothing reads it while stopped: write it in place
                self._put(container, folder, [(name, Path(source))])
                return final
            # Running: write beside the target, then rename inside the container, so the
            # module never reads half a file.
            temp = f".{name}.ib-{os.getpid()}"
            self._put(container, folder, [(temp, Path(source))])
            moved = container.exec_run(["mv", "-f", posixpath.join(folder, temp), final])
            if moved.exit_code != 0:
                log.warning("put_file into %s: mv failed (%s); writing in place", container.name, moved.output[:200])
                self._put(container, folder, [(name, Path(source))])
        return final

    # ---- running -------------------------------------------------------------------------

    def _container(self, spec: ContainerSpec):
        try:
            return self.engine.client.containers.get(self.name(spec))
        except docker.errors.NotFound:
            raise make_error(307, detail=f"container {spec.container_id} is not on the Docker engine of board {spec.board.name!r}") from None

    def start(self, spec: ContainerSpec) -> RunInfo:
        with self.engine.errors(self._doing(spec, "starting")):
            container = self._container(spec)
            try:
                container.start()
            except docker.errors.APIError as exc:
                raise make_error(302, detail=f"container {spec.container_id} cannot be started: {exc.explanation or exc}") from None
            attrs = self.engine.refresh(self.name(spec)) or {}
        self._ours.add(self.name(spec))
        self._cpu_samples.pop(spec.container_id, None)
        log.info("started %s (%s) on board %s", self.name(spec), spec.config.image_tag, spec.board.name)
        return RunInfo(attrs.get("State", {}).get("Pid") or None, None, _iso(attrs.get("Created", "")))

    def adopt(self, spec: ContainerSpec, pid: int | None, pid_start: int | None) -> bool:
        with self.engine.errors(self._doing(spec, "adopting")):
            attrs = self.engine.refresh(self.name(spec))
        if attrs is None or not attrs["State"].get("Running") or attrs["Config"]["Labels"].get(LABEL_SPEC) != spec_hash(spec):
            return False
        self._ours.add(self.name(spec))
        log.info("adopted %s left running by an earlier manager", self.name(spec))
        return True

    def alive_now(self, spec: ContainerSpec) -> bool:
        return self.exited(spec) is None  # the engine's state is current (its event poller)

    def exited(self, spec: ContainerSpec) -> int | None:
        name = self.name(spec)
        if name not in self._ours:
            return 0
        state = self.engine.state(name)
        if state is None:
            return -1  # removed behind our back
        running, code = state
        return None if running else (code if code is not None else -1)

    def stop(self, spec: ContainerSpec) -> None:
        name = self.name(spec)
        with self.engine.errors(self._doing(spec, "stopping")):
            try:
                self.engine.client.api.stop(name, timeout=int(max(1, self.stop_timeout)))
            except docker.errors.NotFound:
                pass
            self.engine.refresh(name)
        self._ours.discard(name)
        log.info("stopped %s", name)

    def remove(self, spec: ContainerSpec) -> None:
        name = self.name(spec)
        with self.engine.errors(self._doing(spec, "removing")):
            try:
                self.engine.client.api.remove_container(name, force=True)
            except docker.errors.NotFound:
                pass
            self.engine.refresh(name)
        self._ours.discard(name)

    def remove_image(self, spec: ContainerSpec) -> bool:
        with self.engine.errors(self._doing(spec, "removing the image of")):
            return self.engine.remove_image(spec.config.image_tag or "")

    def logs(self, spec: ContainerSpec, lines: int) -> str:
        with self.engine.errors(self._doing(spec, "reading the log of")):
            try:
                out = self.engine.client.api.logs(self.name(spec), tail=lines)
            except docker.errors.NotFound:
                return ""
        return out.decode(errors="replace").rstrip("\n")

    # ---- figures --------------------------------------------------------------------------

    def stats(self, spec: ContainerSpec) -> dict:
        with self.engine.errors(self._doing(spec, "reading the figures of")):
            attrs = self.engine.refresh(self.name(spec))
            if attrs is None:
                return {"status": "removed", "created": "", "ports": "", "cpu_proc": "0.00%", "mem_usage": "0B", "mem_proc": "0.00%", "block_io": "0B / 0B"}
            state = attrs["State"]
            row = {"status": state["Status"] if state["Running"] else f"{state['Status']} ({state.get('ExitCode')})",
                   "created": _iso(attrs["Created"]), "ports": _ports(attrs)}
            if not state["Running"]:
                return {**row, "cpu_proc": "0.00%", "mem_usage": "0B", "mem_proc": "0.00%", "block_io": "0B / 0B"}
            raw = self.engine.client.api.stats(self.name(spec), stream=False, one_shot=True)
        row.update(self._figures(spec, attrs, raw))
        return row

    def _figures(self, spec: ContainerSpec, attrs: dict, raw: dict) -> dict:
        """What ``docker stats`` shows, from one sample and the previous one."""
        cpu = raw.get("cpu_stats") or {}
        total = (cpu.get("cpu_usage") or {}).get("total_usage", 0)
        system = cpu.get("system_cpu_usage", 0)
        cores = cpu.get("online_cpus") or len((cpu.get("cpu_usage") or {}).get("percpu_usage") or [1])
        last = self._cpu_samples.get(spec.container_id)
        self._cpu_samples[spec.container_id] = (total, system)
        if last and system > last[1]:
            cpu_pct = 100.0 * (total - last[0]) / (system - last[1]) * cores
        else:  # the first look: the average since the container started
            up = max(time.time() - _epoch(attrs["State"].get("StartedAt", "")), 1e-3)
            cpu_pct = 100.0 * total / 1e9 / up
        mem = raw.get("memory_stats") or {}
        extra = mem.get("stats") or {}
        used = max(0, mem.get("usage", 0) - extra.get("total_inactive_file", extra.get("inactive_file", 0)))
        limit = mem.get("limit") or 1
        figures = {
            "cpu_proc": f"{cpu_pct:.2f}%",
            "mem_usage": f"{human_bytes(used)} / {human_bytes(limit)}",
            "mem_proc": f"{100.0 * used / limit:.2f}%",
            "block_io": _block_io(raw),
        }
        networks = raw.get("networks")
        if networks:  # on the host network the engine has no figures; ours stand then
            rx = sum(n.get("rx_bytes", 0) for n in networks.values())
            tx = sum(n.get("tx_bytes", 0) for n in networks.values())
            figures["net_io"] = f"{human_bytes(rx)} / {human_bytes(tx)}"
        return figures


def spec_hash(spec: ContainerSpec) -> str:
    """What the container was made from: a changed setting means a new container."""
    made_of = {"config": spec.config.to_dict(), "env": {k: v for k, v in spec.env.items() if k.startswith("INFINIBRAIN_")}}
    return hashlib.sha256(json.dumps(made_of, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _tree_entries(root: Path) -> list[tuple[str, Path]]:
    """Every file and folder under ``root``, as (path relative to root, path here)."""
    out = []
    for path in sorted(root.rglob("*")):
        if "__pycache__" not in path.parts:
            out.append((path.relative_to(root).as_posix(), path))
    return out


def _ports(attrs: dict) -> str:
    ports = (attrs.get("NetworkSettings") or {}).get("Ports") or {}
    shown = []
    for inside, bindings in sorted(ports.items()):
        for b in bindings or [None]:
            shown.append(f"{b['HostIp']}:{b['HostPort']}->{inside}" if b else inside)
    return ", ".join(shown)


def _block_io(raw: dict) -> str:
    entries = (raw.get("blkio_stats") or {}).get("io_service_bytes_recursive") or []
    read = sum(e.get("value", 0) for e in entries if e.get("op", "").lower() == "read")
    write = sum(e.get("value", 0) for e in entries if e.get("op", "").lower() == "write")
    return f"{human_bytes(read)} / {human_bytes(write)}"


def _epoch(stamp: str) -> float:
    """The engine's RFC 3339 time (nanoseconds, Z) as seconds since the epoch."""
    try:
        return datetime.fromisoformat(stamp[:26].rstrip("Z") + "+00:00").timestamp()
    except ValueError:
        return time.time()


def _iso(stamp: str) -> str:
    return stamp[:19] + "+00:00" if stamp else ""
