"""The payload path: how a request's data reaches its container, in frames or in shared memory.

A client on this host may put a large request's data in a segment of its own
(infinibrain/shm.py) and send the segment's name; the manager accepts only names of that
client's segments, and only from a client whose probe it has read. A container that reads
the manager's probe gets the name and copies the data itself; any other container gets the
bytes in a frame, read here without a copy. docs/PROTOCOL.md, "Shared memory".

Router thread, all of it.
"""
from __future__ import annotations

import logging
from typing import Any

from infinibrain import shm

from .state import Client, Instance, Request

log = logging.getLogger("infinibrain.manager.router")


class Payloads:
    def __init__(self, port: int, token: str) -> None:
        self.token = token  # what a container finds in our probe: "<pid>:<instance>" (its pid for shm.sweep)
        self.passed = 0  # requests whose data a container read from shared memory itself
        self.read = 0  # requests whose data the manager read from shared memory for a container
        self._reader = shm.Reader()
        self._probe = self._make_probe(port)

    def _make_probe(self, port: int) -> shm.Probe | None:
        """The segment a container reads to show it shares our /dev/shm (it is named in
        every container's INFINIBRAIN_SHM_PROBE, manager/boards.py)."""
        if not shm.available():
            return None
        try:
            return shm.Probe(shm.manager_probe_name(port), self.token)
        except OSError as exc:
            log.info("no shared memory probe for containers (%s): requests' data reach them in frames", exc)
            return None

    def close(self) -> None:
        if self._probe is not None:
            self._probe.close()

    # ---- clients --------------------------------------------------------------------------

    def hello(self, client: Client, probe: Any) -> bool:
        """Whether ``client`` (which names ``probe`` in its hello) may name its segments."""
        if not client.shm:
            client.shm = probe == shm.probe_name(client.id) and shm.proven(client.id)
        return client.shm is True

    def accept(self, client: Client, ref: Any) -> list:
        """The ``[segment, bytes]`` a request of ``client`` names, checked; ShmError says why not."""
        if client.shm is None:  # a client this manager has not said hello to (it restarted): its probe
            client.shm = shm.proven(client.id)
        if not client.shm:
            raise shm.ShmError("the manager cannot read this client's probe segment; send the data in a frame")
        return list(shm.parse_ref(ref, client.id))

    def forget(self, cid: str) -> None:
        """A client is gone: its segments are not read any more."""
        self._reader.forget(shm.owner_prefix(cid))

    # ---- containers -------------------------------------------------------------------------

    def container_reads(self, header: Any) -> bool:
        """Whether a container whose hello says ``header`` read our probe (then it reads segments)."""
        return header == self.token

    def frames(self, c: Instance, req: Request) -> list:
        """The frames that carry ``req``'s data to ``c``: its own; none when ``c`` reads the
        client's shared memory itself; else the segment's bytes, read here (zero-copy).
        ShmError when the segment cannot be read."""
        if req.shm is None:
            return req.payload
        if c.shm:
            self.passed += 1
            return req.payload
        view = self._reader.view(req.shm)
        self.read += 1
        return [view]
