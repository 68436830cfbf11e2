"""Where a ``process`` container's files and process live: this machine, or a board over SSH.

``ProcessRuntime`` (process.py) is written once against the small ``Host`` surface below:
file operations on the container's working directory and process operations on its
process group. ``LocalHost`` does them with the standard library; ``SSHHost`` does them on
a remote board through its ``SSHLink`` (SFTP for files, short ``sh`` scripts for processes),
and keeps a half-second poll of its processes so that the router's exit checks never wait
on the network.

Worker threads (operations.py); ``exited`` on the router thread reads the poll, which an ``SSHHost`` keeps on a thread of its own.
"""
from __future__ import annotations

import logging
import os
import posixpath
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import paramiko

from infinibrain import security
from infinibrain.errors import make_error

from ..ssh import LINK_ERRORS, SSHLink, makedirs

log = logging.getLogger(__name__)

# How often a remote board's processes are looked at (one short command each time). A lost
# container is noticed at once anyway, by its ZeroMQ unsubscription (114); the poll is for
# its exit status, and it costs the board a process start each time.
POLL_INTERVAL = 1.0
EXIT_FILE = ".ib-exit"  # where a remote container's wrapper leaves its exit status
SECRETS_FILE = ".ib-secrets"  # a remote container's secret environment, read and deleted at its start
PROC_FILES = ("stat", "statm", "io")


def start_time_of(stat_line: str) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks); None for a zombie."""
    if ")" not in stat_line:
        return None
    fields = stat_line[stat_line.rfind(")") + 2 :].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _old_name(work: str) -> str:
    """Where a container's previous files wait while new ones are swapped in (hidden)."""
    return posixpath.join(posixpath.dirname(work), f".{posixpath.basename(work)}.old")


