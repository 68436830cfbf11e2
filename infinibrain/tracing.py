"""W3C trace context for requests: when the application has an active OpenTelemetry span
(the ``opentelemetry-api`` package present and a span current), a request carries its
``traceparent``, and the manager's and the container's spans join that trace
(manager/tracing.py). Without the package, or without a current span, nothing changes.

The header is written here from the current span's context (W3C trace context, version
00), not through the globally configured propagator: the request path's cost stays a
microsecond whatever propagators the application set up for its own HTTP calls.

Pure: any thread (OpenTelemetry's context is the calling thread's).
"""
from __future__ import annotations

from typing import Any

try:
    from opentelemetry.trace import get_current_span as _current_span
except ImportError:  # the extra is not installed: no trace context, ever
    _current_span = None  # type: ignore[assignment]


def current_traceparent() -> str | None:
    """The calling thread's current span as a W3C ``traceparent``, or None."""
    if _current_span is None:
        return None
    context = _current_span().get_span_context()
    return traceparent_of(context) if context.is_valid else None


def traceparent_of(context: Any) -> str:
    """A span context (OpenTelemetry's SpanContext) as a W3C ``traceparent``."""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags & 0xff:02x}"
