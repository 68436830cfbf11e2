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
took longer than ``trace_slow_ms`` is kept whatever the flag said: its spans are made as
it goes and exported only when it ends, once the outcome is known.

Router thread (the exporter has a thread of its own). Needs ``opentelemetry-sdk`` and
``opentelemetry-exporter-otlp-proto-http`` (the ``tracing`` extra); without them a
configured endpoint is logged once and ignored.
"""
from __future__ import annotations

import logging
import time
from typing import Any

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


class _Trace:
    __slots__ = ("sampled", "queue", "dispatch", "sent_ns", "accepted_ns")

    def __init__(self, sampled: bool, queue: Any, accepted_ns: int) -> None:
        self.sampled, self.queue, self.sent_ns, self.accepted_ns = sampled, queue, 0, accepted_ns
        self.dispatch: Any = None  # the span from sending to the answer, once sent


class Tracing(NullTracing):
    enabled = True

    def __init__(self, endpoint: str, slow_ms: int, service: str) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.slow_ns = slow_ms * 1_000_000
        self._propagator = TraceContextTextMapPropagator()
        # Every traced request's spans are made; which are exported is decided when it ends (_KeptOnly).
        self.provider = TracerProvider(resource=Resource.create({"service.name": service}), sampler=ALWAYS_ON)
        self._batch = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, timeout=5), schedule_delay_millis=500)
        self.provider.add_span_processor(_kept_only(self._batch))
        self.tracer = self.provider.get_tracer("infinibrain.manager")
        log.info("traces of traced requests go to %s (kept: sampled, failed, or slower than %d ms)", endpoint, slow_ms)

    def accepted(self, req: Any, traceparent: Any) -> None:
        if not isinstance(traceparent, str) or len(traceparent) > 128:
            return
        try:
            self._accepted(req, traceparent)
        except Exception:  # tracing never costs a request: it goes on untraced
            log.debug("tracing: a request left untraced", exc_info=True)
            req.trace = None

    def _accepted(self, req: Any, traceparent: str) -> None:
        from opentelemetry import trace

        parent = self._propagator.extract({"traceparent": traceparent})
        context = trace.get_current_span(parent).get_span_context()
        if not context.is_valid:
            return
        now = time.time_ns()
        queue = self.tracer.start_span("infinibrain.queue", context=parent, start_time=now,
                                       attributes={"infinibrain.inference": req.inference, "infinibrain.priority": req.priority})
        req.trace = _Trace(bool(context.trace_flags.sampled), queue, now)

    def sent(self, req: Any) -> str | None:
        """The request goes to a container: the queue span's time is over, the dispatch
        span starts; its traceparent, for the container."""
        t = req.trace
        if t is None:
            return None
        try:
            return self._sent(t)
        except Exception:
            log.debug("tracing: a request left untraced", exc_info=True)
            req.trace = None
            return None

    def _sent(self, t: _Trace) -> str | None:
        from opentelemetry import trace

        now = time.time_ns()
        if t.dispatch is None:
            t.sent_ns = now
            parent = trace.set_span_in_context(t.queue)
            t.dispatch = self.tracer.start_span("infinibrain.dispatch", context=parent, start_time=now)
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=trace.set_span_in_context(t.dispatch))
        return carrier.get("traceparent")

    def ended(self, req: Any, code: int, container: Any = None, where: dict | None = None) -> None:
        """The request ended with ``code``: its spans end, and are exported if kept."""
        t = req.trace
        if t is None:
            return
        req.trace = None
        try:
            self._ended(t, code, container, where)
        except Exception:
            log.debug("tracing: a request's spans were lost", exc_info=True)

    def _ended(self, t: _Trace, code: int, container: Any, where: dict | None) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import Status, StatusCode

        now = time.time_ns()
        keep = t.sampled or code != 0 or now - t.accepted_ns > self.slow_ns
        spans = [t.queue] + ([t.dispatch] if t.dispatch is not None else [])
        if t.dispatch is not None and isinstance(container, list) and len(container) == 2 \
                and all(isinstance(x, int) for x in container) and container[0] <= container[1]:
            inner = self.tracer.start_span("infinibrain.container", context=trace.set_span_in_context(t.dispatch),
                                           start_time=container[0], attributes=dict(where or {}))
            inner.set_attribute("infinibrain.keep", keep)
            inner.set_attribute("infinibrain.code", code)
            inner.end(end_time=container[1])
        for span in spans:
            span.set_attribute("infinibrain.keep", keep)
            span.set_attribute("infinibrain.code", code)
            for k, v in (where or {}).items():
                span.set_attribute(k, v)
            if code:
                span.set_status(Status(StatusCode.ERROR, f"code {code}"))
        t.queue.end(end_time=t.sent_ns or now)
        if t.dispatch is not None:
            t.dispatch.end(end_time=now)

    def close(self) -> None:
        self.provider.shutdown()


def _kept_only(inner: Any) -> Any:
    """A span processor that hands on to ``inner`` only the spans of requests kept
    (sampled, failed or slow: the ``infinibrain.keep`` attribute)."""
    from opentelemetry.sdk.trace import SpanProcessor

    class KeptOnly(SpanProcessor):
        def on_end(self, span: Any) -> None:
            if (span.attributes or {}).get("infinibrain.keep"):
                inner.on_end(span)

        def shutdown(self) -> None:
            inner.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return inner.force_flush(timeout_millis)

    return KeptOnly()


def make_tracing(endpoint: str, slow_ms: int, service: str) -> NullTracing:
    if not endpoint:
        return NullTracing()
    try:
        return Tracing(endpoint, slow_ms, service)
    except ImportError as exc:
        log.warning("otlp_endpoint is set but OpenTelemetry's SDK is missing (%s): pip install infinibrain[tracing]; "
                    "no traces", exc)
        return NullTracing()
