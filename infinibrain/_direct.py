"""Synchronous answers straight to the calling thread: its own SUB socket.

A synchronous inference's answer comes to a socket of the calling thread (topic
``protocol.reply_topic``), as a raw client's does, instead of through the I/O thread and a
wake-up (docs/DECISIONS.md, "Synchronous answers"). Each socket is used by its own thread
only; ``DirectReplies`` makes them, proves each subscribed (a hello answered on it) after
every loss of the connection, and closes those whose thread ended.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any, Callable, Iterator

import zmq

from . import protocol as P
from . import security
from ._pending import COMMAND_TIMEOUT, Pending

log = logging.getLogger("infinibrain.client")

DIRECT_SOCKETS = 32  # threads per AICluster that receive their synchronous answers themselves
DIRECT_PROOF = 1.0  # seconds a thread's socket may take to prove it is subscribed, else the I/O thread serves it
POLL_MS = 20  # a waiting thread looks at its call's future this often


def arrived(sock: zmq.Socket, logger: logging.Logger | logging.LoggerAdapter) -> Iterator[P.Message]:
    """The messages waiting on ``sock`` once a poll has said one is, at most 256 (so one
    busy socket cannot hold its reader for ever); a malformed one is logged and dropped."""
    for frames in P.received(sock, 256, polled=True):
        try:
            msg = P.decode(frames)
        except P.ProtocolError as exc:
            logger.warning("dropped malformed message from the manager: %s", exc)
            continue
        yield msg


class DirectReply:
    """A calling thread's own SUB socket: the answers to its synchronous inference requests
    come straight to it (topic ``protocol.reply_topic``), as a raw client's do, instead of
    through the I/O thread and a wake-up (docs/DECISIONS.md, "Synchronous answers").

    Used only by its thread, under ``lock``; ``close`` takes the lock, so a socket is
    never closed while its thread waits on it."""

    _tags = itertools.count(1)

    def __init__(self, ctx: zmq.Context, keys: Any, client_id: str, address: tuple[list[str], int]) -> None:
        self.tag = str(next(self._tags))
        self.thread = threading.current_thread()
        self.lock = threading.Lock()
        self.proven = -1  # the connection generation in which the manager answered on this socket
        self.sock = ctx.socket(zmq.SUB)
        self.sock.linger = 0
        self.sock.rcvhwm = 0
        security.arm_client(self.sock, keys)
        self.sock.subscribe(P.reply_topic(client_id, self.tag))
        P.connect_managers(self.sock, *address)  # (hosts, port): the manager's, or a group's
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)

    def messages(self, timeout_ms: int) -> list[P.Message]:
        """What arrived within ``timeout_ms`` (malformed messages dropped). Only its thread's
        answers come here, so reading all that waits loses nothing."""
        return list(arrived(self.sock, log)) if self.poller.poll(timeout_ms) else []

    def close(self) -> None:
        if self.lock.acquire(timeout=1.0):  # its thread notices the client closing within a poll slice
            self.sock.close(linger=0)
            self.lock.release()


class DirectReplies:
    """The threads' answer sockets of one client. ``hello(tag)`` asks the manager to answer
    on a socket; ``on_result(msg)`` ends the call an answer belongs to."""

    def __init__(self, ctx: zmq.Context, keys: Any, client_id: str, address: tuple[list[str], int], hello: Callable[[str], None],
                 on_result: Callable[[P.Message], None], logger: logging.Logger | logging.LoggerAdapter) -> None:
        self._ctx, self._keys, self._client_id, self._address = ctx, keys, client_id, address
        self._hello = hello
        self._on_result = on_result
        self.logger = logger
        self._mine = threading.local()  # this thread's DirectReply
        self._all: list[DirectReply] = []
        self._lock = threading.Lock()
        self.closed = False

    @property
    def sockets(self) -> list[DirectReply]:
        """The threads' sockets open now."""
        with self._lock:
            return list(self._all)

    def of_this_thread(self, generation: int) -> DirectReply | None:
        """The calling thread's own answer socket, proven subscribed in connection
        ``generation``; None (answers come through the I/O thread) when it cannot be had."""
        d: DirectReply | None = getattr(self._mine, "reply", None)
        if d is None:
            d = self._new()
            if d is None:
                return None
        if d.proven != generation and not self._prove(d, generation):
            return None
        return d

    def _new(self) -> DirectReply | None:
        with self._lock:
            if self.closed:
                return None
            gone = [d for d in self._all if not d.thread.is_alive()]
            for d in gone:  # its thread ended: nobody uses it any more
                self._all.remove(d)
                d.close()
            if len(self._all) >= DIRECT_SOCKETS:
                return None
            d = DirectReply(self._ctx, self._keys, self._client_id, self._address)
            self._all.append(d)
        self._mine.reply = d
        return d

    def _prove(self, d: DirectReply, generation: int) -> bool:
        """Have the manager answer a hello on ``d`` (a SUB socket drops what arrives before
        its subscription has reached the manager)."""
        deadline = time.monotonic() + DIRECT_PROOF
        with d.lock:
            while time.monotonic() < deadline and not self.closed:
                self._hello(d.tag)
                if any(m.kind == P.HELLO_ACK for m in d.messages(50)):
                    d.proven = generation
                    return True
        self.logger.debug("thread socket %s not answered within %g s: answers come through the I/O thread", d.tag, DIRECT_PROOF)
        return False

    def wait(self, p: Pending, d: DirectReply) -> Any:
        """``p.wait()`` for a request answered on ``d``: this thread receives its answer
        itself. Whatever ends a call otherwise (a deadline, a lost connection, release)
        still ends it: the I/O thread completes the future and this loop sees it within
        a poll slice."""
        assert p.future is not None
        future = p.future
        with d.lock:
            while not future.done() and not self.closed and time.monotonic() < p.deadline + COMMAND_TIMEOUT:
                for msg in d.messages(POLL_MS):
                    if msg.kind == P.RESULT:  # its own, or a late answer to an earlier call (dropped)
                        self._on_result(msg)
        return p.wait()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            directs, self._all = self._all, []
        for d in directs:
            d.close()