def copy_atomic(source: str, target: str, mode: int = 0o777) -> None:
    """Copy ``source`` to ``target`` on this host: written beside it, then renamed, so a
    reader never sees half a file. Missing folders are made (with ``mode``)."""
    os.makedirs(os.path.dirname(target), exist_ok=True, mode=mode)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=f".{os.path.basename(target)}.")
    os.close(fd)
    try:
        shutil.copy2(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def start_line(argv: list[str]) -> str:
    return f"--- start {datetime.now(timezone.utc).isoformat()} {shlex.join(argv)}\n"


class LocalHost:
    """This machine."""

    name = "this host"

    def __init__(self) -> None:
        self.python = sys.executable  # the manager's own interpreter, which can import infinibrain
        self._children: dict[int, subprocess.Popen] = {}

    # ---- files -------------------------------------------------------------------------

    def make_fresh(self, parent: str, prefix: str) -> str:
        os.makedirs(parent, exist_ok=True)
        return tempfile.mkdtemp(dir=parent, prefix=prefix)

    def put(self, source: Path, target: str) -> None:
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(source, target)

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path)

    def is_file(self, path: str) -> bool:
        return os.path.isfile(path)

    def write_text(self, path: str, text: str) -> None:
        Path(path).write_text(text)

    def swap_in(self, fresh: str, work: str) -> None:
        old = _old_name(work)
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(work):
            os.rename(work, old)
        os.rename(fresh, work)
        shutil.rmtree(old, ignore_errors=True)

    def put_atomic(self, source: str, target: str) -> None:
        copy_atomic(source, target)

    def rmtree(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def realpath(self, path: str) -> str:
        """``path`` with every symbolic link resolved (the parts that exist)."""
        return os.path.realpath(path)

    def tree_size(self, path: str) -> int:
        total = 0
        for root, _dirs, files in os.walk(path):
            for f in files:
                try:
                    total += os.lstat(os.path.join(root, f)).st_size
                except OSError:
                    pass
        return total

    def tail(self, path: str, lines: int) -> str:
        try:
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 64 * 1024))
                text = fh.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # ---- processes ------------------------------------------------------------------------

    def give(self, folder: str, user: str, final: str) -> None:
        """Make ``folder`` (a container's files, to be moved to ``final``) ``user``'s, for a
        container run as that user; 302 when ``final``'s parents keep that user out."""
        uid, gid = _ids_of(user)
        parent = os.path.dirname(os.path.abspath(final))
        while parent:
            st = os.stat(parent)
            if not (st.st_mode & 0o001 or (st.st_uid == uid and st.st_mode & 0o100) or (st.st_gid == gid and st.st_mode & 0o010)):
                raise make_error(302, detail=f"run_option --user {user!r}: {user} cannot enter {parent} (mode "
                                             f"{oct(st.st_mode & 0o777)}), where this board keeps its containers: set work_dir "
                                             f"in its [[coprocessor]] table to a folder outside the manager's owner-only "
                                             f"state_dir (docs/DEPLOYMENT.md, \"Containers as another user\")")
            if parent == "/":
                break
            parent = os.path.dirname(parent)
        for root, dirs, files in os.walk(folder):
            for name in (root, *(os.path.join(root, n) for n in dirs + files)):
                os.lchown(name, uid, gid)

    def spawn(self, argv: list[str], cwd: str, env: dict[str, str], log_path: str,
              user: str | None = None) -> tuple[int, int]:
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        uid = gid = None
        if user is not None:  # its working folder is entered before the user changes: its parents stay the manager's
            uid, gid = _ids_of(user)
        with open(log_path, "ab") as logfile:
            logfile.write(start_line(argv).encode())
            logfile.flush()
            try:
                # Its own session: stopping the group stops anything the module started.
                child = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=logfile,
                                         stderr=subprocess.STDOUT, start_new_session=True, user=uid, group=gid,
                                         extra_groups=[] if uid is not None else None)
            except (OSError, subprocess.SubprocessError) as exc:
                why = getattr(exc, "strerror", None) or str(exc)
                raise make_error(302, detail=f"run_command {argv[0]!r} cannot be started"
                                             f"{f' as user {user!r}' if user else ''}: {why}") from None
        self._children[child.pid] = child
        return child.pid, self.start_time(child.pid) or 0

    def start_time(self, pid: int) -> int | None:
        child = self._children.get(pid)
        if child is not None and child.poll() is not None:
            return None  # reaped here: the pid may already be someone else's
        return start_time_of(self.read(f"/proc/{pid}/stat"))

    def alive(self, pid: int, start: int) -> bool:
        child = self._children.get(pid)
        if child is not None:  # our own child keeps its pid until reaped: no /proc read
            return child.poll() is None  # (the exit check asks for every container twice a second)
        return self.start_time(pid) == start

    def adopt(self, pid: int, start: int, cwd: str) -> bool:
        return self.start_time(pid) == start

    def exit_code(self, pid: int, cwd: str) -> int:
        child = self._children.get(pid)
        return child.returncode if child is not None and child.returncode is not None else -1

    def signal_group(self, pid: int, sig: int) -> None:
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass

    def forget(self, pid: int) -> None:
        self._children.pop(pid, None)

    def proc_files(self, pid: int) -> dict[str, str]:
        out = {name: self.read(f"/proc/{pid}/{name}") for name in PROC_FILES}
        out.update(meminfo=self.read("/proc/meminfo"), uptime=self.read("/proc/uptime"))
        return out

    def close(self) -> None:
        return None

    @staticmethod
    def read(path: str) -> str:
        try:
            with open(path, "rb") as fh:
                return fh.read().decode(errors="replace")
        except OSError:
            return ""


