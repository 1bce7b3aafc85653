"""Traces of the alert pipeline, driven through the PipelineTracer API."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import SpanKind, StatusCode

from sidecar.app import Sidecar
from sidecar.config import parse_config
from sidecar.telemetry.tracing import NOOP_TRACER, PipelineTracer, SpanPipelineTracer
from tests.otel_receiver import OtlpReceiver, attributes

ALERTMANAGER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
ALERTMANAGER_PARENT = "00f067aa0ba902b7"


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


def make_tracer(exporter: InMemorySpanExporter) -> SpanPipelineTracer:
    """A tracer with its own provider, as a separate process would have."""
    provider = TracerProvider(sampler=ParentBased(ALWAYS_ON), shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return SpanPipelineTracer(provider.get_tracer("sidecar"))


def receive_and_store(tracer: PipelineTracer, headers: dict[str, str] | None = None) -> str:
    """What the receiver does for one accepted notification; returns the stored carrier."""
    with tracer.receive("default", headers or {"content-type": "application/json"}) as trace:
        trace.annotate(group_key='{}:{alertname="DiskFull"}', alerts=2, status="firing")
        with trace.store(backend="sqlite") as stored:
            carrier = trace.carrier()
            stored.annotate(message_id="m-1")
        trace.finish(outcome="accepted", status_code=200)
    return carrier


def deliver_failing_twice(tracer: PipelineTracer, carrier: str) -> None:
    """What the dispatcher does: route, two failed attempts, then a successful one."""
    trace = tracer.resume(carrier)
    with trace.route() as route:
        route.annotate(destinations=["ops-discord"])
    for number in (1, 2):
        with trace.attempt("ops-discord", kind="discord", number=number) as attempt:
            attempt.failed(retryable=True, status_code=503, reason="503 Service Unavailable")
    with trace.attempt("ops-discord", kind="discord", number=3) as attempt:
        attempt.succeeded(status_code=200)


def tree(finished: tuple[ReadableSpan, ...] | list[ReadableSpan]) -> list[tuple[Any, ...]]:
    """Each span as (name, parent name, kind, attributes, status), in the order they ended."""
    by_id = {span.context.span_id: span for span in finished}
    rows = []
    for span in finished:
        parent = by_id.get(span.parent.span_id) if span.parent else None
        rows.append(
            (
                span.name,
                parent.name if parent else None,
                span.kind,
                dict(span.attributes or {}),
                span.status.status_code,
            )
        )
    return rows


def test_a_notification_that_fails_twice_then_succeeds(spans: InMemorySpanExporter) -> None:
    receiver_side = make_tracer(spans)
    dispatcher_side = make_tracer(spans)

    carrier = receive_and_store(receiver_side)
    deliver_failing_twice(dispatcher_side, carrier)

    finished = spans.get_finished_spans()
    assert tree(finished) == [
        ("alerts.store", "alerts.receive", SpanKind.INTERNAL,
         {"sidecar.outbox.backend": "sqlite", "sidecar.message_id": "m-1"}, StatusCode.UNSET),
        ("alerts.receive", None, SpanKind.SERVER,
         {"sidecar.receiver": "default", "sidecar.group_key": '{}:{alertname="DiskFull"}',
          "sidecar.alerts": 2, "sidecar.status": "firing", "sidecar.outcome": "accepted",
          "http.response.status_code": 200}, StatusCode.UNSET),
        ("alerts.route", "alerts.receive", SpanKind.INTERNAL,
         {"sidecar.destinations": ("ops-discord",)}, StatusCode.UNSET),
        ("alerts.deliver", "alerts.receive", SpanKind.CLIENT,
         {"sidecar.destination": "ops-discord", "sidecar.destination.kind": "discord",
          "sidecar.delivery.attempt": 1, "sidecar.delivery.outcome": "retry",
          "http.response.status_code": 503, "error.type": "503 Service Unavailable"},
         StatusCode.ERROR),
        ("alerts.deliver", "alerts.receive", SpanKind.CLIENT,
         {"sidecar.destination": "ops-discord", "sidecar.destination.kind": "discord",
          "sidecar.delivery.attempt": 2, "sidecar.delivery.outcome": "retry",
          "http.response.status_code": 503, "error.type": "503 Service Unavailable"},
         StatusCode.ERROR),
        ("alerts.deliver", "alerts.receive", SpanKind.CLIENT,
         {"sidecar.destination": "ops-discord", "sidecar.destination.kind": "discord",
          "sidecar.delivery.attempt": 3, "sidecar.delivery.outcome": "success",
          "http.response.status_code": 200}, StatusCode.UNSET),
    ]  # fmt: skip
    assert len({span.context.trace_id for span in finished}) == 1
    receive = next(span for span in finished if span.name == "alerts.receive")
    assert receive.parent is None
    version, trace_id, span_id, flags = carrier.split("-")
    assert (version, trace_id, span_id) == (
        "00",
        f"{receive.context.trace_id:032x}",
        f"{receive.context.span_id:016x}",
    )
    assert int(flags, 16) & 1  # sampled


def test_alertmanager_traceparent_is_continued(spans: InMemorySpanExporter) -> None:
    tracer = make_tracer(spans)
    headers = {"Traceparent": f"00-{ALERTMANAGER_TRACE}-{ALERTMANAGER_PARENT}-01"}

    receive_and_store(tracer, headers)

    receive = next(span for span in spans.get_finished_spans() if span.name == "alerts.receive")
    assert f"{receive.context.trace_id:032x}" == ALERTMANAGER_TRACE
    assert receive.parent is not None
    assert f"{receive.parent.span_id:016x}" == ALERTMANAGER_PARENT
    assert receive.parent.is_remote


def test_an_unsampled_traceparent_records_nothing_downstream(spans: InMemorySpanExporter) -> None:
    tracer = make_tracer(spans)
    headers = {"traceparent": f"00-{ALERTMANAGER_TRACE}-{ALERTMANAGER_PARENT}-00"}

    carrier = receive_and_store(tracer, headers)
    deliver_failing_twice(make_tracer(spans), carrier)

    assert spans.get_finished_spans() == ()
    assert not int(carrier.rsplit("-", 1)[1], 16) & 1  # not sampled


@pytest.mark.parametrize(
    "header",
    [
        "garbage",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
        "00-" + "a" * 32 + "-" + "b" * 16 + "-01-extra-" + "x" * 5000,
        "",
    ],
)
def test_a_malformed_traceparent_starts_a_new_trace(
    spans: InMemorySpanExporter, header: str
) -> None:
    tracer = make_tracer(spans)

    receive_and_store(tracer, {"traceparent": header})

    receive = next(span for span in spans.get_finished_spans() if span.name == "alerts.receive")
    assert receive.parent is None


def test_tracestate_travels_in_the_carrier(spans: InMemorySpanExporter) -> None:
    tracer = make_tracer(spans)
    headers = {
        "traceparent": f"00-{ALERTMANAGER_TRACE}-{ALERTMANAGER_PARENT}-01",
        "tracestate": "vendor=abc",
    }

    carrier = receive_and_store(tracer, headers)
    deliver_failing_twice(make_tracer(spans), carrier)

    assert carrier.endswith("\nvendor=abc")
    delivered = [span for span in spans.get_finished_spans() if span.name == "alerts.deliver"]
    assert {span.context.trace_state.to_header() for span in delivered} == {"vendor=abc"}


@pytest.mark.parametrize("carrier", ["", "not a traceparent", "00-zz-yy-01\n"])
def test_a_lost_carrier_still_records_the_delivery(
    spans: InMemorySpanExporter, carrier: str
) -> None:
    trace = make_tracer(spans).resume(carrier)

    with trace.attempt("mail", kind="email", number=1) as attempt:
        attempt.succeeded(smtp_code=250)

    (span,) = spans.get_finished_spans()
    assert span.parent is None
    assert span.attributes is not None
    assert span.attributes["sidecar.smtp.reply_code"] == 250
    assert span.attributes["sidecar.delivery.outcome"] == "success"


def test_an_exception_in_an_attempt_marks_it_failed(spans: InMemorySpanExporter) -> None:
    trace = make_tracer(spans).resume("")

    with pytest.raises(TimeoutError), trace.attempt("mail", kind="email", number=4):
        raise TimeoutError("smtp.example.com:587 did not answer")

    (span,) = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["sidecar.delivery.outcome"] == "retry"
    assert span.attributes["error.type"] == "TimeoutError"
    # The message could hold a host or an address; only the class name is recorded.
    assert "smtp.example.com" not in str(span.status.description)


def test_a_final_failure_is_dead(spans: InMemorySpanExporter) -> None:
    trace = make_tracer(spans).resume("")

    with trace.attempt("ops-discord", kind="discord", number=10) as attempt:
        attempt.failed(retryable=False, status_code=404, reason="webhook deleted")

    (span,) = spans.get_finished_spans()
    assert span.attributes is not None
    assert span.attributes["sidecar.delivery.outcome"] == "dead"
    assert span.attributes["http.response.status_code"] == 404


def test_the_noop_tracer_records_nothing_and_allocates_nothing() -> None:
    trace = NOOP_TRACER.receive("default", {"traceparent": "x"})

    with trace as entered, trace.store(backend="sqlite") as stored:
        stored.annotate(message_id="m")
        carrier = entered.carrier()
    resumed = NOOP_TRACER.resume(carrier)
    with resumed.attempt("d", kind="discord", number=1) as attempt:
        attempt.failed(retryable=True, status_code=503)

    assert not NOOP_TRACER.enabled
    assert carrier == ""
    assert resumed is trace
    assert trace.attempt("e", kind="email", number=2) is attempt
    assert trace.route() is stored


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver().start()
    yield server
    server.stop()


async def test_spans_reach_an_otlp_receiver(receiver: OtlpReceiver) -> None:
    config = {
        "metrics": {"host": {"enabled": False}},
        "telemetry": {
            "endpoint": receiver.url,
            "service_name": "alerts-sidecar",
            "metrics": {"enabled": False},
            "traces": {"enabled": True},
        },
    }
    sidecar = Sidecar(parse_config(config, environ={"K8S_POD_NAME": "web-0"}))
    assert sidecar.telemetry.traces is not None

    async with sidecar.running():
        carrier = receive_and_store(sidecar.telemetry.tracer)
        deliver_failing_twice(sidecar.telemetry.tracer, carrier)
        assert await sidecar.telemetry.traces.flush()
        transport = httpx.ASGITransport(app=sidecar.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://s") as client:
            page = (await client.get("/metrics")).text

    received = receiver.spans()
    by_id = {span.span_id: span for span in received}
    shape = [
        (
            span.name,
            by_id[span.parent_span_id].name if span.parent_span_id else None,
            attributes(span.attributes).get("sidecar.delivery.attempt"),
            attributes(span.attributes).get("sidecar.delivery.outcome"),
            attributes(span.attributes).get("http.response.status_code"),
        )
        for span in received
    ]
    assert shape == [
        ("alerts.store", "alerts.receive", None, None, None),
        ("alerts.receive", None, None, None, 200),
        ("alerts.route", "alerts.receive", None, None, None),
        ("alerts.deliver", "alerts.receive", 1, "retry", 503),
        ("alerts.deliver", "alerts.receive", 2, "retry", 503),
        ("alerts.deliver", "alerts.receive", 3, "success", 200),
    ]
    assert len({span.trace_id for span in received}) == 1
    (resource_spans,) = receiver.received.traces[0].resource_spans
    resource = attributes(resource_spans.resource.attributes)
    assert resource["service.name"] == "alerts-sidecar"
    assert resource["k8s.pod.name"] == "web-0"
    assert 'sidecar_otel_exports_total{result="success",signal="traces"} 1.0' in page
    assert sidecar.telemetry.metrics is None


async def test_ratio_zero_samples_nothing(receiver: OtlpReceiver) -> None:
    telemetry = {
        "endpoint": receiver.url,
        "metrics": {"enabled": False},
        "traces": {"enabled": True, "sampler": "traceidratio", "ratio": 0},
    }
    sidecar = Sidecar(parse_config({"telemetry": telemetry}, environ={}))
    assert sidecar.telemetry.traces is not None

    async with sidecar.running():
        carrier = receive_and_store(sidecar.telemetry.tracer)
        assert await sidecar.telemetry.traces.flush()

    assert not int(carrier.rsplit("-", 1)[1], 16) & 1  # not sampled
    assert receiver.received.traces == []


async def test_a_failed_trace_export_is_counted_and_logged(
    receiver: OtlpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    telemetry = {
        "endpoint": receiver.url,
        "metrics": {"enabled": False},
        "traces": {"enabled": True},
    }
    sidecar = Sidecar(parse_config({"telemetry": telemetry}, environ={}))
    assert sidecar.telemetry.traces is not None
    receiver.fail_next(1, status=400)

    async with sidecar.running():
        receive_and_store(sidecar.telemetry.tracer)
        await sidecar.telemetry.traces.flush()
        transport = httpx.ASGITransport(app=sidecar.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://s") as client:
            page = (await client.get("/metrics")).text

    assert receiver.received.statuses == [400]
    assert 'sidecar_otel_exports_total{result="failure",signal="traces"} 1.0' in page
    assert (
        f"trace export to {receiver.url}/v1/traces failed: answered 400 Bad Request" in caplog.text
    )
