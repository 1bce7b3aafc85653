"""The webhook endpoint: authenticate, bound, validate, route, store, and only then answer.

Alertmanager retries a webhook only after a 5xx, so the answers are chosen for it: 2xx once the
notification is committed to the outbox (or recognised as a duplicate), 503 with
``Retry-After`` when the outbox cannot take it, and a 4xx naming the problem for anything that
a retry cannot fix.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from sidecar.alerts.auth import Authenticator
from sidecar.alerts.config import ReceiverConfig
from sidecar.alerts.dispatcher import Dispatcher
from sidecar.alerts.metrics import AlertMetrics
from sidecar.alerts.outbox.base import Outbox, OutboxFull, OutboxUnavailable, dedup_key
from sidecar.alerts.payload import Notification
from sidecar.alerts.routing import Router
from sidecar.config import format_location
from sidecar.notify.base import Notifier
from sidecar.telemetry.tracing import NOOP_TRACER, NotificationTrace, PipelineTracer

logger = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 5
_UNNAMED = "-"
# Authentication, the body checks and the trace context (W3C) are all that the handling reads.
_READ_HEADERS = {
    name.encode("latin-1"): name
    for name in ("authorization", "content-type", "content-length", "traceparent", "tracestate")
}


class BodyTooLarge(Exception):
    pass


class Receiver:
    """The ASGI endpoint of ``POST <path>`` and ``POST <path>/<receiver>``."""

    def __init__(
        self,
        config: ReceiverConfig,
        *,
        authenticator: Authenticator,
        router: Router,
        outbox: Outbox,
        dispatcher: Dispatcher,
        notifiers: dict[str, Notifier],
        metrics: AlertMetrics,
        tracer: PipelineTracer = NOOP_TRACER,
        backend: str = "sqlite",
    ) -> None:
        self.config = config
        self.tracer = tracer
        self.backend = backend
        self.authenticator = authenticator
        self.router = router
        self.outbox = outbox
        self.dispatcher = dispatcher
        self.notifiers = notifiers
        self.metrics = metrics
        self._path = config.path.rstrip("/") or "/"
        self._prefix = config.path.rstrip("/") + "/"
        self._counters: dict[tuple[str, str], Any] = {}
        # Destination names come from the configuration, so there are few distinct answers.
        self._accepted: dict[tuple[str, ...], bytes] = {}

    def match(self, scope: Scope) -> ASGIApp | None:
        """This receiver for a POST to its path or ``<path>/<receiver>``, else None.

        The composition root asks this before its router: the webhook is the hot path, and
        the generic routing and middleware cost more per request than the receiver itself.
        Other methods on these paths fall through to the router (405 from there)."""
        if scope["type"] != "http" or scope["method"] != "POST":
            return None
        path: str = scope["path"]
        if path == self._path:
            return self
        if path.startswith(self._prefix):
            name = path[len(self._prefix) :]
            if name and "/" not in name:
                return self
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI app of ``POST <path>`` and ``POST <path>/<receiver>``."""
        path: str = scope["path"]
        named = path[len(self._prefix) :] if path.startswith(self._prefix) else None
        # Header names arrive lower-case from the server; values are latin-1 per HTTP. A
        # repeated header counts by its first value, as Starlette's mapping reads it. Only the
        # headers that something here reads are decoded.
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            key = _READ_HEADERS.get(name)
            if key is not None and key not in headers:
                headers[key] = value.decode("latin-1")
        status, body, extra = await self.handle(named or None, headers, receive)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *extra,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def handle(
        self, named: str | None, headers: Mapping[str, str], receive: Receive
    ) -> Answer:
        """Answer one webhook request: status, JSON body and extra headers.

        ``headers`` is looked up by lower-case name; ``receive`` is the request's ASGI receive
        channel, whose body has not been read yet."""
        # Unknown names are not used as metric labels: callers choose them.
        label = named if named is not None and self.router.has_receiver(named) else _UNNAMED
        with self.tracer.receive(label, headers) as trace:
            return await self._handle(headers, receive, named, label, trace)

    async def _handle(
        self,
        headers: Mapping[str, str],
        receive: Receive,
        named: str | None,
        label: str,
        trace: NotificationTrace,
    ) -> Answer:
        reason = self.authenticator.check(headers.get("authorization"))
        if reason is not None:
            self._count(label, "rejected")
            trace.finish(outcome="rejected", status_code=401)
            challenge = self.authenticator.challenge.encode("latin-1")
            return 401, _json({"error": reason}), [(b"www-authenticate", challenge)]
        # After authentication, so that receiver names are not told to strangers.
        if named is not None and not self.router.has_receiver(named):
            return self._reject(trace, _UNNAMED, 404, f"no receiver named {named!r} is configured")

        content_type = headers.get("content-type", "")
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            return self._reject(
                trace,
                label,
                415,
                f"content type must be application/json (got {content_type or 'none'!r})",
            )

        try:
            body = await self._read_body(headers, receive)
        except BodyTooLarge:
            return self._reject(
                trace, label, 413, f"body larger than {int(self.config.max_body_size)} bytes"
            )
        except ClientDisconnect:
            return self._reject(
                trace, label, 400, "the client disconnected before sending the body"
            )

        notification, text = _parse(body)
        if notification is None:
            return self._reject(trace, label, 400, text)

        receiver = named or notification.receiver
        label = named or (receiver if self.router.has_receiver(receiver) else _UNNAMED)
        trace.annotate(
            receiver=receiver,
            group_key=notification.group_key,
            alerts=len(notification.alerts),
            status=notification.status,
        )
        with trace.route() as route:
            destinations = self.router.destinations_for(notification.common_labels, named)
            if notification.status != "firing":
                destinations = [name for name in destinations if self.notifiers[name].send_resolved]
            route.annotate(destinations=destinations)
        try:
            with trace.store(backend=self.backend):
                stored = await self.outbox.enqueue(
                    notification,
                    destinations,
                    dedup_key(receiver, notification),
                    text,
                    trace_context=trace.carrier(),
                )
        except (OutboxFull, OutboxUnavailable) as error:
            self._count(label, "unavailable")
            trace.finish(outcome="unavailable", status_code=503)
            logger.warning("refused a notification for now: %s", error)
            retry_after = str(max(1, round(self.config.retry_after))).encode()
            return (
                503,
                _json({"error": f"the outbox cannot take the notification now: {error}"}),
                [(b"retry-after", retry_after)],
            )

        if not stored:
            self._count(label, "duplicate")
            self.metrics.deduplicated.labels(label).inc()
            trace.finish(outcome="duplicate", status_code=200)
            return 200, b'{"status":"duplicate"}', []
        self._count(label, "accepted")
        trace.finish(outcome="accepted", status_code=200)
        if destinations:
            self.dispatcher.remember(text, notification)
            self.dispatcher.wake(destinations)
        return 200, self._accepted_answer(destinations), []

    async def _read_body(self, headers: Mapping[str, str], receive: Receive) -> bytes:
        # Straight from the ASGI messages: an async generator here would cost more than the
        # rest of the read (the event loop registers every one it sees).
        limit = int(self.config.max_body_size)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge
        parts: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect
            chunk = message.get("body", b"")
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            more = message.get("more_body", False)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _accepted_answer(self, destinations: list[str]) -> bytes:
        key = tuple(destinations)
        answer = self._accepted.get(key)
        if answer is None:
            answer = self._accepted[key] = _json(
                {"status": "accepted", "destinations": destinations}
            )
        return answer

    def _count(self, label: str, outcome: str) -> None:
        # The labelled child is looked up once per pair: labels() costs more than inc().
        counter = self._counters.get((label, outcome))
        if counter is None:
            counter = self._counters[(label, outcome)] = self.metrics.received.labels(
                label, outcome
            )
        counter.inc()

    def _reject(self, trace: NotificationTrace, label: str, status: int, message: str) -> Answer:
        self._count(label, "rejected")
        trace.finish(outcome="rejected", status_code=status)
        return status, _json({"error": message}), []