class SSHHost:
    """A remote board, through its SSH connection."""

    def __init__(self, link: SSHLink, python: str) -> None:
        self.link = link
        self.name = link.where
        self.python = python
        self._sftp: paramiko.SFTPClient | None = None
        self._sftp_lock = threading.Lock()
        # pid -> (start time, working dir) of the processes to watch; pid -> last seen start (None = gone)
        self._watched: dict[int, tuple[int, str]] = {}
        self._seen: dict[int, int | None] = {}
        self._exits: dict[int, int] = {}
        self._closed = threading.Event()
        self._poller: threading.Thread | None = None

    # ---- files -------------------------------------------------------------------------

    @contextmanager
    def files(self, doing: str) -> Iterator[paramiko.SFTPClient]:
        """The board's SFTP session (one, reused); a lost connection is a 500 naming ``doing``."""
        with self._sftp_lock:
            try:
                if self._sftp is None or not self._sftp.get_channel().get_transport().is_active():
                    self._sftp = self.link.sftp()
                yield self._sftp
            except LINK_ERRORS as exc:
                if isinstance(exc, OSError) and exc.errno is not None:  # the board said no (SFTP status): not a link failure
                    raise make_error(302, detail=f"{self.name}: {doing}: {exc.strerror or exc}") from None
                self._sftp = None
                raise self.link.failed(doing, exc) from None

    def make_fresh(self, parent: str, prefix: str) -> str:
        fresh = posixpath.join(parent, f"{prefix}{uuid.uuid4().hex[:8]}")
        with self.files(f"making {fresh}") as sftp:
            makedirs(sftp, parent)
            sftp.mkdir(fresh, 0o755)
        return fresh

    def put(self, source: Path, target: str) -> None:
        with self.files(f"copying {source}") as sftp:
            makedirs(sftp, posixpath.dirname(target))
            if not source.is_dir():
                sftp.put(str(source), target)
                sftp.chmod(target, stat.S_IMODE(source.stat().st_mode))
                return
            makedirs(sftp, target)
            for path in sorted(source.rglob("*")):
                if "__pycache__" in path.parts:
                    continue
                remote = posixpath.join(target, path.relative_to(source).as_posix())
                if path.is_dir():
                    makedirs(sftp, remote)
                else:
                    sftp.put(str(path), remote)
                    sftp.chmod(remote, stat.S_IMODE(path.stat().st_mode))

    def realpath(self, path: str) -> str:
        """``path`` with every symbolic link on the board resolved (the parts that exist)."""
        missing: list[str] = []
        with self.files(f"resolving {path}") as sftp:
            while True:
                try:
                    return posixpath.join(sftp.normalize(path), *reversed(missing))
                except FileNotFoundError:
                    if path in ("/", ""):
                        return posixpath.join("/", *reversed(missing))
                    path, tail = posixpath.split(path)
                    missing.append(tail)

    def _stat(self, path: str) -> os.stat_result | None:
        with self.files(f"looking at {path}") as sftp:
            try:
                return sftp.stat(path)
            except FileNotFoundError:
                return None

    def is_dir(self, path: str) -> bool:
        found = self._stat(path)
        return found is not None and stat.S_ISDIR(found.st_mode or 0)

    def is_file(self, path: str) -> bool:
        found = self._stat(path)
        return found is not None and stat.S_ISREG(found.st_mode or 0)

    def write_text(self, path: str, text: str) -> None:
        with self.files(f"writing {path}") as sftp, sftp.open(path, "w") as fh:
            fh.write(text)

    def swap_in(self, fresh: str, work: str) -> None:
        old = shlex.quote(_old_name(work))
        w, f = shlex.quote(work), shlex.quote(fresh)
        self.link.check(f"rm -rf {old} && {{ [ ! -e {w} ] || mv {w} {old}; }} && mv {f} {w} && rm -rf {old}", f"replacing {work}")

    def put_atomic(self, source: str, target: str) -> None:
        temp = posixpath.join(posixpath.dirname(target), f".{posixpath.basename(target)}.{uuid.uuid4().hex[:8]}")
        with self.files(f"copying {source}") as sftp:
            makedirs(sftp, posixpath.dirname(target))
            try:
                sftp.put(source, temp)
                sftp.chmod(temp, stat.S_IMODE(os.stat(source).st_mode))
                sftp.posix_rename(temp, target)
            except BaseException:
                try:
                    sftp.remove(temp)
                except Exception:
                    pass
                raise

    def rmtree(self, path: str) -> None:
        self.link.check(f"rm -rf {shlex.quote(path)}", f"removing {path}")

    def tree_size(self, path: str) -> int:
        out = self.link.check(f"du -sb {shlex.quote(path)} 2>/dev/null || echo 0", f"measuring {path}")
        return int((out.split() or ["0"])[0])

    def tail(self, path: str, lines: int) -> str:
        _, out, _ = self.link.run(f"tail -n {int(lines)} {shlex.quote(path)} 2>/dev/null")
        return out.rstrip("\n")

    # ---- processes ------------------------------------------------------------------------

    def give(self, folder: str, user: str, final: str) -> None:
        raise make_error(302, detail=f"run_option --user {user!r}: on an ssh board a process container runs as the "
                                     f"board's ssh_user; give the board a user of its own instead")

    def spawn(self, argv: list[str], cwd: str, env: dict[str, str], log_path: str,
              user: str | None = None) -> tuple[int, int]:
        """Start ``argv`` in ``cwd`` as the leader of a new session, detached from the SSH
        session (so a dropped connection does not end it); a wrapper ``sh`` records its exit
        status in ``cwd/.ib-exit``. Only the connection environment is passed: the rest is
        the board's own."""
        wanted = {k: v for k, v in env.items() if (k.startswith("INFINIBRAIN_") or k == "PYTHONUNBUFFERED")
                  and k not in security.SECRET_ENV}
        # Secrets never travel on a command line (visible in `ps` on the board): an
        # owner-only file that the start script reads into the environment and deletes.
        secrets = {k: env[k] for k in security.SECRET_ENV if k in env}
        load_secrets = ""
        if secrets:
            with self.files(f"writing secrets in {cwd}") as sftp:
                with sftp.open(posixpath.join(cwd, SECRETS_FILE), "w") as fh:
                    sftp.chmod(posixpath.join(cwd, SECRETS_FILE), 0o600)
                    fh.write("".join(f"export {k}={shlex.quote(v)}\n" for k, v in secrets.items()))
            load_secrets = f". ./{SECRETS_FILE}; rm -f {SECRETS_FILE}\n"
        # Relative paths are from the SSH user's home (as SFTP has them); the log is written
        # after the script changed folder, so it is named from $HOME.
        log_q = shlex.quote(log_path) if log_path.startswith("/") else f'"$HOME"/{shlex.quote(log_path)}'
        cwd_q = shlex.quote(cwd)
        script = (
            f"mkdir -p \"$(dirname {log_q})\" && cd {cwd_q} || exit 97\n"
            f"{load_secrets}"
            f"rm -f {EXIT_FILE}; printf %s {shlex.quote(start_line(argv))} >> {log_q}\n"
            f"command -v {shlex.quote(argv[0])} >/dev/null 2>&1 || {{ echo 'not found' >&2; exit 127; }}\n"
            f"env {' '.join(shlex.quote(f'{k}={v}') for k, v in sorted(wanted.items()))} "
            f"setsid sh -c '\"$@\" >>\"$0\" 2>&1 </dev/null; echo $? > {EXIT_FILE}' {log_q} {shlex.join(argv)} "
            f">/dev/null 2>&1 </dev/null &\n"
            "pid=$!; echo $pid; cat /proc/$pid/stat"
        )
        status, out, err = self.link.run(script)
        if status == 127:
            raise make_error(302, detail=f"run_command {argv[0]!r} cannot be started on {self.name}: not found")
        if status != 0:
            raise make_error(302, detail=f"run_command cannot be started on {self.name}: {err.strip() or status}")
        pid_text, _, stat_line = out.partition("\n")
        pid, start = int(pid_text), start_time_of(stat_line) or 0
        self._watch(pid, start, cwd)
        return pid, start

    def _watch(self, pid: int, start: int, cwd: str) -> None:
        self._watched[pid] = (start, cwd)
        self._seen[pid] = start
        if self._poller is None:
            self._poller = threading.Thread(target=self._poll, name=f"ssh-poller-{self.link.board.name}", daemon=True)
            self._poller.start()

    def _poll(self) -> None:
        while not self._closed.wait(POLL_INTERVAL):
            watched = dict(self._watched)
            if not watched:
                continue
            try:
                self._look(watched)
            except Exception as exc:  # the board is unreachable: keep the last known states
                log.debug("%s: process poll failed: %s", self.name, exc)

    def _look(self, watched: dict[int, tuple[int, str]]) -> None:
        """One command for all: "exit <status>" for a process whose wrapper has written its
        exit status (it has ended, even if not yet reaped), else its stat line (none if gone)."""
        script = "; ".join(
            f"printf '%s ' {pid}; if [ -e {q} ]; then printf 'exit '; cat {q}; else cat /proc/{pid}/stat 2>/dev/null || echo; fi"
            for pid, q in ((pid, shlex.quote(posixpath.join(cwd, EXIT_FILE))) for pid, (_, cwd) in watched.items())
        )
        _, out, _ = self.link.run(script)
        for line in out.splitlines():
            pid_text, _, rest = line.partition(" ")
            pid = int(pid_text)
            if rest.startswith("exit "):
                code = rest[len("exit "):].strip()
                self._seen[pid] = None
                self._exits.setdefault(pid, int(code) if code.lstrip("-").isdigit() else -1)
            else:
                self._seen[pid] = start_time_of(rest)

    def start_time(self, pid: int) -> int | None:
        """What the board says now (used when adopting and stopping)."""
        _, out, _ = self.link.run(f"cat /proc/{int(pid)}/stat 2>/dev/null")
        return start_time_of(out)

    def adopt(self, pid: int, start: int, cwd: str) -> bool:
        if self.start_time(pid) != start:
            return False
        self._watch(pid, start, cwd)
        return True

    def alive(self, pid: int, start: int) -> bool:
        """From the last poll: never waits on the network (the router thread asks)."""
        return self._seen.get(pid) == start

    def exit_code(self, pid: int, cwd: str) -> int:
        return self._exits.get(pid, -1)

    def signal_group(self, pid: int, sig: int) -> None:
        self.link.run(f"kill -{int(sig)} -{int(pid)} 2>/dev/null")  # dash: no "--"

    def forget(self, pid: int) -> None:
        for table in (self._watched, self._seen, self._exits):
            table.pop(pid, None)

    def proc_files(self, pid: int) -> dict[str, str]:
        names = [*(f"/proc/{int(pid)}/{n}" for n in PROC_FILES), "/proc/meminfo", "/proc/uptime"]
        _, out, _ = self.link.run("; ".join(f"cat {n} 2>/dev/null; echo ---ib---" for n in names))
        parts = out.split("---ib---\n")
        keys = [*PROC_FILES, "meminfo", "uptime"]
        return {k: parts[i] if i < len(parts) else "" for i, k in enumerate(keys)}

    def close(self) -> None:
        self._closed.set()


def _ids_of(user: str) -> tuple[int, int]:
    """(uid, gid) of ``user`` on this host; 302 when there is none, or the manager may not switch to it."""
    import pwd

    try:
        entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise make_error(302, detail=f"run_option --user {user!r}: no such user on this host") from None
    if os.geteuid() != 0 and os.geteuid() != entry.pw_uid:
        raise make_error(302, detail=f"run_option --user {user!r}: the manager must run as root to start a container "
                                     f"as another user")
    return entry.pw_uid, entry.pw_gid
