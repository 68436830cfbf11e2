"""Keep glibc's malloc from mapping and unmapping every large message buffer.

ZeroMQ allocates a buffer per message it copies or receives; an image of a few hundred
kB is above glibc's default mmap threshold (128 kB), and a buffer freed by another thread
(ZeroMQ's I/O thread frees what the application thread allocated, and the other way
round) goes back to the kernel, so the next message maps fresh pages and faults each of
them in again. Measured on the request path (docs/BENCHMARKS.md): a 150 kB send cost
71 µs instead of 8, and the SDK, the manager and the Connector together used about a
quarter more CPU per request.

``tune()`` raises the mmap threshold to glibc's maximum (32 MiB: larger buffers are still
mapped) and keeps up to 128 MiB of freed memory before trimming, once per process. It
changes when memory goes back to the kernel, not how much a program uses. Set
``INFINIBRAIN_MALLOC_TUNING=0`` to leave the allocator as it is; elsewhere than on glibc
it does nothing. ``trim()`` hands what is free back to the kernel at once (glibc's
``malloc_trim``): the manager calls it when malloc holds much free (``held_free``), so a
flood of large messages does not leave its resident size up for good.

Any thread (``tune`` once at start, ``trim`` from the manager's timer).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger("infinibrain.allocator")

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 128 * 1024 * 1024

_done = False
_libc = None


def _c_library():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            _libc = False
    return _libc or None


def tune() -> bool:
    """Apply the settings above to this process (once); whether they are in force."""
    global _done
    if _done:
        return True
    if os.environ.get("INFINIBRAIN_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = _c_library().mallopt  # type: ignore[union-attr]
    except AttributeError:  # no C library found, or not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("malloc tuning %s", "on" if _done else "refused by the C library")
    return _done


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def held_free() -> int | None:
    """Bytes malloc holds free (glibc's ``mallinfo2().fordblks``, every arena): what
    ``trim`` could give back. None where the C library cannot tell (not glibc >= 2.33)."""
    try:
        mallinfo2 = _c_library().mallinfo2  # type: ignore[union-attr]
    except AttributeError:
        return None
    mallinfo2.argtypes, mallinfo2.restype = [], _MallInfo2
    return int(mallinfo2().fordblks)


def trim() -> bool:
    """Give the kernel back the memory malloc holds free (glibc); whether it could."""
    try:
        malloc_trim = _c_library().malloc_trim  # type: ignore[union-attr]
    except AttributeError:
        return False
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(malloc_trim(0))


__all__ = ["held_free", "trim", "tune"]
