"""W3C trace context for requests: when the application has an active OpenTelemetry span
(the ``opentelemetry-api`` package present and a span current), a request carries its
``traceparent``, and the manager's and the container's spans join that trace
(manager/tracing.py). Without the package, or without a current span, nothing changes.

Pure: any thread (OpenTelemetry's context is the calling thread's).
"""
from __future__ import annotations

try:
    from opentelemetry import propagate as _propagate
except ImportError:  # the extra is not installed: no trace context, ever
    _propagate = None  # type: ignore[assignment]


def current_traceparent() -> str | None:
    """The calling thread's current span as a W3C ``traceparent``, or None."""
    if _propagate is None:
        return None
    carrier: dict[str, str] = {}
    _propagate.inject(carrier)
    return carrier.get("traceparent")
