"""The dispatcher: claims deliveries from the outbox and hands them to notifiers.

One claim loop per destination keeps up to ``concurrency`` deliveries in flight. A failed
attempt is retried after exponential backoff with full jitter, or after the notifier's
``retry_after`` if that is longer; a permanent failure, too many attempts or too old a delivery
makes a dead letter. On stop it claims nothing more, lets deliveries in flight finish for
``stop_timeout`` and gives the rest back to the outbox unattempted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections import OrderedDict

from pydantic import ValidationError

from sidecar.alerts.config import DispatcherConfig
from sidecar.alerts.metrics import AlertMetrics
from sidecar.alerts.outbox.base import Claim, Outbox, OutboxUnavailable
from sidecar.alerts.payload import Notification
from sidecar.notify.base import Attempt, DeliveryError, Notifier
from sidecar.telemetry.tracing import NOOP_TRACER, PipelineTracer

logger = logging.getLogger(__name__)

HOUSEKEEPING_INTERVAL = 5.0
PARSED_CACHE_SIZE = 256
PARSED_STALE_AFTER = 10.0
PRUNE_INTERVAL = 60.0


def backoff(attempt: int, initial: float, maximum: float) -> float:
    """Full-jitter exponential backoff before attempt ``attempt + 1`` (``attempt`` >= 1)."""
    ceiling = min(maximum, initial * 2 ** min(attempt - 1, 30))
    return random.uniform(initial / 2, max(initial / 2, ceiling))  # noqa: S311 - not crypto


def _codes(kind: str, status: int | None) -> dict[str, int | None]:
    """The span attribute a notifier's status goes into: SMTP reply code or HTTP status."""
    return {"smtp_code": status} if kind == "email" else {"status_code": status}


