"""The fast tier: routing policy and the control plane's state machine, in milliseconds.

The real router, dispatcher, services, health and reconciler, on a fake clock, loop,
wire, runtime and operations (tests/policy_sim.py; nothing here is a process or a
socket). The same behaviours are tested against real managers and containers in
tests/test_routing.py and the other files; these cover every branch quickly.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from infinibrain import protocol as P
from infinibrain.manager.changes import Changes
from infinibrain.manager.service import DrainRate
from infinibrain.manager.state import Request, State
from infinibrain.manager.validate import normalize_config
from infinibrain.manager.waitqueue import WaitQueue
from policy_sim import Sim


@pytest.fixture
def sim(tmp_path):
    s = Sim(tmp_path)
    yield s
    s.close()


def _req(mkey: int, priority: int = 0, accepted: float = 0.0, sub: str = "m", deadline: float = math.inf) -> Request:
    return Request(mkey=mkey, client="c", rid=str(mkey), pid=1, tid=0, inference="m", sub=sub, param={}, arr=None,
                   payload=[], time_stamp=[], send_deadline=deadline, answer_timeout=1.0, accepted=accepted, priority=priority)


# ---- the send-wait queue ---------------------------------------------------------------------------


@pytest.mark.parametrize("aging", [0.0, 1.0])
def test_higher_priority_first_and_equal_priorities_keep_their_order(aging):
    q = WaitQueue(aging)
    for mkey, priority in enumerate([0, 0, 5, 0, 5, -1, 9], start=1):
        q.push(_req(mkey, priority, accepted=mkey * 0.001))
    assert [r.mkey for r in q] == [7, 3, 5, 1, 2, 4, 6]  # the order get_queue_info shows
    assert [q.pop().mkey for _ in range(len(q))] == [7, 3, 5, 1, 2, 4, 6]


def test_aging_bounds_how_long_a_request_is_overtaken():
    """A request is never overtaken by one of priority p higher accepted more than p x aging after it."""
    q = WaitQueue(aging=1.0)
    q.push(_req(1, priority=0, accepted=100.0))
    q.push(_req(2, priority=2, accepted=101.9))  # 2 levels higher, 1.9 s later: goes first
    q.push(_req(3, priority=2, accepted=102.1))  # 2 levels higher, 2.1 s later: waits behind 1
    assert [q.pop().mkey for _ in range(3)] == [2, 1, 3]
    strict = WaitQueue(aging=0.0)  # strict priorities: any higher one goes first, however late
    strict.push(_req(1, priority=0, accepted=100.0))
    strict.push(_req(3, priority=2, accepted=500.0))
    assert strict.pop().mkey == 3


def test_expired_requests_leave_the_queue_wherever_they_wait():
    q = WaitQueue(aging=1.0)
    q.push(_req(1, priority=9, deadline=50.0))
    q.push(_req(2, priority=0, deadline=10.0))  # behind 1 in order, but due first
    q.push(_req(3, priority=0, deadline=80.0))
    assert q.expired(5.0) == []
    assert [r.mkey for r in q.expired(20.0)] == [2]
    assert [r.mkey for r in q.expired(60.0)] == [1] and len(q) == 1


def test_a_batch_is_the_head_and_the_next_in_order_for_one_module():
    q = WaitQueue(aging=0.0)
    for mkey, (priority, sub) in enumerate([(0, "x"), (1, "x"), (0, "y"), (0, "x")], start=1):
        q.push(_req(mkey, priority, accepted=mkey, sub=sub))
    assert [r.mkey for r in q.take("x", 8)] == [2, 1]  # stops at the request for another module
    assert [r.mkey for r in q.take("y", 8)] == [3]


def test_drain_rate_is_measured_over_the_last_seconds():
    rate = DrainRate()
    assert rate.rate(0, 100.0) == 0.0
    for second in range(4):  # sampled each second: 50 requests a second
        rate.sample(50 * second, 100.0 + second)
    assert rate.rate(175, 103.5) == pytest.approx(50, rel=0.05)
    assert rate.rate(175, 120.0) == 0.0  # nothing sampled within the span: no measure


# ---- priorities and bounded queues through the router ----------------------------------------------------


def test_the_urgent_request_overtakes_waiting_ones_but_not_the_one_in_flight(sim):
    sim.deploy("m", max_send_num=1)
    c = sim.serve("m")
    first = sim.request("m")
    low = [sim.request("m") for _ in range(3)]
    urgent = sim.request("m", priority=5)
    assert [h["rid"] for h in sim.sent_to(c)] == [first]  # in the container: not pre-empted
    assert [r.rid for r in sim.dispatcher.waiting("m")] == [urgent, *low]
    order = []
    for _ in range(5):
        key = sim.held(c)[0]
        order.append(c.in_flight[key].rid)
        sim.answer(c, key)
    assert order == [first, urgent, *low]
    assert all(sim.code(rid) == 0 for rid in order)


@pytest.mark.parametrize("priority", ["high", 1.5, True, 2**40, None])
def test_a_priority_that_is_not_a_32_bit_integer_is_refused_with_100(sim, priority):
    sim.deploy("m")
    sim.serve("m")
    rid = sim.request("m", priority=priority)
    assert sim.code(rid) == 100 and "priority" in sim.wire.results[rid]["detail"]


def test_a_full_queue_refuses_at_once_and_says_when_to_come_back(sim):
    sim.deploy("m", max_send_num=1, max_queue_size=2, send_timeout=4000)
    c = sim.serve("m")
    rids = [sim.request("m") for _ in range(3)]  # one in flight, two waiting
    refused = sim.request("m")
    header = sim.wire.results[refused]
    assert header["code"] == 305 and header["retry_after"] == 4.0  # nothing drained yet: send_timeout
    assert "max_queue_size 2" in header["detail"] and "retry after 4 s" in header["detail"]
    for _ in range(2):  # the queue drains at two requests a second
        sim.step(0.5)
        sim.answer(c, sim.held(c)[0])
    sim.request("m"), sim.request("m")
    header = sim.wire.results[sim.request("m")]
    assert header["code"] == 305 and 0.2 <= header["retry_after"] < 4.0  # two waiting, at the measured rate
    assert [sim.code(r) for r in rids[:2]] == [0, 0]


# ---- lateness, health and the last-replica rule ----------------------------------------------------------


def test_the_only_container_serves_again_right_after_its_late_answer(sim):
    """The reference's 401: a request answered late ends with 401; the next one is served
    (the late answer proves the container lives and is free again)."""
    sim.deploy("m", max_send_num=1, wait_queue_timeout=800)
    c = sim.serve("m")
    slow = sim.request("m")
    key = sim.held(c)[0]
    sim.run_for(0.85)
    assert sim.code(slow) == 401 and c.state is State.UNHEALTHY and c.unfit == "late"
    nxt = sim.request("m")  # the last replica: it waits for the container, not for a heartbeat
    assert sim.code(nxt) is None and sim.held(c) == []  # its late request still holds the credit
    sim.step(0.35)
    sim.answer(c, key)  # the late answer (dropped: its caller had 401)
    assert c.state is State.READY and sim.code(slow) == 401
    sim.answer(c, sim.held(c)[0])
    assert sim.code(nxt) == 0


def test_a_late_container_is_only_a_last_resort(tmp_path):
    sim = Sim(tmp_path)
    sim.deploy("m", ("a", "b"), max_send_num=2, wait_queue_timeout=500)
    a, b = sim.serve("m", "a"), sim.serve("m", "b")
    for _ in range(2):
        sim.request("m")
    sim.run_for(0.55)  # both requests late: one on each container
    assert a.state is b.state is State.UNHEALTHY
    sim.answer(a, next(iter(a.late)))  # a answered what it held: healthy again
    assert a.state is State.READY and b.state is State.UNHEALTHY
    rids = [sim.request("m") for _ in range(3)]
    assert len(sim.held(a)) == 2 and sim.held(b) == []  # b is not used while a is healthy, even when a is full
    assert sim.code(rids[2]) is None and [r.rid for r in sim.dispatcher.waiting("m")] == [rids[2]]
    sim.answer(a, sim.held(a)[0])
    assert [a.in_flight[k].rid for k in sim.held(a)][-1] == rids[2]  # a's credit, not b, took it
    sim.close()


def test_the_least_late_container_takes_requests_when_none_is_healthy(tmp_path):
    sim = Sim(tmp_path)
    sim.deploy("m", ("a", "b"), max_send_num=3, wait_queue_timeout=500)
    a, b = sim.serve("m", "a"), sim.serve("m", "b")
    for _ in range(3):
        sim.request("m")  # a gets two, b one (least loaded, then turns)
    sim.run_for(0.55)
    assert {len(a.late), len(b.late)} == {1, 2} and a.state is b.state is State.UNHEALTHY
    least = a if len(a.late) < len(b.late) else b
    rid = sim.request("m")
    assert [h["rid"] for h in sim.sent_to(least)][-1] == rid  # Envoy's panic mode: the least bad one
    sim.close()


def test_a_silent_container_is_not_a_last_resort_and_a_beat_heals_it(sim):
    sim.deploy("m", send_timeout=1000)
    c = sim.serve("m")
    sim.run_for(sim.config.liveness_timeout_ms / 1000 + 0.6)  # idle and silent
    assert c.state is State.UNHEALTHY and c.unfit == "silent"
    rid = sim.request("m")
    sim.run_for(1.1)
    assert sim.code(rid) == 306  # silence is not lateness: nothing is sent to it
    sim.beat(c)
    assert c.state is State.READY
    rid = sim.request("m")
    sim.answer(c, sim.held(c)[0])
    assert sim.code(rid) == 0


def test_an_idle_beat_clears_lateness(sim):
    sim.deploy("m", wait_queue_timeout=300)
    c = sim.serve("m")
    sim.request("m")
    sim.run_for(0.35)
    assert c.state is State.UNHEALTHY and c.late
    sim.beat(c)  # it waits for work again: it holds nothing
    assert c.state is State.READY and not c.late


def test_a_container_whose_connection_closed_is_not_ready_until_it_connects_again(sim):
    sim.deploy("m")
    c = sim.serve("m")
    rid = sim.request("m")
    sim.subscribe(c, on=False)  # its last subscription went
    assert sim.code(rid) == 402 and c.state is State.UNHEALTHY and c.unfit == "gone"
    assert "connection closed" in c.why and any(e["code"] == 114 for e in sim.wire.events)
    sim.connect(c)
    assert c.state is State.READY


# ---- retries -----------------------------------------------------------------------------------------


def test_a_request_whose_container_went_away_is_sent_to_another(tmp_path):
    sim = Sim(tmp_path)
    sim.deploy("m", ("a", "b"), retries=1, max_send_num=1)
    a, b = sim.serve("m", "a"), sim.serve("m", "b")
    first, second = sim.request("m"), sim.request("m")
    on_a = a.in_flight[sim.held(a)[0]].rid
    sim.subscribe(a, on=False)  # a dies holding its request
    assert sim.code(on_a) is None and sim.dispatcher.retried == 1
    sim.answer(b, sim.held(b)[0])  # b finishes its own, then takes a's
    retried = b.in_flight[sim.held(b)[0]]
    assert retried.rid == on_a and retried.tries == 1
    sim.answer(b, retried.mkey)
    assert sim.code(first) == sim.code(second) == 0  # one result each, no error
    sim.close()


def test_retries_are_bounded_by_their_count_and_the_request_deadline(tmp_path):
    sim = Sim(tmp_path, boards=("a", "b", "c"))
    sim.deploy("m", ("a", "b", "c"), retries=1, max_send_num=1, send_timeout=1000, wait_queue_timeout=1000)
    cs = [sim.serve("m", x) for x in "abc"]
    rid = sim.request("m")
    holder = next(c for c in cs if c.in_flight)
    sim.subscribe(holder, on=False)
    second = next(c for c in cs if c.in_flight)
    sim.subscribe(second, on=False)  # its one retry used up: 402
    assert sim.code(rid) == 402 and "went away" in sim.wire.results[rid]["detail"]
    late = sim.request("m")
    third = next(c for c in cs if c.in_flight)
    sim.run_for(0.5)
    sim.clock.now += 1.6  # past its deadline (send + answer timeouts from acceptance), not yet expired
    sim.subscribe(third, on=False)
    assert sim.code(late) == 402 and sim.dispatcher.retried == 1
    sim.close()


def test_without_retries_a_lost_container_ends_its_requests_with_402(tmp_path):
    sim = Sim(tmp_path)
    sim.deploy("m", ("a", "b"))
    a, _ = sim.serve("m", "a"), sim.serve("m", "b")
    rids = [sim.request("m") for _ in range(4)]
    held = [a.in_flight[k].rid for k in sim.held(a)]
    sim.subscribe(a, on=False)
    assert held and all(sim.code(r) == 402 for r in held) and sim.dispatcher.retried == 0
    assert all(sim.code(r) is None for r in rids if r not in held)
    sim.close()


def test_a_retried_request_that_no_container_takes_ends_with_402(sim):
    sim.deploy("m", retries=2, send_timeout=500)
    c = sim.serve("m")
    rid = sim.request("m")
    sim.subscribe(c, on=False)  # the only container: the request waits for another
    assert sim.code(rid) is None and [r.rid for r in sim.dispatcher.waiting("m")] == [rid]
    sim.run_for(0.6)
    assert sim.code(rid) == 402 and "no other container took it" in sim.wire.results[rid]["detail"]


def test_an_answered_request_is_never_sent_again(tmp_path):
    sim = Sim(tmp_path)
    sim.deploy("m", ("a", "b"), retries=3)
    a, _ = sim.serve("m", "a"), sim.serve("m", "b")
    rid = sim.request("m")
    holder = a if a.in_flight else sim.instance("m", "b")
    sim.answer(holder, sim.held(holder)[0], code=999)  # an error is an answer
    sim.subscribe(holder, on=False)
    assert sim.code(rid) == 999 and sim.dispatcher.retried == 0
    sim.close()


# ---- batches ------------------------------------------------------------------------------------------


def test_a_short_batch_waits_for_company_unless_its_head_is_urgent(sim):
    sim.deploy("m", max_batch_size=4, max_queue_delay=100, max_send_num=1)
    c = sim.serve("m")
    sim.from_container(c, P.HELLO, {"sub": "m", "hb": 2500, "batch": 4})  # its program asks for batches
    alone = sim.request("m")
    assert sim.held(c) == []  # held back for up to 100 ms, for more to come
    sim.run_for(0.15)
    assert [c.in_flight[k].rid for k in sim.held(c)] == [alone]
    sim.answer(c, sim.held(c)[0])
    waiting = [sim.request("m") for _ in range(2)]
    assert sim.held(c) == []
    urgent = sim.request("m", priority=1)  # an urgent head does not wait for company: it goes with those waiting
    assert [c.in_flight[k].rid for k in sim.held(c)] == [urgent, *waiting]
    assert len({r.batch for r in c.in_flight.values()}) == 1  # one message


# ---- the control plane ------------------------------------------------------------------------------------


def test_a_new_container_is_ready_once_its_connector_connects(sim):
    change = sim.deploy("m")
    c = sim.instance("m")
    assert c.state is State.STARTING and c.running and not change.future.done()
    sim.connect(c)
    sim.step()
    assert c.state is State.READY and change.future.result(5) is None


def test_a_container_that_never_connects_fails_naming_why(sim):
    change = sim.deploy("m", ready_timeout=1000)
    sim.run_for(1.5)  # the bound, and the reconciler's next pass after it
    c = sim.instance("m")
    assert c.state is State.FAILED and "never connected" in c.why and "the last line" in c.why
    with pytest.raises(Exception) as err:
        change.future.result(5)
    assert "never connected" in str(err.value)


def test_warm_up_decides_readiness(sim, tmp_path):
    sample = tmp_path / "sample.npy"
    np.save(sample, np.zeros((2, 2), np.uint8))
    change = sim.deploy("m", warmup=str(sample))
    c = sim.instance("m")
    sim.connect(c)
    sim.step()
    assert c.state is State.STARTING and c.warmup_key in c.in_flight  # warming up
    sim.answer(c, c.warmup_key)
    sim.step()
    assert c.state is State.READY and change.future.result(5) is None
    failing = sim.deploy("w", warmup=str(sample))
    w = sim.instance("w")
    sim.connect(w)
    sim.step()
    sim.answer(w, w.warmup_key, code=999)
    sim.step()
    assert w.state is State.FAILED and "warm-up" in w.why
    with pytest.raises(Exception):
        failing.future.result(5)


def test_an_exited_container_is_restarted_with_backoff_and_giving_up_is_told(sim):
    sim.deploy("m", run_option="--restart on-failure:2")
    c = sim.serve("m")
    for attempt in (1, 2):
        sim.runtime.boxes[c.id].exit_code = 137
        sim.step(0.6)
        assert c.state is State.FAILED and "137" in c.why
        sim.run_for(1.5 * attempt)  # the backoff: 0.5 s, then 1 s (each +-20 %)
        assert c.state is State.STARTING and sim.runtime.boxes[c.id].starts == attempt + 1
        sim.connect(c)
        sim.step()
        assert c.state is State.READY
    restarts = [e for e in sim.wire.events if e["what"] == "restart"]
    assert [e["code"] for e in restarts] == [0, 0] and "restarted (try 1)" in restarts[0]["message"]
    sim.runtime.boxes[c.id].exit_code = 1
    sim.run_for(3)
    assert c.state is State.FAILED and [e["code"] for e in sim.wire.events if e["what"] == "restart"][-1] == 302


def test_without_a_policy_a_failed_container_stays_failed(sim):
    sim.deploy("m")
    c = sim.serve("m")
    sim.runtime.boxes[c.id].exit_code = 1
    sim.run_for(5)
    assert c.state is State.FAILED and sim.runtime.boxes[c.id].starts == 1


@pytest.mark.parametrize("policy", ["--restart on-failure", None])
def test_a_hung_container_is_restarted_after_the_liveness_timeout_if_its_policy_allows(sim, policy):
    sim.deploy("m", wait_queue_timeout=500, run_option=policy)
    c = sim.serve("m")
    sim.request("m")
    sim.run_for(0.6)
    assert c.state is State.UNHEALTHY
    liveness = sim.config.liveness_timeout_ms / 1000
    sim.run_for(liveness - 1)
    assert c.state is State.UNHEALTHY  # late, not yet hung
    sim.run_for(2.5)
    if policy:
        assert sim.runtime.boxes[c.id].starts == 2 and c.state is State.STARTING and not c.late
    else:
        assert c.state is State.UNHEALTHY and sim.runtime.boxes[c.id].starts == 1


def test_a_disconnected_container_whose_process_is_gone_has_failed(sim):
    sim.deploy("m")
    c = sim.serve("m")
    sim.runtime.gone.add(c.id)  # a board's poll has not seen it yet; asking the board does
    sim.subscribe(c, on=False)
    assert c.state is State.UNHEALTHY
    sim.run_for(5.5)
    assert c.state is State.FAILED and "process is gone" in c.why


def _changes(sim: Sim) -> Changes:
    return Changes(sim.reconciler, sim.registry, sim.dispatcher)


def test_an_update_rolls_the_old_container_serving_until_the_new_is_ready(sim):
    sim.deploy("m", max_send_num=1)
    old = sim.serve("m")
    changes = _changes(sim)
    cfg = normalize_config({"name": "m", "implementation_type": "Loop", "input": "Main", "output": "Main", "max_send_num": 2,
                            "force_update": True})
    done = changes.load(changes.plan_load(cfg, ["a"]), None)
    sim.step()
    new = sim.instance("m")
    assert new is not old and new.state is State.STARTING and old.state is State.READY
    rid = sim.request("m")
    assert sim.sent_to(old)[-1]["rid"] == rid  # the old one serves meanwhile
    sim.connect(new)
    sim.step()
    assert new.state is State.READY and old.state is State.STOPPING  # draining its request
    sim.answer(old, sim.held(old)[0])
    sim.step(0.3)  # the next pass stops it
    assert sim.code(rid) == 0 and old.id not in sim.dispatcher.containers and done.result(5) is None


def test_an_update_without_surge_stops_the_old_container_first(tmp_path):
    sim = Sim(tmp_path, boards=("a", "b"), surge=False)
    sim.deploy("m", ("a", "b"))
    olds = [sim.serve("m", b) for b in "ab"]
    changes = _changes(sim)
    cfg = normalize_config({"name": "m", "implementation_type": "Loop", "input": "Main", "output": "Main", "force_update": True})
    done = changes.load(changes.plan_load(cfg, ["a", "b"]), None)
    sim.step()
    gone = [o for o in olds if o.id not in sim.dispatcher.containers]
    assert len(gone) == 1  # one board at a time; the other old container serves
    first = sim.instance("m", gone[0].board)
    sim.connect(first)
    sim.step()
    second = sim.instance("m", "b" if first.board == "a" else "a")
    assert second.revision == 2
    sim.connect(second)
    sim.step()
    assert done.result(5) is None
    sim.close()


def test_a_failed_update_is_undone_and_the_old_version_keeps_serving(sim):
    sim.deploy("m")
    old = sim.serve("m")
    sim.runtime.fail_start.add("m-a.r2")
    changes = _changes(sim)
    cfg = normalize_config({"name": "m", "implementation_type": "Loop", "input": "Main", "output": "Main", "max_send_num": 3,
                            "force_update": True})
    done = changes.load(changes.plan_load(cfg, ["a"]), None)
    sim.step()
    sim.step()
    with pytest.raises(Exception) as err:
        done.result(5)
    assert "cannot start" in str(err.value) and "keeps serving on m-a" in str(err.value)
    assert sim.registry.registrations["m"].revision == 1 and old.state is State.READY
    assert sim.reconciler.current("m", "a") is old


def test_stop_start_and_unload(sim):
    sim.deploy("m")
    c = sim.serve("m")
    changes = _changes(sim)
    stopped = changes.set_running("stop", "m", "a", False, None)
    sim.step()
    assert c.state is State.STOPPED and not sim.runtime.boxes[c.id].running and stopped.result(5) is None
    started = changes.set_running("start", "m", "a", True, None)
    sim.step()
    sim.connect(c)
    sim.step()
    assert c.state is State.READY and started.result(5) is None
    gone = changes.unload("m", "")
    sim.step()
    assert gone.result(5) is None and "m" not in sim.registry.registrations and c.id not in sim.dispatcher.containers


# ---- per-client bounds ---------------------------------------------------------------------------------


def test_a_client_may_hold_only_so_many_requests_and_bytes(tmp_path):
    sim = Sim(tmp_path, max_client_requests=3, max_client_bytes=10)
    sim.deploy("m", max_send_num=1)
    c = sim.serve("m")
    held = [sim.request("m") for _ in range(3)]  # 4 bytes each ("data")
    assert [sim.code(r) for r in held] == [None, None, 305]  # 12 bytes would pass max_client_bytes
    assert "max_client_bytes 10" in sim.wire.results[held[2]]["detail"]
    other = sim.request("m", client="c2")  # another client is not held back by this one
    assert sim.code(other) is None
    sim.answer(c, sim.held(c)[0])  # one ended: c1 may send one more
    again = sim.request("m")
    assert sim.code(again) is None and sim.clients["c1"].outstanding == 2
    sim.close()
