"""Shared memory for large payloads between processes of one host (docs/PROTOCOL.md, "shm").

A request's image normally crosses two sockets (client -> manager -> container): four
copies through the kernel for every byte. When the client, the manager and the container
share this host's ``/dev/shm`` (and one user), the client writes the image once into a
segment of its own and sends only the segment's name; the container copies it out once.
For a 1920x1080x3 image that is most of what a request costs (docs/BENCHMARKS.md).

Nothing is assumed: each reader proves it can read what the writer makes before it is
trusted with a name. The manager reads a probe segment the client names in its hello; a
container reads the manager's probe (named in ``INFINIBRAIN_SHM_PROBE``) and says what it
found in its own hello. A container that cannot (another host, a Docker container with
its own ``/dev/shm``) gets the bytes in a frame, which the manager reads from the segment.

Segments belong to the client that made them: it reuses one once its request has ended
and removes them all when it closes or exits. Segments left by a process that died are
removed when the next program starts its first client on the host (``sweep``: an owner
is alive while it holds a lock on its probe). A name is ``infinibrain-<pid>-<owner>-<n>``;
only names of that form are ever opened.

Thread safety: a ``Pool`` is shared by the client's calling threads and its I/O thread
(one lock); a ``Reader`` is owned by one thread (the router's loop, a Connector's).
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import re
import threading
import weakref
from typing import Any

log = logging.getLogger("infinibrain.shm")

SHM_DIR = "/dev/shm"
PREFIX = "infinibrain-"
# Below this a payload goes in a frame: a copy of a few hundred kB through a socket costs
# less than the bookkeeping (measured: benchmarks/bench_perf.py, docs/BENCHMARKS.md).
MIN_BYTES = int(os.environ.get("INFINIBRAIN_SHM_MIN_BYTES", 64 << 10))
# What one client may keep in segments (its requests in flight); beyond it, frames.
# INFINIBRAIN_SHM_BYTES=0 turns shared memory off for the client.
LIMIT_BYTES = int(os.environ.get("INFINIBRAIN_SHM_BYTES", 256 << 20))
MAX_MAPPINGS = 64  # segments a reader keeps mapped (one per request a client has in flight)
_PAGE = mmap.PAGESIZE
# A client's segments and probe carry its id (its pid and a token); the manager's probe its
# port (containers are told its name, which must not change when the manager restarts).
_NAME = re.compile(r"infinibrain-(?:[0-9]+-[A-Za-z0-9]+-(?:[0-9]+|probe)|manager-[0-9]+-probe)\Z")


class ShmError(Exception):
    """A segment that cannot be used: gone, too small, or a name that is not ours."""


def available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK | os.X_OK)


CALLER_PREFIX = "0-"  # no process is pid 0: no client's id starts so (the manager's router refuses one that does)


def caller_owner(wire_id: str) -> str:
    """The segment owner of a container's calls (manager/calls.py): made from its identity
    on the wire, which its key proves, so the manager knows it without being told; "0-"
    because no process is pid 0, so it is never a client's."""
    return CALLER_PREFIX + hashlib.sha256(wire_id.encode()).hexdigest()[:20]


def probe_name(owner: str) -> str:
    """The probe segment of client ``owner`` (its id, ``<pid>-<token>``)."""
    return f"{PREFIX}{owner}-probe"


def manager_probe_name(port: int) -> str:
    """The probe of the manager on base port ``port``: the same after a restart, so the
    containers it adopts keep their environment (and read the new manager's token)."""
    return f"{PREFIX}manager-{int(port)}-probe"


def _path(name: str) -> str:
    if not _NAME.match(name):
        raise ShmError(f"{name!r} is not the name of an infinibrain shared memory segment")
    return os.path.join(SHM_DIR, name)