Answer = tuple[int, bytes, list[tuple[bytes, bytes]]]
"""HTTP status, JSON body and extra headers (lower-case names) of a webhook answer."""


def _json(document: dict[str, Any]) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _parse(body: bytes) -> tuple[Notification | None, str]:
    """The notification and the body as text, or None and a message naming what is wrong."""
    if not body:
        return None, "empty body: expected an Alertmanager webhook payload (JSON object)"
    try:
        # The fast path for what Alertmanager sends; anything it refuses is parsed again
        # below, slowly, for a message that names the problem.
        notification = Notification.model_validate_json(body)
        return notification, body.decode("utf-8")
    except (ValidationError, UnicodeDecodeError, RecursionError):
        pass
    try:
        # Alertmanager sends UTF-8; decoding here stops json from guessing UTF-16 or 32.
        text = body.decode("utf-8")
        data: Any = json.loads(text)
    except UnicodeDecodeError as error:
        return None, f"body is not valid UTF-8 (byte {error.start})"
    except json.JSONDecodeError as error:
        return None, f"malformed JSON: {error.msg} at line {error.lineno}, column {error.colno}"
    except RecursionError:
        return None, "malformed JSON: nested too deeply"
    if isinstance(data, list):
        return None, (
            "body is a JSON list, which is how Prometheus sends alerts to Alertmanager; this "
            "endpoint takes Alertmanager webhook notifications (point a webhook_configs "
            "receiver of Alertmanager here)"
        )
    if not isinstance(data, dict):
        return None, f"body must be a JSON object (got {type(data).__name__})"
    version = data.get("version")
    if version != "4":
        return None, f"version: only Alertmanager webhook version 4 is supported (got {version!r})"
    try:
        # Unpaired UTF-16 surrogate escapes fail here too: pydantic refuses them in a str.
        return Notification.model_validate(data), text
    except ValidationError as error:
        details = error.errors(include_url=False, include_input=False)
        problems = [
            f"{format_location(detail['loc']) or 'body'}: {detail['msg']}"
            for detail in details[:MAX_REPORTED_ERRORS]
        ]
        more = len(details) - MAX_REPORTED_ERRORS
        if more > 0:
            problems.append(f"and {more} more")
        return None, "invalid payload: " + "; ".join(problems)
    except RecursionError:
        return None, "invalid payload: nested too deeply"