class Dispatcher:
    """Delivers what the outbox holds; ``wake()`` after an enqueue shortens the wait."""

    def __init__(
        self,
        outbox: Outbox,
        notifiers: dict[str, Notifier],
        config: DispatcherConfig,
        metrics: AlertMetrics,
        tracer: PipelineTracer = NOOP_TRACER,
    ) -> None:
        self.outbox = outbox
        self.tracer = tracer
        self.notifiers = notifiers
        self.config = config
        self.metrics = metrics
        self._wake = {name: asyncio.Event() for name in notifiers}
        self._loops: list[asyncio.Task[None]] = []
        self._in_flight: dict[str, dict[str, asyncio.Task[None]]] = {}
        self._stopping = False
        self._batch = max(1, config.concurrency // 2)
        # Notifications the receiver validated moments ago, by stored body: most deliveries
        # are claimed right after acceptance and need not be validated a second time.
        self._parsed: OrderedDict[str, tuple[float, Notification]] = OrderedDict()

    def remember(self, body: str, notification: Notification) -> None:
        """Keep the validated form of a body just stored, for its first delivery."""
        now = time.monotonic()
        if len(self._parsed) >= PARSED_CACHE_SIZE:
            oldest, _ = next(iter(self._parsed.values()))
            if now - oldest < PARSED_STALE_AFTER:
                # The dispatcher is that far behind (a burst): a body kept now would be evicted
                # before its delivery is claimed, and keeping it costs the receiver more than
                # validating it again later (a full cache of young objects for the collector).
                return
            # Entries this old belong to deliveries that failed or went elsewhere.
            self._parsed.popitem(last=False)
        self._parsed[body] = (now, notification)

    def wake(self, destinations: list[str]) -> None:
        for name in destinations:
            event = self._wake.get(name)
            if event is not None:
                event.set()

    async def start(self) -> None:
        self._stopping = False
        self._loops = [
            asyncio.create_task(self._claim_loop(name), name=f"dispatch-{name}")
            for name in self.notifiers
        ]
        self._loops.append(asyncio.create_task(self._housekeeping(), name="outbox-housekeeping"))

    async def stop(self) -> None:
        self._stopping = True
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops = []

        pending = [task for tasks in self._in_flight.values() for task in tasks.values()]
        if pending:
            logger.info("waiting for %d deliveries in flight", len(pending))
            _, unfinished = await asyncio.wait(pending, timeout=self.config.stop_timeout)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
        for notifier in self.notifiers.values():
            with contextlib.suppress(Exception):
                await notifier.close()

    async def _claim_loop(self, name: str) -> None:
        event = self._wake[name]
        in_flight = self._in_flight.setdefault(name, {})
        while not self._stopping:
            # Cleared before the claim, so that a wake-up during it is not lost.
            event.clear()
            free = self.config.concurrency - len(in_flight)
            claims: list[Claim] = []
            # Claim in batches: one claim per finished delivery would cost a transaction
            # each, so wait until half the slots are free (or all, for small limits).
            if free > 0 and (not in_flight or free >= self._batch):
                try:
                    claims = await self.outbox.claim(name, free)
                except OutboxUnavailable as error:
                    logger.warning("cannot claim deliveries for %s: %s", name, error)
                except Exception:
                    logger.exception("claiming deliveries for %s failed", name)

            for claim in claims:
                task = asyncio.create_task(self._deliver(claim))
                in_flight[claim.delivery_id] = task
                task.add_done_callback(functools.partial(self._finished, name, claim.delivery_id))

            if claims and len(claims) == free:
                continue  # more may be due already
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=self.config.poll_interval)

    def _finished(self, name: str, key: str, _: asyncio.Task[None]) -> None:
        self._in_flight.get(name, {}).pop(key, None)
        self._wake[name].set()

    async def _deliver(self, claim: Claim) -> None:
        name = claim.destination
        notifier = self.notifiers[name]
        try:
            await self._attempt(notifier, claim)
        except asyncio.CancelledError:
            # Shutdown ran out of time: hand the delivery back so it is not lost or counted.
            with contextlib.suppress(Exception):
                await asyncio.shield(self.outbox.release(claim.delivery_id))
            raise
        except OutboxUnavailable as error:
            # The lease runs out and the delivery is attempted again: at least once.
            logger.warning("outbox unavailable after delivering %s: %s", claim.delivery_id, error)
        except Exception:
            # The boundary of a background task: the lease brings the delivery back.
            logger.exception("delivery %s to %s failed unexpectedly", claim.delivery_id, name)

    async def _attempt(self, notifier: Notifier, claim: Claim) -> None:
        name = claim.destination
        age = time.time() - claim.accepted_at
        if claim.attempts >= self.config.max_attempts or age > self.config.max_age:
            await self._bury(
                claim, f"gave up after {claim.attempts} attempts and {age:.0f}s since acceptance"
            )
            return
        cached = self._parsed.get(claim.body)
        notification = cached[1] if cached is not None else None
        if notification is None:
            try:
                notification = Notification.model_validate_json(claim.body)
            except ValidationError as error:
                await self._bury(claim, f"stored notification is unreadable: {error}")
                return

        number = claim.attempts + 1
        self.metrics.attempts.labels(name).inc()
        kind = getattr(notifier, "kind", "")
        last = number >= self.config.max_attempts
        failure: DeliveryError | None = None
        unexpected: Exception | None = None
        # The trace continues from the context the receiver stored, in whichever replica.
        trace = self.tracer.resume(claim.trace_context)
        with trace.attempt(name, kind=kind, number=number) as span:
            try:
                delivered = await notifier.send(
                    notification, Attempt(claim.delivery_id, name, number)
                )
            except DeliveryError as error:
                failure = error
                span.failed(
                    retryable=error.retryable and not last,
                    **_codes(kind, error.status),
                    reason=type(error).__name__,
                )
            except asyncio.CancelledError:
                raise
            except Exception as error:
                unexpected = error
                span.failed(retryable=not last, reason=type(error).__name__)
            else:
                span.succeeded(**_codes(kind, delivered.status))

        if failure is not None:
            if not failure.retryable:
                await self._bury(claim, f"permanent failure: {failure.reason}")
                return
            await self._retry(claim, number, failure.reason, failure.retry_after)
            return
        if unexpected is not None:
            # A notifier bug must not stop delivery to the others; retry it like a failure.
            logger.error("notifier %s raised unexpectedly", name, exc_info=unexpected)
            await self._retry(claim, number, f"{type(unexpected).__name__}: {unexpected}", None)
            return

        await self.outbox.complete(claim.delivery_id)
        self._parsed.pop(claim.body, None)
        self.metrics.deliveries.labels(name, "success").inc()
        self.metrics.latency.labels(name).observe(max(0.0, time.time() - claim.accepted_at))
        logger.info(
            "delivered %s to %s (%s, attempt %d)",
            claim.delivery_id,
            name,
            notification.status,
            number,
        )

    async def _retry(
        self, claim: Claim, number: int, reason: str, retry_after: float | None
    ) -> None:
        if number >= self.config.max_attempts:
            await self._bury(claim, f"{number} attempts failed; last: {reason}")
            return
        delay = backoff(number, self.config.backoff_initial, self.config.backoff_max)
        if retry_after is not None:
            delay = max(delay, retry_after)
        await self.outbox.retry(claim.delivery_id, delay, reason)
        self.metrics.deliveries.labels(claim.destination, "retry").inc()
        logger.warning(
            "delivery %s to %s failed (attempt %d), retrying in %.1fs: %s",
            claim.delivery_id,
            claim.destination,
            number,
            delay,
            reason,
        )

    async def _bury(self, claim: Claim, reason: str) -> None:
        await self.outbox.bury(claim.delivery_id, reason)
        self.metrics.deliveries.labels(claim.destination, "dead").inc()
        logger.error(
            "delivery %s to %s is a dead letter: %s", claim.delivery_id, claim.destination, reason
        )

    async def _housekeeping(self) -> None:
        last_prune = time.monotonic()
        while True:
            try:
                self.metrics.outbox.stats = await self.outbox.stats()
                if time.monotonic() - last_prune >= PRUNE_INTERVAL:
                    last_prune = time.monotonic()
                    pruned = await self.outbox.prune()
                    if pruned:
                        logger.debug("pruned %d delivered entries", pruned)
            except OutboxUnavailable as error:
                logger.warning("outbox statistics unavailable: %s", error)
            except Exception:
                logger.exception("outbox housekeeping failed")
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)

    async def refresh_stats(self) -> None:
        """Read the outbox statistics now (tests and the CLI do not wait for housekeeping)."""
        self.metrics.outbox.stats = await self.outbox.stats()
