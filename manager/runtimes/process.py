"""``process`` containers: ``run_command`` as a plain process on a board.

The container is a working directory holding the files of ``script_path`` and the
``copy`` entries; its process runs there with the connection environment, in its own
session (so stopping it stops anything it started), writing stdout and stderr to a log
file that survives the process. Paths inside the container are relative to the working
directory: ``/etc/cop/`` means ``<work_dir>/etc/cop/``, and nothing may point outside it.
The same code serves this machine and remote boards: what differs is the ``host``
(runtimes/hosts.py) it does its file and process work through.

Of ``run_option`` a process container takes ``-e/--env NAME=VALUE`` (added to its
environment) and ``-u/--user NAME``: it runs as that user (on this host, with a manager
that runs as root); its working folder becomes that user's, and it cannot read the
manager's state (keys, registry, other containers' folders), which stays owner-only. On
an ssh board a process container runs as the board's ``ssh_user``: give each board a user
of its own. (``--restart`` is read for every type: manager/restarts.py.)

Worker threads (operations.py), but ``exited``, which the router thread calls (it reads the host's poll, never the network).
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
import time
from datetime import datetime, timezone
from pathlib import Path

from infinibrain import security
from infinibrain.errors import make_error

from ..run_options import option_value, option_values
from ..settings import RUNNER_COMMAND, one_or_many
from .base import ContainerSpec, RunInfo
from .hosts import LocalHost, SSHHost

log = logging.getLogger(__name__)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def safe_join(root: Path, inside: str) -> Path:
    """``inside`` (a path in the container) as a path under ``root``; 302 if it escapes."""
    rel = os.path.normpath(inside.lstrip("/")) if inside.strip("/") else "."
    if rel == ".." or rel.startswith("../"):
        raise make_error(302, detail=f"path {inside!r} points outside the container")
    return root / rel


def within(real: str, top: str) -> bool:
    """Whether resolved path ``real`` is resolved folder ``top`` or under it."""
    return real == top or real.startswith(top.rstrip("/") + "/")


class ProcessRuntime:
    kind = "process"

    def __init__(self, stop_timeout: float, host: LocalHost | SSHHost | None = None) -> None:
        self.stop_timeout = stop_timeout
        self.host = host or LocalHost()
        self._pids: dict[str, tuple[int, int]] = {}  # container id -> (pid, start time)
        self._cpu_samples: dict[str, tuple[float, float]] = {}

    # ---- files -----------------------------------------------------------------

    def prepare(self, spec: ContainerSpec) -> None:
        host, work = self.host, str(spec.work_dir)
        if spec.config.script_path and isinstance(host, LocalHost) \
                and within(os.path.realpath(work), os.path.realpath(spec.config.script_path)):
            # Copying it would copy the copy into itself until paths grow too long.
            raise make_error(302, detail=f"script_path {spec.config.script_path!r} holds the folder of the board's "
                                         f"containers ({os.path.dirname(work)}): give a folder that does not contain "
                                         "the manager's state_dir (or set the board's work_dir elsewhere)")
        fresh = host.make_fresh(os.path.dirname(work), f".{spec.container_id}.")
        try:
            if spec.config.script_path:
                host.put(Path(spec.config.script_path), fresh)
            for entry in spec.config.copies:
                self._copy_in(Path(entry["From"]), fresh, entry["To"])
            # What put_file gave the inference; inside a process container every path,
            # absolute or not, is under its working folder.
            for part in ("rel", "abs"):
                if spec.files is not None and (spec.files / part).is_dir():
                    host.put(spec.files / part, fresh)
            self._check_scripts(spec, fresh)
            self._write_env_file(spec, fresh)
            user = run_as(spec)
            if user is not None:
                host.give(fresh, user, work)
        except BaseException:
            host.rmtree(fresh)
            raise
        # Swap the new tree in whole, so a container never sees half of its files.
        host.swap_in(fresh, work)

    def _inside(self, root: str, to: str) -> str:
        """``to`` under ``root``, refused (302) if it leads out, by ``..`` or by a symbolic link."""
        target = str(safe_join(Path(root), to))
        if not within(self.host.realpath(target), self.host.realpath(root)):
            raise make_error(302, detail=f"path {to!r} points outside the container (through a symbolic link)")
        return target

    def _copy_in(self, source: Path, root: str, to: str) -> None:
        target = self._inside(root, to)
        if to.endswith("/") or self.host.is_dir(target):
            target = os.path.join(target, source.name)
        self.host.put(source, target)

    def _check_scripts(self, spec: ContainerSpec, root: str) -> None:
        """Each file a module names is there: its scripts, and what the model runner will open."""
        wanted = [(m, "script", "is not in script_path") for m in spec.config.modules]
        wanted += [(m, key, "is not among the inference's files (script_path, copy or put_file bring it)")
                   for m in spec.config.runner_modules for key in ("model", "hooks")]
        for module, key, missing in wanted:
            for name in one_or_many(module.get(key) or None):
                if not self.host.is_file(str(safe_join(Path(root), name))):
                    raise make_error(302, detail=f"inference_modules.{key} {name!r} {missing}")

    def _write_env_file(self, spec: ContainerSpec, root: str) -> None:
        # Secrets stay in the process environment only: this file is for people to read.
        lines = [f"{k}={shlex.quote(v)}" for k, v in sorted(spec.env.items())
                 if k.startswith("INFINIBRAIN_") and k not in security.SECRET_ENV]
        self.host.write_text(os.path.join(root, "connection.env"), "\n".join(lines) + "\n")

    def put_file(self, spec: ContainerSpec, source: str, target_dir: str) -> str:
        target = Path(self._inside(str(spec.work_dir), target_dir)) / Path(source).name
        self.host.put_atomic(source, str(target))
        return str(target.relative_to(spec.work_dir))

    def prepared(self, spec: ContainerSpec) -> bool:
        return self.host.is_dir(str(spec.work_dir))

    def remove(self, spec: ContainerSpec) -> None:
        self.host.rmtree(str(spec.work_dir))

    def remove_image(self, spec: ContainerSpec) -> bool:
        return False  # a process container has no image: its files are script_path's

    def logs(self, spec: ContainerSpec, lines: int) -> str:
        return self.host.tail(str(spec.log_path), lines)

    def files_size(self, spec: ContainerSpec) -> int:
        """What get_images reports as the size of the container's "image": its files."""
        return self.host.tree_size(str(spec.work_dir))

    # ---- processes ---------------------------------------------------------------

    def command(self, spec: ContainerSpec) -> list[str]:
        run = spec.config.run_command
        if run:
            argv = shlex.split(run)
        else:
            scripts = [s for m in spec.config.modules for s in one_or_many(m.get("script"))]
            if scripts:
                argv = ["python", scripts[0]]
            elif spec.config.runner_modules:
                argv = list(RUNNER_COMMAND)
            else:
                raise make_error(302, detail="run_command is required when inference_modules names no script and no model")
        # "python" is the board's interpreter that can import infinibrain (the manager's own here).
        if argv[0] in ("python", "python3"):
            argv[0] = self.host.python
        return argv

    def start(self, spec: ContainerSpec) -> RunInfo:
        argv = self.command(spec)
        env = dict(spec.env)
        for entry in option_values(spec.config.run_option, "--env"):
            key, _, value = entry.partition("=")
            env[key] = value
        pid, start = self.host.spawn(argv, str(spec.work_dir), env, str(spec.log_path), run_as(spec))
        self._pids[spec.container_id] = (pid, start)
        self._cpu_samples.pop(spec.container_id, None)
        log.info("started %s (pid %d) on %s: %s", spec.container_id, pid, self.host.name, shlex.join(argv))
        return RunInfo(pid, start, _now_iso())

    def adopt(self, spec: ContainerSpec, pid: int | None, pid_start: int | None) -> bool:
        if not pid or pid_start is None or not self.host.adopt(pid, pid_start, str(spec.work_dir)):
            return False
        self._pids[spec.container_id] = (pid, pid_start)
        log.info("adopted %s (pid %d) left running by an earlier manager", spec.container_id, pid)
        return True

    def _alive(self, container_id: str) -> bool:
        pid, start = self._pids.get(container_id, (0, 0))
        return bool(pid) and self.host.alive(pid, start)

    def exited(self, spec: ContainerSpec) -> int | None:
        if spec.container_id not in self._pids:
            return 0
        if self._alive(spec.container_id):
            return None
        return self.host.exit_code(self._pids[spec.container_id][0], str(spec.work_dir))

    def alive_now(self, spec: ContainerSpec) -> bool:
        pid, start = self._pids.get(spec.container_id, (0, 0))
        return bool(pid) and self.host.start_time(pid) == start

    def stop(self, spec: ContainerSpec) -> None:
        cid = spec.container_id
        if cid not in self._pids:
            return
        pid, start = self._pids[cid]
        for sig, wait in ((signal.SIGTERM, self.stop_timeout), (signal.SIGKILL, 5.0)):
            # Asked now, not from a poll: the pid must still be ours before it is signalled.
            if self.host.start_time(pid) != start:
                break
            self.host.signal_group(pid, sig)
            deadline = time.monotonic() + wait
            while self.host.start_time(pid) == start and time.monotonic() < deadline:
                time.sleep(0.02)
        self.host.forget(pid)
        self._pids.pop(cid, None)
        log.info("stopped %s (pid %d)", cid, pid)

    def stats(self, spec: ContainerSpec) -> dict:
        cid = spec.container_id
        if cid not in self._pids or not self._alive(cid):
            code = self.exited(spec)
            status = "stopped" if cid not in self._pids else f"exited ({code})"
            return {"status": status, "cpu_proc": "0.00%", "mem_usage": "0B", "mem_proc": "0.00%", "block_io": "0B / 0B"}
        proc = self.host.proc_files(self._pids[cid][0])
        rss = _rss_bytes(proc["statm"])
        return {
            "status": "running",
            "cpu_proc": self._cpu_percent(cid, proc),
            "mem_usage": human_bytes(rss),
            "mem_proc": f"{100.0 * rss / _mem_total(proc['meminfo']):.2f}%",
            "block_io": _block_io(proc["io"]),
        }

    def _cpu_percent(self, cid: str, proc: dict[str, str]) -> str:
        """CPU use since the previous status call (or since start), as docker stats shows it."""
        if ")" not in proc["stat"] or not proc["uptime"]:
            return "0.00%"
        fields = proc["stat"].rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        now = time.monotonic()
        if cid in self._cpu_samples:
            last_cpu, last_t = self._cpu_samples[cid]
        else:
            uptime = float(proc["uptime"].split()[0])
            last_cpu, last_t = 0.0, now - max(uptime - int(fields[19]) / CLOCK_TICKS, 1e-3)
        self._cpu_samples[cid] = (cpu, now)
        return f"{100.0 * (cpu - last_cpu) / max(now - last_t, 1e-3):.2f}%"


class LoopRuntime(ProcessRuntime):
    """``Loop``: the built-in loopback container, which answers every request with what it got.

    It needs no files and no engine: use it to check a board and the whole request path,
    and to measure what the cluster itself costs.
    """

    kind = "Loop"

    def command(self, spec: ContainerSpec) -> list[str]:
        return [self.host.python, "-m", "infinibrain.containers.loopback"]

    def _check_scripts(self, spec: ContainerSpec, root: str) -> None:
        return None


def run_as(spec: ContainerSpec) -> str | None:
    """The user a process container runs as (``--user`` in its run_option), if not the manager's."""
    return option_value(spec.config.run_option, "--user")


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _rss_bytes(statm: str) -> int:
    parts = statm.split()
    return int(parts[1]) * PAGE_SIZE if len(parts) > 1 else 0


def _mem_total(meminfo: str) -> int:
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 1


def _block_io(io_text: str) -> str:
    try:
        io = dict(line.split(": ") for line in io_text.splitlines())
        return f"{human_bytes(int(io['read_bytes']))} / {human_bytes(int(io['write_bytes']))}"
    except (KeyError, ValueError):
        return "-"


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.2f}{unit}"
        n /= 1000
    return f"{n}B"
