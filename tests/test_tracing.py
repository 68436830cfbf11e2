"""Traces across every hop (issue 27): an application's span, the manager's spans and the
container's, and a container's call, in one trace, received by a real OTLP/HTTP receiver
on loopback (the protobuf export requests decoded with opentelemetry-proto)."""
from __future__ import annotations

import http.server
import threading

import pytest

pytest.importorskip("opentelemetry.sdk", reason="OpenTelemetry's SDK is part of the test extra")
pytest.importorskip("opentelemetry.proto", reason="opentelemetry-proto is part of the test extra")

from opentelemetry import trace  # noqa: E402
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags  # noqa: E402

from conftest import connected, echo_config, relay_config, running_manager, wait_for  # noqa: E402
from infinibrain.errors import InfinibrainException  # noqa: E402


class Receiver:
    """An OTLP/HTTP traces receiver: every span it was sent, as (trace id hex, span id hex,
    parent span id hex, name, attributes)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str, str, dict]] = []
        received = self.spans

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        for s in scope.spans:
                            attrs = {a.key: (a.value.string_value or a.value.int_value or a.value.bool_value) for a in s.attributes}
                            received.append((s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name, attrs))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of(self, trace_id: str) -> list[tuple[str, str, str, str, dict]]:
        return [s for s in self.spans if s[0] == trace_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_a_request_and_a_containers_call_in_the_applications_trace(receiver, tmp_path, name):
    tracer = TracerProvider().get_tracer("the application")  # the application's own (its spans need not be exported)
    relay = relay_config(name + "a")
    with running_manager(tmp_path / "m", boards=("local",), otlp_endpoint=receiver.url, trace_slow_ms=60_000) as m, \
            connected(m) as c:
        c.load_inference(relay, "local")
        c.load_inference(echo_config(name + "b"), "local")
        with tracer.start_as_current_span("checkout") as span:
            result, _ = c.infer(name + "a", b"hi", {"next": [name + "b"]})
        assert result["via"] == [name + "a"] and result["inner"]["sum"] == sum(b"hi")  # relay a called echo b
        trace_id = format(span.get_span_context().trace_id, "032x")
        app_span = format(span.get_span_context().span_id, "016x")
        spans = wait_for(lambda: len(receiver.of(trace_id)) >= 6 and receiver.of(trace_id), timeout=15)
        by_id = {s[1]: s for s in spans}
        names = sorted(s[3] for s in spans)
        assert names.count("infinibrain.queue") == 2 and names.count("infinibrain.dispatch") == 2 \
            and names.count("infinibrain.container") == 2  # the request, and the call its container made
        outer_queue = next(s for s in spans if s[3] == "infinibrain.queue" and s[2] == app_span)
        assert outer_queue[4]["infinibrain.inference"] == name + "a"
        inner_queue = next(s for s in spans if s[3] == "infinibrain.queue" and s[4]["infinibrain.inference"] == name + "b")
        assert by_id[inner_queue[2]][3] == "infinibrain.dispatch"  # the call hangs under the request its container served
        container = next(s for s in spans if s[3] == "infinibrain.container" and s[4].get("infinibrain.container") == f"{name}b-local")
        assert by_id[container[2]][3] == "infinibrain.dispatch"
        for n in (name + "a", name + "b"):
            c.unload_inference(n)


def test_a_failed_requests_trace_is_kept_when_sampling_would_drop_it(receiver, tmp_path, name):
    unsampled = SpanContext(trace_id=0x5EED << 64 | 26, span_id=0x27, is_remote=False, trace_flags=TraceFlags(0))
    with running_manager(tmp_path / "m", boards=("local",), otlp_endpoint=receiver.url, trace_slow_ms=60_000) as m, \
            connected(m) as c:
        c.load_inference(echo_config(name), "local")
        with trace.use_span(NonRecordingSpan(unsampled)):
            c.infer(name, b"fine")  # not sampled, not failed, not slow: dropped
            with pytest.raises(InfinibrainException) as err:
                c.infer(name, b"x", {"bad_result": True})
        assert err.value.code == 999
        trace_id = format(unsampled.trace_id, "032x")
        kept = wait_for(lambda: len(receiver.of(trace_id)) >= 3 and receiver.of(trace_id), timeout=15)
        assert sorted(s[3] for s in kept) == ["infinibrain.container", "infinibrain.dispatch", "infinibrain.queue"]
        assert {s[4].get("infinibrain.code") for s in kept} == {999}  # the failed request's spans, not the other's
        c.unload_inference(name)


def test_the_sdks_traceparent_is_what_opentelemetrys_propagator_writes():
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from infinibrain.tracing import current_traceparent

    assert current_traceparent() is None  # no current span: no header
    for flags in (TraceFlags(0), TraceFlags(1)):
        span = SpanContext(trace_id=0xABC << 80 | 7, span_id=0x1F, is_remote=False, trace_flags=flags)
        with trace.use_span(NonRecordingSpan(span)):
            carrier: dict[str, str] = {}
            TraceContextTextMapPropagator().inject(carrier)
            assert current_traceparent() == carrier["traceparent"]
