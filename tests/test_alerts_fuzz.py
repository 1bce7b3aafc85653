"""Fuzzing the webhook endpoint: whatever arrives, the answer is a precise 2xx or 4xx.

The sidecar runs on an event loop in a background thread for the whole test, so hypothesis
drives thousands of requests against one outbox, and a valid notification sent afterwards must
still be delivered.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.alerts_support import RecordingNotifier, alerts_config, build_sidecar, payload


class LoopThread:
    """An event loop in a thread, running a started sidecar and a client to its app."""

    def __init__(self, tmp_path: Path) -> None:
        self.notifier = RecordingNotifier()
        document = alerts_config(tmp_path, receiver={"max_body_size": "256KiB"})
        self.sidecar = build_sidecar(document, {"test": self.notifier})
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client: httpx.AsyncClient | None = None
        self.run(self._start())

    async def _start(self) -> None:
        assert self.sidecar.alerts is not None
        await self.sidecar.alerts.outbox.start()
        await self.sidecar.alerts.dispatcher.start()
        transport = httpx.ASGITransport(app=self.sidecar.app)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://sidecar")

    async def _stop(self) -> None:
        assert self.client is not None
        await self.client.aclose()
        assert self.sidecar.alerts is not None
        await self.sidecar.alerts.dispatcher.stop()
        await self.sidecar.alerts.outbox.stop()

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    def post(self, body: bytes, content_type: str = "application/json") -> httpx.Response:
        assert self.client is not None
        headers = {"content-type": content_type}
        return self.run(self.client.post("/alerts", content=body, headers=headers))

    def close(self) -> None:
        self.run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopThread]:
    loop_thread = LoopThread(tmp_path_factory.mktemp("fuzz"))
    yield loop_thread
    loop_thread.close()


def _check(response: httpx.Response) -> None:
    assert response.status_code in (200, 400, 413, 415), response.text
    body = response.json()
    if response.status_code == 200:
        assert body["status"] in ("accepted", "duplicate")
    else:
        assert body["error"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)
FIELDS = list(payload().keys())
ALERT_FIELDS = list(payload()["alerts"][0].keys())

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(body=st.binary(max_size=2048))
def test_random_bytes(target: LoopThread, body: bytes) -> None:
    _check(target.post(body))


@FUZZ
@given(value=json_values)
def test_any_json_document(target: LoopThread, value: Any) -> None:
    _check(target.post(json.dumps(value).encode()))


@FUZZ
@given(field=st.sampled_from(FIELDS), value=json_values, drop=st.booleans())
def test_payload_with_one_field_wrong_or_missing(
    target: LoopThread, field: str, value: Any, drop: bool
) -> None:
    document = payload("fuzz")
    if drop:
        document.pop(field)
    else:
        document[field] = value

    _check(target.post(json.dumps(document).encode()))


@FUZZ
@given(field=st.sampled_from(ALERT_FIELDS), value=json_values, text=st.text(max_size=300))
def test_alert_with_a_field_wrong_and_any_unicode(
    target: LoopThread, field: str, value: Any, text: str
) -> None:
    document = payload("fuzz-alert")
    document["alerts"][0]["labels"][text[:50] or "k"] = text
    document["alerts"][0][field] = value
    document["commonAnnotations"] = {"summary": text}

    _check(target.post(json.dumps(document).encode()))


@FUZZ
@given(
    depth=st.integers(min_value=1, max_value=50_000),
    size=st.integers(min_value=0, max_value=300_000),
)
def test_deep_nesting_and_huge_strings(target: LoopThread, depth: int, size: int) -> None:
    nested = b'{"a":' * depth + b"1" + b"}" * depth
    document = payload("huge")
    document["commonAnnotations"] = {"description": "x" * size}

    _check(target.post(nested))
    _check(target.post(json.dumps(document).encode()))


@FUZZ
@given(
    content_type=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
)
def test_any_content_type(target: LoopThread, content_type: str) -> None:
    header = content_type.encode("ascii", "ignore").decode("ascii").strip()
    _check(target.post(json.dumps(payload("ct")).encode(), header or "text/plain"))


def test_after_the_fuzzing_a_valid_notification_is_still_delivered(target: LoopThread) -> None:
    response = target.post(json.dumps(payload("survivor")).encode())

    async def delivered() -> bool:
        for _ in range(500):
            if any("survivor" in record.group_key for record in target.notifier.records):
                return True
            await asyncio.sleep(0.02)
        return False

    assert response.status_code == 200
    assert target.run(delivered())
