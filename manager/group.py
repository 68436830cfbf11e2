"""A manager group: several managers, one leading, elected through etcd (``[manager]
etcd``); the registry lives in etcd, and only the leader changes the cluster and routes.

Election: every member holds an etcd lease of ``leader_lease_s`` seconds (renewed six
times in it) and a member key on it (``<prefix>/members/<id>``); the leader is who
created ``<prefix>/leader`` on its lease (a transaction that succeeds only while the key
does not exist). A standby tries that transaction twice a second; the key goes when the
leader's lease expires (the leader died, or cannot reach etcd) or when it resigns.

Fencing: every write the leader makes is a transaction that succeeds only while the
leader key is still the one it created (its create revision: the term). A deposed
leader that comes back (a paused process, a cut network) can change nothing; it also
stops routing on its own clock: its lease is valid until the moment it asked for the
last renewal that succeeded, plus the TTL (etcd counts from later than that), and the
router loop looks at that deadline every time it wakes (``leading``). The workers that
act on boards look too (manager/operations.py).

Quorum: when the renewal fails and a reachable etcd member says its cluster has no
leader, nobody can be elected and etcd keeps every lease (a new etcd leader renews them
all): the leader goes on routing, refuses changes (309, naming why) until etcd answers
again, and says so in status. (A leader that sees only a minority of etcd members, cut
from a majority that lives on, would go on routing too: docs/DECISIONS.md "A manager group".)

The group's thread runs everything here that talks to etcd (``run``); the router thread
reads ``leading``, ``refusal`` and ``snapshot`` (plain values, set by the group's thread),
the registry's writer calls ``put`` and ``delete`` (its own Etcd: one connection each).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Callable

from infinibrain.errors import make_error

from .config import ManagerConfig
from .etcd import Etcd, EtcdUnavailable, b64, decoded

log = logging.getLogger("infinibrain.manager.group")

CAMPAIGN_EVERY = 0.5  # seconds between a standby's attempts to lead
RENEWALS = 6  # the leader renews its lease this many times per TTL: a quorum lost just after one is
# seen (etcd's members say they have no leader about a second later) well before the lease would run out
RETRY_EVERY = 0.1  # seconds between a leader's attempts to renew after one failed
CALL_TIMEOUT = 0.5  # seconds one etcd endpoint has to answer the group's calls (then the next one)
WRITE_TIMEOUT = 2.0  # seconds one endpoint has to take a registry write
MEMBERS_EVERY = 2.0  # seconds between readings of the group's members (for status)
MARGIN = 0.2  # seconds of the lease given up: the leader stops this much before etcd could expire it


class Group:
    def __init__(self, config: ManagerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.ttl = config.leader_lease_s
        self.prefix = config.etcd_prefix
        self.clock = clock
        self.etcd = self._connect(CALL_TIMEOUT)
        self.lease = 0
        self.term = 0  # the create revision of the leader key this manager made: its fence
        self.valid_until = 0.0  # leads (and routes) until then, on its own clock
        self.no_quorum = ""  # why etcd cannot take changes now ("" = it can)
        self.renewed_at = 0.0
        self.snapshot: dict = {"enabled": True, "id": self.id, "role": "standby"}
        self._stop = threading.Event()
        self._member_written = False
        self._lost: Callable[[], None] = lambda: None
        self._thread: threading.Thread | None = None
        self._members_at = 0.0

    def _connect(self, timeout: float) -> Etcd:
        c = self.config
        return Etcd(c.etcd, timeout=timeout, ca_file=c.etcd_ca_file, cert_file=c.etcd_cert_file,
                    key_file=c.etcd_key_file, user=c.etcd_user, password_file=c.etcd_password_file)

    def key(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts))

    # ---- what the router thread reads ---------------------------------------------------------

    def leading(self) -> bool:
        """Whether this manager may route and change the cluster now (any thread)."""
        return self.term != 0 and (self.clock() < self.valid_until or bool(self.no_quorum))

    def refusal(self) -> str:
        """Why changes are refused now, or "" (any thread)."""
        if self.no_quorum:
            return f"the group's store cannot take changes now ({self.no_quorum}); the leader serves requests meanwhile"
        return "" if self.leading() else "this manager no longer leads the group"

    # ---- standing by, leading -----------------------------------------------------------------

    def campaign(self, stop: threading.Event) -> bool:
        """Stand by until this manager leads (True), or ``stop`` is set (False). Caller's thread."""
        last_error = ""
        while not stop.is_set():
            try:
                self._keep_lease()
                if self._try_lead():
                    return True
                last_error = ""
            except EtcdUnavailable as exc:
                if exc.text != last_error:
                    log.warning("group: etcd: %s; standing by", exc.text)
                last_error = exc.text
            stop.wait(CAMPAIGN_EVERY)
        return False

    def _keep_lease(self) -> None:
        """This member's lease renewed (a new one if it expired), its member key written."""
        asked = self.clock()
        if not (self.lease and self.etcd.keepalive(self.lease, self.etcd.timeout) > 0):
            self.lease, self._member_written = self.etcd.grant(self.ttl), False
            log.info("group: member %s standing by (lease %x, %d s)", self.id, self.lease, self.ttl)
        self.renewed_at = asked
        if not self._member_written:
            member = {"id": self.id, "host": self.config.host, "port": self.config.port, "pid": os.getpid(),
                      "since": time.time()}
            self.etcd.txn([], [{"request_put": {"key": b64(self.key("members", self.id)),
                                                "value": b64(json.dumps(member)), "lease": self.lease}}])
            self._member_written = True

    def _try_lead(self) -> bool:
        """Lead if nobody does: True when this member leads now. The leader key on this
        member's own lease (an election whose answer was lost, or a lead given up while
        the lease lived on) is this member's lead: it is taken up again."""
        leader, transitions = self.key("leader"), self.key("transitions")
        seen = self.etcd.range(transitions)
        count = int(seen[0]["value"] or 0) + 1 if seen else 1
        value = {"id": self.id, "host": self.config.host, "port": self.config.port, "since": time.time()}
        ok, answer = self.etcd.txn(
            [{"key": b64(leader), "target": "CREATE", "result": "EQUAL", "create_revision": 0},
             {"key": b64(transitions), "target": "MOD", "result": "EQUAL", "mod_revision": seen[0]["mod_revision"] if seen else 0}],
            [{"request_put": {"key": b64(leader), "value": b64(json.dumps(value)), "lease": self.lease}},
             {"request_put": {"key": b64(transitions), "value": b64(str(count))}}],
            ({"request_range": {"key": b64(leader)}},))
        if ok:
            term = int(answer["header"]["revision"])
        else:
            kvs = [decoded(kv) for r in answer.get("responses", [])
                   for kv in r.get("response_range", {}).get("kvs", [])]
            if not kvs or kvs[0]["lease"] != self.lease:
                return False  # another member leads (or the transition count moved: try again)
            term, count = kvs[0]["create_revision"], count - 1
            value = json.loads(kvs[0]["value"])
            log.info("group: the leader key is on this member's lease: leading again")
        self.term = term
        self.valid_until = self.renewed_at + self.ttl - MARGIN  # the lease was renewed just before
        self.no_quorum = ""
        self.snapshot = {**self.snapshot, "role": "leader", "leader": value, "term": self.term, "transitions": count}
        log.info("group: %s leads (term %d, transition %d)", self.id, self.term, count)
        self._members_at = 0.0
        self._read_members()
        return True

    def start(self, lost: Callable[[], None]) -> None:
        """Keep the lead on the group's thread; ``lost()`` when it is lost (from that thread)."""
        self._stop = threading.Event()  # its own: a thread still ending from an earlier lead keeps the old one
        self._lost = lost
        self._thread = threading.Thread(target=self.run, args=(self._stop,), name="group", daemon=True)
        self._thread.start()

    def run(self, stop: threading.Event) -> None:
        wait = self.ttl / RENEWALS
        while not stop.wait(wait):
            state = self._renew()
            if state == "lost" or (state == "failed" and self.clock() >= self.valid_until):
                self.term = 0
                self.snapshot = {**self.snapshot, "role": "standby"}
                log.warning("group: %s lost the lead (its lease could not be renewed in time); stepping down", self.id)
                self._lost()
                return
            wait = self.ttl / RENEWALS if state == "renewed" else RETRY_EVERY

    def _renew(self) -> str:
        """One renewal of the lead: "renewed", "no quorum" (etcd cannot renew it, nor let
        anyone else lead), "failed" (no answer: try again until the lease runs out), or
        "lost" (etcd says the lease is gone)."""
        asked = self.clock()
        try:
            ttl = self.etcd.keepalive(self.lease, CALL_TIMEOUT)
        except EtcdUnavailable as exc:
            if exc.no_leader or self.etcd.leaderless():
                if not self.no_quorum:
                    log.error("group: etcd has no quorum (%s): requests are still served, changes are refused", exc.text)
                self.no_quorum = exc.text if exc.no_leader else "etcd has no leader"
                self.snapshot = {**self.snapshot, "quorum": False}
                return "no quorum"
            log.warning("group: renewing the lead failed: %s", exc.text)
            return "failed"
        if ttl <= 0:
            return "lost"
        if self.no_quorum:
            log.info("group: etcd answers again: changes are accepted")
        self.valid_until = asked + ttl - MARGIN
        self.renewed_at = asked
        self.no_quorum = ""
        self.snapshot = {**self.snapshot, "quorum": True}
        self._read_members()
        return "renewed"

    def _read_members(self) -> None:
        now = self.clock()
        if now - self._members_at < MEMBERS_EVERY:
            return
        self._members_at = now
        try:
            members = [json.loads(kv["value"]) for kv in self.etcd.range(self.key("members", ""), prefix=True,
                                                                               serializable=True)]
            leader = self.etcd.range(self.key("leader"), serializable=True)
        except (EtcdUnavailable, ValueError):
            return
        self.snapshot = {**self.snapshot, "members": sorted(members, key=lambda m: m.get("id", "")),
                         "leader": json.loads(leader[0]["value"]) if leader else None}

    def stop(self) -> None:
        """Stop keeping the lead and give it up (a standby takes over at once)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.etcd.timeout * 4 + 1)
        if self.lease:
            try:
                self.etcd.revoke(self.lease)
            except EtcdUnavailable as exc:
                log.warning("group: could not resign (%s): a standby leads once the lease expires", exc.text)
            self.lease = 0
        self.term = 0

    def status(self) -> dict:
        """The group as status shows it (router thread: a copy of what the group's thread read)."""
        s = dict(self.snapshot)
        s["lease_age_s"] = round(max(0.0, self.clock() - self.renewed_at), 2) if self.renewed_at else None
        s["lease_s"] = self.ttl
        s["changes"] = "refused: " + self.no_quorum if self.no_quorum else "accepted"
        return s

    # ---- fenced writes (the registry's writer thread) ------------------------------------------

    def writer(self) -> "Writer":
        return Writer(self, self._connect(WRITE_TIMEOUT))


class Writer:
    """The registry's writes into etcd, each fenced by the leader's term, and its reads
    (each Writer used by one thread: the registry's writer, or the threads that read)."""

    def __init__(self, group: Group, etcd: Etcd) -> None:
        self.group, self.etcd = group, etcd
        self.term = group.term  # the lead this writer writes for: no other, even after it ends

    def _fenced(self, op: dict) -> None:
        g = self.group
        if not self.term or g.term != self.term:
            raise make_error(309, "the cluster", detail=f"this manager no longer leads its group (term {self.term})")
        if g.no_quorum:
            raise make_error(309, "the cluster", detail=g.refusal())
        try:
            ok, _ = self.etcd.txn([{"key": b64(g.key("leader")), "target": "CREATE", "result": "EQUAL",
                                    "create_revision": self.term}], [op])
        except EtcdUnavailable as exc:
            raise make_error(309, "the cluster", detail=f"the group's store (etcd) did not take the change: {exc.text}") from None
        if not ok:  # another manager leads: this one stops routing at once (the loop's fence)
            g.valid_until, g.no_quorum = 0.0, ""
            raise make_error(309, "the cluster", detail=f"this manager no longer leads its group (term {g.term}): "
                                                         f"ask the one that leads now")

    def put(self, key: str, value: str) -> None:
        self._fenced({"request_put": {"key": b64(self.group.key(key)), "value": b64(value)}})

    def delete(self, key: str) -> None:
        self._fenced({"request_delete_range": {"key": b64(self.group.key(key))}})

    def load(self, key: str, prefix: bool = False) -> list[dict]:
        """What etcd holds (linearizable: the last leader's every write); 309 when it cannot say."""
        try:
            return self.etcd.range(self.group.key(key), prefix=prefix)
        except EtcdUnavailable as exc:
            raise make_error(309, "the cluster", detail=f"the group's store (etcd) cannot be read now: {exc.text}") from None
