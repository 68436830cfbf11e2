"""Calls: a container's request to another inference (``Connector.infer``/``infer_image``).

A call is an ordinary request of the inference it names (the same queue, priorities,
batching, retries and numbered errors), made on behalf of the calling container, with
three rules taken from what the manager knows rather than from what the call says:

- **Its parent** is the request the caller is serving, named by the key the manager gave
  it (``mkey``) and looked up among the requests in flight *at that container*: a
  container can only speak for its own work. The call inherits the parent's priority,
  and must end by the parent's deadline (it ends with 306/401 by then at the latest).
  A call made outside any request (a producer, a warm-up's own call) has no parent:
  priority 0 and the inference's own timeouts.
- **No cycles.** A call carries the chain of inferences waiting for it; one that names an
  inference already in its chain (A calls B calls A) is refused with 100 at once, as is
  a chain deeper than ``MAX_DEPTH``: either would only wait for itself until its deadline.
- **Its answer** goes to the calling Connector's own topic on the container side, as a
  ``RESULT`` with the call's number; each calling instance counts as one client for the
  per-client bounds (max_client_requests, max_client_bytes).
- **Its data** may be in the caller's shared memory (a Connector that shares /dev/shm
  with the manager): segments of the owner ``shm.caller_owner(instance)``, made from the
  instance the caller's key proves, checked like a client's (its probe, read here); the
  manager passes the name on to a container that reads them, else reads them itself.

Router thread.
"""
from __future__ import annotations

import logging
import math

from infinibrain import protocol as P

from .dispatch import Dispatcher
from .state import Client, Instance, Origin, caller_id
from .wire import Wire

log = logging.getLogger(__name__)

MAX_DEPTH = 16  # inferences in one chain of calls


class Calls:
    def __init__(self, dispatcher: Dispatcher, wire: Wire) -> None:
        self.dispatcher = dispatcher
        self.wire = wire
        self.callers = dispatcher.callers

    def call(self, c: Instance, msg: P.Message, now: float) -> None:
        """Container ``c`` asks another inference (a ``CALL`` message)."""
        h = msg.header
        sub = h.get("sub")
        if not isinstance(sub, str) or sub not in c.subs:
            raise P.ProtocolError(f"a call from {c.id} for a module it does not serve ({sub!r})")
        if not isinstance(h.get("rid"), (str, int)):
            raise P.ProtocolError(f"a call from {c.id} without a number")
        reply = P.container_topic(c.id, sub)
        rid, name = str(h["rid"]), h.get("inf")
        parent = None
        if h.get("parent") is not None:
            parent = c.in_flight.get(h["parent"]) if isinstance(h["parent"], int) else None
            if parent is None:
                return self.wire.fail(reply, rid, 100, "response", detail=(
                    "the request this call was made for has ended (answered, or past its deadline) or is not this "
                    "container's: pass the InferenceResponse of the request being served"))
        chain = (*(parent.chain if parent else ()), c.inference)
        if name in chain:
            return self.wire.fail(reply, rid, 100, "inference_name", detail=(
                f"calling {name!r} from {c.inference!r} makes a cycle ({' -> '.join((*chain, str(name)))}): "
                f"{name!r} is waiting for this call already"))
        if len(chain) >= MAX_DEPTH:
            return self.wire.fail(reply, rid, 100, "inference_name", detail=(
                f"a chain of calls deeper than {MAX_DEPTH} inferences ({' -> '.join(chain)})"))
        cid = caller_id(c)
        caller = self.callers.get(cid)
        if caller is None:
            caller = self.callers[cid] = Client(cid, 0, now, role="infer")
        header = dict(h, rid=rid, lean=False, ts=[["container_call", P.now()]])
        # It must end while its parent may still be answered (the parent's container's deadline).
        origin = Origin(parent.priority, parent.answer_deadline, chain) if parent is not None \
            else Origin(0, math.inf, chain)
        self.dispatcher.accept(caller, P.Message(msg.topic, header, msg.payload), origin, reply)
