"""Traces across the request path: the manager's spans (and the container's, which come
back with its answer) for a request whose application sent a W3C ``traceparent``,
exported over OTLP/HTTP to ``otlp_endpoint`` (``[manager]``; empty = off).

Each traced request gets, in the application's trace:
- ``infinibrain.queue``: from the manager accepting it to sending it to a container;
- ``infinibrain.dispatch``: from sending to the answer (its container, board, code);
- ``infinibrain.container``: the container's receive → answer, as its Connector timed it
  (a child of dispatch; the container's clock), and a container's calls to other
  inferences are children of the request they serve.
Sampling: parent-based (the application's sampled flag), and a request that failed or
took longer than ``trace_slow_ms`` is kept whatever the flag said. A sampled request's
spans are made as it goes; an unsampled one records only its times (a few integers) and
its spans are made at its end if it is kept, so tracing at 1% costs the other 99% almost
nothing. The spans of an unsampled request kept at its end have ids of their own: its
container's calls, which carried a made-up parent id, show in the trace without a parent.

Router thread (the exporter has a thread of its own). Needs ``opentelemetry-sdk`` and
``opentelemetry-exporter-otlp-proto-http`` (the ``tracing`` extra); without them a
configured endpoint is logged once and ignored.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

from infinibrain.tracing import traceparent_of

log = logging.getLogger(__name__)


class NullTracing:
    """Tracing off: nothing is recorded."""

    enabled = False

    def accepted(self, req: Any, traceparent: Any) -> None:
        pass

    def sent(self, req: Any) -> str | None:
        return None

    def ended(self, req: Any, code: int, container: Any = None, where: dict | None = None) -> None:
        pass

    def close(self) -> None:
        pass


_HEX = frozenset("0123456789abcdef")


def parse_traceparent(value: Any) -> tuple[str, str, bool] | None:
    """(trace id, parent span id, sampled) of a W3C ``traceparent``, or None for one that is not."""
    if not isinstance(value, str) or len(value) != 55:
        return None
    version, trace_id, span_id, flags = value.split("-") if value.count("-") == 3 else ("", "", "", "")
    if version != "00" or len(trace_id) != 32 or len(span_id) != 16 or len(flags) != 2 \
            or not _HEX.issuperset(trace_id + span_id + flags) or trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


class _Trace:
    """A traced request's spans: made as it goes when its trace is sampled; otherwise only
    its times, and the spans made at its end if it is kept (failed or slow)."""

    __slots__ = ("trace_id", "parent_id", "sampled", "queue", "dispatch", "accepted_ns", "sent_ns", "handed")

    def __init__(self, trace_id: str, parent_id: str, sampled: bool, accepted_ns: int) -> None:
        self.trace_id, self.parent_id, self.sampled, self.accepted_ns = trace_id, parent_id, sampled, accepted_ns
        self.queue: Any = None
        self.dispatch: Any = None
        self.sent_ns = 0
        self.handed = ""  # the traceparent the container was given


class Tracing(NullTracing):
    enabled = True

    def __init__(self, endpoint: str, slow_ms: int, service: str) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON

        self.slow_ns = slow_ms * 1_000_000
        # The sampling decision is ours (sampled, failed or slow): every span made is recorded.
        self.provider = TracerProvider(resource=Resource.create({"service.name": service}), sampler=ALWAYS_ON)
        self._batch = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, timeout=5), schedule_delay_millis=500)
        self.provider.add_span_processor(self._batch)
        self.tracer = self.provider.get_tracer("infinibrain.manager")
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, Status, StatusCode, TraceFlags

        self._in = trace.set_span_in_context  # imported once, not per request
        self._remote = lambda t: NonRecordingSpan(SpanContext(int(t.trace_id, 16), int(t.parent_id, 16), is_remote=True,
                                                              trace_flags=TraceFlags(1 if t.sampled else 0)))
        self._error = lambda code: Status(StatusCode.ERROR, f"code {code}")
        log.info("traces of traced requests go to %s (kept: sampled, failed, or slower than %d ms)", endpoint, slow_ms)

    # Each entry point is guarded: a fault in tracing leaves the request untraced, never lost.

    def accepted(self, req: Any, traceparent: Any) -> None:
        parsed = parse_traceparent(traceparent)
        if parsed is None:
            return
        req.trace = t = _Trace(*parsed, time.time_ns())
        if t.sampled:
            try:
                self._queue_span(t, req.inference)
            except Exception:
                log.debug("tracing: a request left untraced", exc_info=True)
                req.trace = None

    def sent(self, req: Any) -> str | None:
        """The request goes to a container: the traceparent it hands on (its calls join the
        trace with it). A sampled trace's dispatch span starts now."""
        t = req.trace
        if t is None:
            return None
        if not t.sent_ns:
            t.sent_ns = time.time_ns()
            if t.sampled:
                try:
                    self._dispatch_span(t)
                    t.handed = traceparent_of(t.dispatch.get_span_context())
                except Exception:
                    log.debug("tracing: a request left untraced", exc_info=True)
                    req.trace = None
                    return None
            else:  # not sampled: the container and its calls still carry the trace id
                t.handed = f"00-{t.trace_id}-{os.urandom(8).hex()}-00"
        return t.handed

    def ended(self, req: Any, code: int, container: Any = None, where: dict | None = None) -> None:
        """The request ended with ``code``: its spans end, exported if it is kept."""
        t = req.trace
        if t is None:
            return
        req.trace = None
        now = time.time_ns()
        if not (t.sampled or code != 0 or now - t.accepted_ns > self.slow_ns):
            return  # neither sampled, failed nor slow: nothing was made, nothing to send
        try:
            self._finish(t, req.inference, code, container, where or {}, now)
        except Exception:
            log.debug("tracing: a request's spans were lost", exc_info=True)

    def _queue_span(self, t: _Trace, inference: str) -> None:
        parent = self._in(self._remote(t))  # the application's span, from the traceparent parsed at acceptance
        t.queue = self.tracer.start_span("infinibrain.queue", context=parent, start_time=t.accepted_ns,
                                         attributes={"infinibrain.inference": inference})

    def _dispatch_span(self, t: _Trace) -> None:
        t.dispatch = self.tracer.start_span("infinibrain.dispatch", context=self._in(t.queue), start_time=t.sent_ns)

    def _finish(self, t: _Trace, inference: str, code: int, container: Any, where: dict, now: int) -> None:
        if t.queue is None:  # kept at its end: its spans are made now, with the times it recorded
            self._queue_span(t, inference)
            if t.sent_ns:
                self._dispatch_span(t)
        spans = [t.queue] + ([t.dispatch] if t.dispatch is not None else [])
        if t.dispatch is not None and isinstance(container, list) and len(container) == 2 \
                and all(isinstance(x, int) for x in container) and container[0] <= container[1]:
            inner = self.tracer.start_span("infinibrain.container", context=self._in(t.dispatch),
                                           start_time=container[0], attributes=dict(where))
            inner.set_attribute("infinibrain.code", code)
            inner.end(end_time=container[1])
        for span in spans:
            span.set_attribute("infinibrain.code", code)
            for k, v in where.items():
                span.set_attribute(k, v)
            if code:
                span.set_status(self._error(code))
        t.queue.end(end_time=t.sent_ns or now)
        if t.dispatch is not None:
            t.dispatch.end(end_time=now)

    def close(self) -> None:
        self.provider.shutdown()


def make_tracing(endpoint: str, slow_ms: int, service: str) -> NullTracing:
    if not endpoint:
        return NullTracing()
    try:
        return Tracing(endpoint, slow_ms, service)
    except ImportError as exc:
        log.warning("otlp_endpoint is set but OpenTelemetry's SDK is missing (%s): pip install infinibrain[tracing]; "
                    "no traces", exc)
        return NullTracing()