def _create(name: str, size: int) -> mmap.mmap:
    """A new segment of ``size`` bytes, its memory reserved now (a full /dev/shm fails
    here with ENOSPC instead of killing a writer with SIGBUS later)."""
    fd = os.open(_path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        return mmap.mmap(fd, size)
    except BaseException:
        os.unlink(_path(name))
        raise
    finally:
        os.close(fd)


def _unlink(names: list[str], pid: int | None = None) -> None:
    if pid is not None and os.getpid() != pid:  # a forked child exiting: the parent's segments stay
        return
    for name in names:
        try:
            os.unlink(_path(name))
        except (OSError, ShmError):
            pass
    names.clear()


# ---- probes: does a reader see what a writer makes? ----------------------------------


class Probe:
    """A small segment holding ``token``: whoever reads the token back shares this
    host's /dev/shm with us (and may read our segments). An existing probe of that name
    (left by a manager that was killed) is replaced."""

    def __init__(self, name: str, token: str) -> None:
        self.name = name
        data = token.encode()
        draft = f"{PREFIX}{os.getpid()}-draft{os.urandom(4).hex()}-probe"
        segment = _create(draft, max(len(data), 1))
        segment[: len(data)] = data
        segment.close()
        # Held while we live (``sweep`` asks), taken before the name appears.
        fd = os.open(_path(draft), os.O_RDONLY | os.O_NOFOLLOW)
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.rename(_path(draft), _path(name))
        self._finalizer = weakref.finalize(self, _remove_probe, name, token, fd, os.getpid())

    def close(self) -> None:
        self._finalizer()


def _remove_probe(name: str, token: str, fd: int, pid: int) -> None:
    if os.getpid() != pid:  # a forked child exiting: the probe is its parent's
        return
    if read_probe(name) == token:  # not one that replaced ours since
        _unlink([name])
    os.close(fd)


def proven(owner: str) -> bool:
    """Whether client ``owner``'s probe holds its id here: then we read its segments."""
    return read_probe(probe_name(owner)) == owner


def read_probe(name: Any) -> str | None:
    """The token in probe segment ``name``, or None when it cannot be read here."""
    if not isinstance(name, str) or not name.endswith("-probe"):
        return None
    try:
        fd = os.open(_path(name), os.O_RDONLY | os.O_NOFOLLOW)
        try:
            return os.read(fd, 256).decode()
        finally:
            os.close(fd)
    except (OSError, ShmError, UnicodeDecodeError):
        return None


# ---- the writer: a client's segments ----------------------------------------------------


class Segment:
    __slots__ = ("name", "size", "mm", "view")

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self.mm = _create(name, size)
        self.view = memoryview(self.mm)

    def write(self, payload: Any) -> list:
        """Copy ``payload`` (a C-contiguous buffer) in; its reference for the wire."""
        data = memoryview(payload).cast("B")
        self.view[: data.nbytes] = data
        return [self.name, data.nbytes]


class Pool:
    """A client's segments: one per request in flight, reused once its request has ended."""

    def __init__(self, owner: str, limit: int = LIMIT_BYTES, first: int = 0) -> None:
        self.owner = owner
        self.limit = limit
        self._free: list[Segment] = []
        self._names: list[str] = []  # every segment made, removed at close or exit
        self._total = 0
        self._count = first  # a Connector starts at a random number: its owner outlives its process (caller_owner)
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _unlink, self._names, os.getpid())

    def take(self, nbytes: int) -> Segment | None:
        """A free segment of at least ``nbytes`` (made if need be); None when the limit
        is reached or /dev/shm is full (the payload then goes in a frame)."""
        with self._lock:
            fits = [s for s in self._free if nbytes <= s.size <= 2 * nbytes]
            if fits:
                best = min(fits, key=lambda s: s.size)
                self._free.remove(best)
                return best
            size = -(-nbytes // _PAGE) * _PAGE
            while self._free and self._total + size > self.limit:  # make room: drop the largest unused
                self._drop(max(self._free, key=lambda s: s.size))
            if self._total + size > self.limit:
                return None
            self._total += size
            self._count += 1
            name = f"{PREFIX}{self.owner}-{self._count}"
        try:
            segment = Segment(name, size)
        except OSError as exc:
            log.info("no shared memory segment of %d bytes (%s): the payload goes in a frame", size, exc)
            with self._lock:
                self._total -= size
            return None
        with self._lock:
            self._names.append(name)
        return segment

    def give(self, segment: Segment) -> None:
        """``segment``'s request has ended: it may carry another."""
        with self._lock:
            if segment.name in self._names:
                self._free.append(segment)

    def _drop(self, segment: Segment) -> None:
        self._free.remove(segment)
        self._total -= segment.size
        self._names.remove(segment.name)
        _unlink([segment.name])

    def close(self) -> None:
        """Remove every segment (a reader that has one mapped keeps its memory until it lets go)."""
        with self._lock:
            self._free.clear()
            self._finalizer()


_swept = False


def sweep_once() -> None:
    """``sweep`` the first time a process asks (each client asks as it starts)."""
    global _swept
    if not _swept:
        _swept = True
        sweep()


def sweep() -> int:
    """Remove the segments and probes of owners that are gone (they died without
    closing); how many. An owner is alive while its probe is locked: the lock goes with
    its process however it ends, and, unlike a pid, means the same in every pid namespace
    that shares this /dev/shm."""
    removed = 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    uid = os.getuid()
    alive: dict[str, bool] = {}
    for name in names:
        if not _NAME.match(name):
            continue
        owner = name.rsplit("-", 1)[0]
        if owner not in alive:
            alive[owner] = _held(owner + "-probe")
        if alive[owner]:
            continue
        try:
            path = _path(name)
            if os.stat(path, follow_symlinks=False).st_uid == uid:
                os.unlink(path)
                removed += 1
        except OSError:
            pass
    return removed


def _held(probe: str) -> bool:
    """Whether a live process holds ``probe`` (a missing probe: nobody does)."""
    try:
        fd = os.open(_path(probe), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return True  # cannot tell: leave it
    finally:
        os.close(fd)  # and with it our lock, if we got it
    return False


# ---- the readers: the manager, a Connector ------------------------------------------------


def parse_ref(ref: Any, owner: str | None = None) -> tuple[str, int]:
    """(name, bytes) of a request's ``shm`` field; ShmError when it is not one (or, with
    ``owner``, names a segment that is not that client's)."""
    if not (isinstance(ref, (list, tuple)) and len(ref) == 2 and isinstance(ref[0], str)
            and type(ref[1]) is int and ref[1] > 0):
        raise ShmError(f"shm must be [segment name, bytes], got {ref!r}")
    name = ref[0]
    if not _NAME.match(name) or name.endswith("-probe") or (owner is not None and not name.startswith(f"{PREFIX}{owner}-")):
        raise ShmError(f"{name!r} is not a segment of this client")
    return name, ref[1]


class Reader:
    """Segments mapped read-only, by name, kept for the next request that names them."""

    def __init__(self) -> None:
        self._maps: dict[str, mmap.mmap] = {}

    def view(self, ref: Any) -> memoryview:
        """The bytes ``ref`` names, without copying them (read-only)."""
        name, nbytes = parse_ref(ref)
        mm = self._maps.get(name)
        if mm is None:
            mm = self._open(name)
        if nbytes > len(mm):
            raise ShmError(f"segment {name} has {len(mm)} bytes, the request says {nbytes}")
        return memoryview(mm)[:nbytes]

    def _open(self, name: str) -> mmap.mmap:
        if len(self._maps) >= MAX_MAPPINGS:
            self._forget_gone()
        try:
            fd = os.open(_path(name), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise ShmError(f"segment {name} cannot be opened: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if not size:
                raise ShmError(f"segment {name} is empty")
            mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._maps[name] = mm
        return mm

    def _forget_gone(self) -> None:
        """Let go of segments their client has removed, else of the oldest (a mapping
        still in use stays valid until its last view goes)."""
        for name in [n for n in self._maps if not os.path.exists(os.path.join(SHM_DIR, n))]:
            del self._maps[name]
        while len(self._maps) >= MAX_MAPPINGS:
            del self._maps[next(iter(self._maps))]

    def forget(self, prefix: str) -> None:
        """Let go of the segments whose names start with ``prefix`` (a client that left)."""
        for name in [n for n in self._maps if n.startswith(prefix)]:
            del self._maps[name]


def owner_prefix(owner: str) -> str:
    return f"{PREFIX}{owner}-"
