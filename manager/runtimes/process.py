"""``process`` containers: ``run_command`` as a plain process on this host.

The container is a working directory holding the files of ``script_path`` and the
``copy`` entries; its process runs there with the connection environment, in its own
session (so stopping it stops anything it started), writing stdout and stderr to a log
file that survives the process. Paths inside the container are relative to the working
directory: ``/etc/cop/`` means ``<work_dir>/etc/cop/``, and nothing may point outside it.
"""
from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from infinibrain.errors import make_error

from ..validate import copy_list, module_list
from .base import ContainerSpec, RunInfo

log = logging.getLogger(__name__)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def safe_join(root: Path, inside: str) -> Path:
    """``inside`` (a path in the container) as a path under ``root``; 302 if it escapes."""
    rel = os.path.normpath(inside.lstrip("/")) if inside.strip("/") else "."
    if rel == ".." or rel.startswith("../"):
        raise make_error(302, detail=f"path {inside!r} points outside the container")
    return root / rel


def proc_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None if no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # a zombie is gone for our purposes
        return None
    return int(fields[19])


class ProcessRuntime:
    kind = "process"

    def __init__(self, stop_timeout: float) -> None:
        self.stop_timeout = stop_timeout
        self._children: dict[str, subprocess.Popen] = {}
        self._pids: dict[str, tuple[int, int]] = {}  # container id -> (pid, start time)
        self._cpu_samples: dict[str, tuple[float, float]] = {}

    # ---- files -----------------------------------------------------------------

    def prepare(self, spec: ContainerSpec) -> None:
        spec.work_dir.parent.mkdir(parents=True, exist_ok=True)
        fresh = Path(tempfile.mkdtemp(dir=spec.work_dir.parent, prefix=f".{spec.container_id}."))
        try:
            if spec.config.get("script_path"):
                shutil.copytree(spec.config["script_path"], fresh, dirs_exist_ok=True)
            for entry in copy_list(spec.config):
                self._copy_in(Path(entry["From"]), fresh, entry["To"])
            self._check_scripts(spec, fresh)
            self._write_env_file(spec, fresh)
        except BaseException:
            shutil.rmtree(fresh, ignore_errors=True)
            raise
        # Swap the new tree in whole, so a container never sees half of its files.
        old = spec.work_dir.with_name(f".{spec.container_id}.old")
        shutil.rmtree(old, ignore_errors=True)
        if spec.work_dir.exists():
            spec.work_dir.rename(old)
        fresh.rename(spec.work_dir)
        shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def _copy_in(source: Path, root: Path, to: str) -> None:
        target = safe_join(root, to)
        if to.endswith("/") or target.is_dir():
            target = target / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target)

    @staticmethod
    def _check_scripts(spec: ContainerSpec, root: Path) -> None:
        for module in module_list(spec.config):
            scripts = module.get("script") or []
            for name in [scripts] if isinstance(scripts, str) else scripts:
                if not safe_join(root, name).is_file():
                    raise make_error(302, detail=f"inference_modules.script {name!r} is not in script_path")

    @staticmethod
    def _write_env_file(spec: ContainerSpec, root: Path) -> None:
        lines = [f"{k}={shlex.quote(v)}" for k, v in sorted(spec.env.items()) if k.startswith("INFINIBRAIN_")]
        (root / "connection.env").write_text("\n".join(lines) + "\n")

    def put_file(self, spec: ContainerSpec, source: str, target_dir: str) -> str:
        target = safe_join(spec.work_dir, target_dir) / Path(source).name
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        os.close(fd)
        try:
            shutil.copy2(source, tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return str(target.relative_to(spec.work_dir))

    def prepared(self, spec: ContainerSpec) -> bool:
        return spec.work_dir.exists()

    def remove(self, spec: ContainerSpec) -> None:
        shutil.rmtree(spec.work_dir, ignore_errors=True)

    def remove_image(self, spec: ContainerSpec) -> bool:
        return False  # a process container has no image: its files are script_path's

    def logs(self, spec: ContainerSpec, lines: int) -> str:
        try:
            with open(spec.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 64 * 1024))
                text = fh.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # ---- processes ---------------------------------------------------------------

    def command(self, spec: ContainerSpec) -> list[str]:
        run = spec.config.get("run_command")
        if run:
            argv = shlex.split(run)
        else:
            scripts = [s for m in module_list(spec.config) for s in _as_list(m.get("script"))]
            if not scripts:
                raise make_error(302, detail="run_command is required when inference_modules names no script")
            argv = ["python", scripts[0]]
        # "python" is the manager's own interpreter, which can import infinibrain.
        if argv[0] in ("python", "python3"):
            argv[0] = sys.executable
        return argv

    def start(self, spec: ContainerSpec) -> RunInfo:
        argv = self.command(spec)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(spec.log_path, "ab") as logfile:
            logfile.write(f"--- start {datetime.now(timezone.utc).isoformat()} {shlex.join(argv)}\n".encode())
            logfile.flush()
            try:
                child = subprocess.Popen(
                    argv,
                    cwd=spec.work_dir,
                    env=spec.env,
                    stdin=subprocess.DEVNULL,
                    stdout=logfile,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                raise make_error(302, detail=f"run_command {argv[0]!r} cannot be started: {exc.strerror}") from None
        self._children[spec.container_id] = child
        start = proc_start_time(child.pid) or 0
        self._pids[spec.container_id] = (child.pid, start)
        self._cpu_samples.pop(spec.container_id, None)
        log.info("started %s (pid %d): %s", spec.container_id, child.pid, shlex.join(argv))
        return RunInfo(child.pid, start, _now_iso())

    def adopt(self, spec: ContainerSpec, pid: int | None, pid_start: int | None) -> bool:
        if not pid or proc_start_time(pid) != pid_start:
            return False
        self._pids[spec.container_id] = (pid, pid_start)
        log.info("adopted %s (pid %d) left running by an earlier manager", spec.container_id, pid)
        return True

    def _alive(self, container_id: str) -> bool:
        child = self._children.get(container_id)
        if child is not None:
            return child.poll() is None
        pid, start = self._pids.get(container_id, (0, 0))
        return bool(pid) and proc_start_time(pid) == start

    def exited(self, spec: ContainerSpec) -> int | None:
        if spec.container_id not in self._pids:
            return 0
        if self._alive(spec.container_id):
            return None
        child = self._children.get(spec.container_id)
        return child.returncode if child is not None else -1

    def stop(self, spec: ContainerSpec) -> None:
        cid = spec.container_id
        if cid not in self._pids:
            return
        pid = self._pids[cid][0]
        for sig, wait in ((signal.SIGTERM, self.stop_timeout), (signal.SIGKILL, 5.0)):
            if not self._alive(cid):
                break
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while self._alive(cid) and time.monotonic() < deadline:
                time.sleep(0.02)
        self._children.pop(cid, None)
        self._pids.pop(cid, None)
        log.info("stopped %s (pid %d)", cid, pid)

    def stats(self, spec: ContainerSpec) -> dict:
        cid = spec.container_id
        if cid not in self._pids or not self._alive(cid):
            code = self.exited(spec)
            status = "stopped" if cid not in self._pids else f"exited ({code})"
            return {"status": status, "cpu_proc": "0.00%", "mem_usage": "0B", "mem_proc": "0.00%", "block_io": "0B / 0B"}
        pid = self._pids[cid][0]
        return {
            "status": "running",
            "cpu_proc": self._cpu_percent(cid, pid),
            "mem_usage": human_bytes(_rss_bytes(pid)),
            "mem_proc": f"{100.0 * _rss_bytes(pid) / _mem_total():.2f}%",
            "block_io": _block_io(pid),
        }

    def _cpu_percent(self, cid: str, pid: int) -> str:
        """CPU use since the previous status call (or since start), as docker stats shows it."""
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                fields = fh.read().decode(errors="replace").rsplit(")", 1)[1].split()
        except OSError:
            return "0.00%"
        cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        now = time.monotonic()
        if cid in self._cpu_samples:
            last_cpu, last_t = self._cpu_samples[cid]
        else:
            last_cpu, last_t = 0.0, now - max(_uptime() - int(fields[19]) / CLOCK_TICKS, 1e-3)
        self._cpu_samples[cid] = (cpu, now)
        return f"{100.0 * (cpu - last_cpu) / max(now - last_t, 1e-3):.2f}%"


class LoopRuntime(ProcessRuntime):
    """``Loop``: the built-in loopback container, which answers every request with what it got.

    It needs no files and no engine: use it to check a board and the whole request path,
    and to measure what the cluster itself costs.
    """

    kind = "Loop"

    def command(self, spec: ContainerSpec) -> list[str]:
        return [sys.executable, "-m", "infinibrain.containers.loopback"]

    @staticmethod
    def _check_scripts(spec: ContainerSpec, root: Path) -> None:
        return None


def _as_list(value: object) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * PAGE_SIZE
    except OSError:
        return 0


def _mem_total() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 1


def _uptime() -> float:
    with open("/proc/uptime") as fh:
        return float(fh.read().split()[0])


def _block_io(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/io") as fh:
            io = dict(line.split(": ") for line in fh.read().splitlines())
        return f"{human_bytes(int(io['read_bytes']))} / {human_bytes(int(io['write_bytes']))}"
    except (OSError, KeyError, ValueError):
        return "-"


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.2f}{unit}"
        n /= 1000
    return f"{n}B"
