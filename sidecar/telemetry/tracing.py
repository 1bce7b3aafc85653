"""Traces of the alert pipeline: one trace per accepted notification.

The receiver and the dispatcher call this small API; they never touch OpenTelemetry directly::

    # receiver, per webhook request
    with tracer.receive(receiver_name, request.headers) as trace:
        trace.annotate(group_key=..., alerts=len(notification.alerts), status=...)
        with trace.store(backend="sqlite") as stored:
            message_id = outbox.append(..., trace_context=trace.carrier())
            stored.annotate(message_id=message_id)
        trace.finish(outcome="accepted", status_code=200)

    # dispatcher, per outbox message, possibly in another process
    trace = tracer.resume(message.trace_context)
    with trace.route() as route:
        route.annotate(destinations=["ops-discord", "oncall-email"])
    with trace.attempt("ops-discord", kind="discord", number=message.attempts + 1) as attempt:
        ...  # send
        attempt.succeeded(status_code=200)  # or attempt.failed(status_code=503, retryable=True)

Span tree of a notification whose first two deliveries fail::

    alerts.receive                       SERVER, root (or child of Alertmanager's traceparent)
    ├── alerts.store                     INTERNAL
    ├── alerts.route                     INTERNAL
    ├── alerts.deliver  attempt=1 outcome=retry   status ERROR
    ├── alerts.deliver  attempt=2 outcome=retry   status ERROR
    └── alerts.deliver  attempt=3 outcome=success

``trace.carrier()`` is the W3C ``traceparent`` of the receive span (a newline and the
``tracestate`` follow when there is one): a short string the outbox stores with the message, so
that whoever delivers it continues the same trace. When tracing is off, :data:`NOOP_TRACER`
hands out one shared object whose methods do nothing, and ``carrier()`` is ``""``.

Spans are parented explicitly, never through the current-span context variable, so concurrent
deliveries on one event loop cannot adopt each other's spans.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

logger = logging.getLogger(__name__)

Outcome = Literal["success", "retry", "dead"]
AttributeValue = str | int | float | bool | Sequence[str]

# Attribute keys: OpenTelemetry semantic conventions where one exists, `sidecar.*` otherwise.
RECEIVER = "sidecar.receiver"
OUTCOME = "sidecar.outcome"
DESTINATION = "sidecar.destination"
DESTINATION_KIND = "sidecar.destination.kind"
ATTEMPT = "sidecar.delivery.attempt"
DELIVERY_OUTCOME = "sidecar.delivery.outcome"
SMTP_CODE = "sidecar.smtp.reply_code"
HTTP_STATUS = "http.response.status_code"
ERROR_TYPE = "error.type"


class Step:
    """An open span of one pipeline step; a no-op in the base class."""

    __slots__ = ()

    def annotate(self, **attributes: AttributeValue | None) -> None:
        """Add attributes (``None`` values are skipped); keys become ``sidecar.<key>``."""

    def __enter__(self) -> Step:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None


class Attempt(Step):
    """The span of one delivery attempt."""

    __slots__ = ()

    def __enter__(self) -> Attempt:
        return self

    def succeeded(self, *, status_code: int | None = None, smtp_code: int | None = None) -> None:
        """The destination accepted the notification."""

    def failed(
        self,
        *,
        retryable: bool,
        status_code: int | None = None,
        smtp_code: int | None = None,
        reason: str = "",
    ) -> None:
        """The attempt failed: outcome ``retry`` if another attempt follows, else ``dead``.

        ``reason`` goes into ``error.type``; keep it short and free of secrets (the notifier's
        error class or a status phrase), never a URL with a token.
        """


class NotificationTrace(Step):
    """The trace of one notification: the receive span, or the context it was resumed from."""

    __slots__ = ()

    def __enter__(self) -> NotificationTrace:
        return self

    def finish(self, *, outcome: str, status_code: int | None = None) -> None:
        """Record the receiver's answer: outcome ``accepted``, ``duplicate``, ``rejected`` or
        ``unavailable`` and the HTTP status returned to Alertmanager."""

    def store(self, *, backend: str) -> Step:
        """A span around the durable write to the outbox."""
        return _NOOP_STEP

    def route(self) -> Step:
        """A span around routing; annotate it with the chosen ``destinations``."""
        return _NOOP_STEP

    def attempt(self, destination: str, *, kind: str, number: int) -> Attempt:
        """A span around delivery attempt ``number`` (from 1) to ``destination``."""
        return _NOOP_ATTEMPT

    def carrier(self) -> str:
        """The trace context to store with the notification; ``""`` when not traced."""
        return ""


class PipelineTracer:
    """Hands out notification traces; this base class is the no-op used when tracing is off."""

    enabled = False

    def receive(self, receiver: str, headers: Mapping[str, str] | None = None) -> NotificationTrace:
        """Start the root span of a webhook request, continuing its ``traceparent`` if any."""
        return _NOOP_TRACE

    def resume(self, carrier: str) -> NotificationTrace:
        """Continue the trace whose ``carrier()`` string was stored with the notification."""
        return _NOOP_TRACE


_NOOP_STEP = Step()
_NOOP_ATTEMPT = Attempt()
_NOOP_TRACE = NotificationTrace()
NOOP_TRACER = PipelineTracer()
"""The tracer of a sidecar whose trace export is off."""


class _SpanStep(Step):
    __slots__ = ("_span",)

    def __init__(self, span: Span) -> None:
        self._span = span

    def annotate(self, **attributes: AttributeValue | None) -> None:
        for key, value in attributes.items():
            if value is not None:
                self._span.set_attribute(f"sidecar.{key}", value)

    def __enter__(self) -> _SpanStep:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if error is not None:
            _record_error(self._span, error)
        self._span.end()


class _SpanAttempt(_SpanStep, Attempt):
    __slots__ = ("_settled",)

    def __init__(self, span: Span) -> None:
        super().__init__(span)
        self._settled = False

    def __enter__(self) -> _SpanAttempt:
        return self

    def succeeded(self, *, status_code: int | None = None, smtp_code: int | None = None) -> None:
        self._settle("success", status_code, smtp_code)

    def failed(
        self,
        *,
        retryable: bool,
        status_code: int | None = None,
        smtp_code: int | None = None,
        reason: str = "",
    ) -> None:
        from opentelemetry.trace import StatusCode

        self._settle("retry" if retryable else "dead", status_code, smtp_code)
        error_type = reason or (str(status_code or smtp_code or "") or "error")
        self._span.set_attribute(ERROR_TYPE, error_type)
        self._span.set_status(StatusCode.ERROR, reason or None)

    def _settle(self, outcome: Outcome, status_code: int | None, smtp_code: int | None) -> None:
        self._settled = True
        self._span.set_attribute(DELIVERY_OUTCOME, outcome)
        if status_code is not None:
            self._span.set_attribute(HTTP_STATUS, status_code)
        if smtp_code is not None:
            self._span.set_attribute(SMTP_CODE, smtp_code)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self._settled:
            # Leaving without a verdict (an exception, or a forgotten call) is a failure that
            # the dispatcher's own retry rules will judge; the trace shows it as one.
            self.failed(retryable=True, reason=type(error).__name__ if error else "unsettled")
        super().__exit__(kind, error, traceback)


class _SpanTrace(NotificationTrace):
    __slots__ = ("_context", "_span", "_tracer")

    def __init__(self, tracer: SpanPipelineTracer, context: Context, span: Span | None) -> None:
        self._tracer = tracer
        self._context = context
        self._span = span

    def __enter__(self) -> _SpanTrace:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._span is None:
            return
        if error is not None:
            _record_error(self._span, error)
        self._span.end()

    def annotate(self, **attributes: AttributeValue | None) -> None:
        if self._span is not None:
            _SpanStep(self._span).annotate(**attributes)

    def finish(self, *, outcome: str, status_code: int | None = None) -> None:
        if self._span is None:
            return
        self._span.set_attribute(OUTCOME, outcome)
        if status_code is not None:
            self._span.set_attribute(HTTP_STATUS, status_code)

    def store(self, *, backend: str) -> Step:
        return _SpanStep(
            self._tracer.child("alerts.store", self._context, {"sidecar.outbox.backend": backend})
        )

    def route(self) -> Step:
        return _SpanStep(self._tracer.child("alerts.route", self._context, {}))

    def attempt(self, destination: str, *, kind: str, number: int) -> Attempt:
        attributes = {DESTINATION: destination, DESTINATION_KIND: kind, ATTEMPT: number}
        return _SpanAttempt(
            self._tracer.child("alerts.deliver", self._context, attributes, client=True)
        )

    def carrier(self) -> str:
        fields: dict[str, str] = {}
        self._tracer.propagator.inject(fields, context=self._context)
        traceparent = fields.get("traceparent", "")
        tracestate = fields.get("tracestate", "")
        return f"{traceparent}\n{tracestate}" if tracestate else traceparent


class SpanPipelineTracer(PipelineTracer):
    """The tracer that records spans through an OpenTelemetry ``Tracer``."""

    enabled = True

    def __init__(self, tracer: Tracer) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._tracer = tracer
        self.propagator = TraceContextTextMapPropagator()

    def receive(self, receiver: str, headers: Mapping[str, str] | None = None) -> NotificationTrace:
        from opentelemetry.context import Context
        from opentelemetry.trace import SpanKind, set_span_in_context

        # Never the ambient context: a notification's trace starts here or at its traceparent.
        parent = self.propagator.extract(_lowercase(headers)) if headers else Context()
        span = self._tracer.start_span(
            "alerts.receive", context=parent, kind=SpanKind.SERVER, attributes={RECEIVER: receiver}
        )
        return _SpanTrace(self, set_span_in_context(span), span)

    def resume(self, carrier: str) -> NotificationTrace:
        from opentelemetry.context import Context

        traceparent, _, tracestate = carrier.partition("\n")
        fields = {"traceparent": traceparent.strip()}
        if tracestate:
            fields["tracestate"] = tracestate.strip()
        context = self.propagator.extract(fields) if traceparent else Context()
        if traceparent and context == Context():
            logger.debug("stored trace context %r is not a valid traceparent", traceparent[:80])
        return _SpanTrace(self, context, None)

    def child(
        self, name: str, parent: Context, attributes: dict[str, Any], client: bool = False
    ) -> Span:
        """Start a span under ``parent`` (used by the trace handles)."""
        from opentelemetry.trace import SpanKind

        kind = SpanKind.CLIENT if client else SpanKind.INTERNAL
        return self._tracer.start_span(name, context=parent, kind=kind, attributes=attributes)


def _lowercase(headers: Mapping[str, str]) -> dict[str, str]:
    # The propagator looks up lower-case names; a plain dict from a test or another framework
    # may use any case. Only the two W3C fields matter, so copy just those.
    found = {}
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in ("traceparent", "tracestate"):
            found[lowered] = value
    return found


def _record_error(span: Span, error: BaseException) -> None:
    from opentelemetry.trace import StatusCode

    span.set_attribute(ERROR_TYPE, type(error).__qualname__)
    span.set_status(StatusCode.ERROR, type(error).__qualname__)
