"""How a request's data leaves the client: in a frame, or in shared memory on one host.

A client whose manager has read its probe (a segment in /dev/shm holding its id, named in
its infer-path hello; the manager says so in its hello_ack) puts a request's data of
``shm.MIN_BYTES`` or more in a segment of its own and sends the segment's name instead of
the bytes (docs/PROTOCOL.md, "Shared memory"). A segment is given back when its request
ends. Used by the calling threads (``frames``) and whichever thread ends a call (``release``).
"""
from __future__ import annotations

import logging
from typing import Any

from . import shm
from ._pending import Pending

# Frames smaller than this are copied when sent (one memcpy) rather than handed to pyzmq's
# zero-copy machinery (a tracker and its garbage-collector thread per frame), which costs
# more for an image of a few hundred kB; larger ones go zero-copy.
COPY_THRESHOLD = 1 << 20


class Outbox:
    def __init__(self, client_id: str, logger: logging.Logger | logging.LoggerAdapter) -> None:
        self.probe, self.pool = _segments(client_id, logger)
        self.shared = False  # the manager said it reads our segments (hello_ack "shm")

    @property
    def probe_name(self) -> str | None:
        """The probe to name in an infer-path hello (None: this client offers no shared memory)."""
        return self.probe.name if self.probe is not None else None

    def agreed(self, manager_reads: bool) -> None:
        """What the manager's hello_ack said (or, with False, that the manager was lost)."""
        self.shared = manager_reads and self.pool is not None

    def frames(self, p: Pending, header: dict, payload: Any, detached: bool) -> tuple:
        """The frames that carry ``payload``: none when it goes in shared memory (header
        ``shm``), else one. A detached caller's writable buffer is copied before a
        zero-copy send (ZeroMQ copies one below COPY_THRESHOLD as it sends)."""
        view = memoryview(payload)
        if self.shared and view.nbytes >= shm.MIN_BYTES and view.c_contiguous:
            assert self.pool is not None
            p.segment = self.pool.take(view.nbytes)
            if p.segment is not None:
                header["shm"] = p.segment.write(view)
                return ()
        if detached and not view.readonly and view.nbytes >= COPY_THRESHOLD:
            payload = payload.copy() if hasattr(payload, "copy") else bytes(view)
        return (payload,)

    def release(self, p: Pending) -> None:
        if p.segment is not None and self.pool is not None:
            self.pool.give(p.segment)
            p.segment = None

    def close(self) -> None:
        if self.pool is not None and self.probe is not None:
            self.pool.close()
            self.probe.close()


def _segments(client_id: str, logger: logging.Logger | logging.LoggerAdapter) -> tuple[shm.Probe | None, shm.Pool | None]:
    """The probe and segments of large payloads (infinibrain/shm.py); (None, None) when
    this host offers none or INFINIBRAIN_SHM_BYTES=0."""
    if shm.LIMIT_BYTES <= 0 or not shm.available():
        return None, None
    try:
        shm.sweep_once()
        return shm.Probe(shm.probe_name(client_id), client_id), shm.Pool(client_id)
    except OSError as exc:
        logger.info("no shared memory for large payloads (%s): they go in frames", exc)
        return None, None
