"""The webhook's direct ASGI path, over real HTTP: it answers exactly as the routed endpoint.

POSTs to the receiver's paths skip the router; everything else must still reach it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from sidecar.app import Sidecar
from tests.alerts_support import RecordingNotifier, payload, poll, serve_on_loopback

TOKEN = "direct-path-token-0123456789"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Sidecar, RecordingNotifier, str]]:
    async with serve_on_loopback(tmp_path, TOKEN) as running:
        yield running


def _auth() -> dict[str, str]:
    return {"authorization": f"Bearer {TOKEN}"}


async def _chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def test_a_chunked_body_is_read_whole_and_delivered(
    served: tuple[Sidecar, RecordingNotifier, str],
) -> None:
    _, notifier, base = served
    body = json.dumps(payload("chunked", alerts=10)).encode()
    async with httpx.AsyncClient() as client:
        answer = await client.post(
            base + "/alerts",
            content=_chunks(body, 512),  # no content-length: chunked transfer, many messages
            headers={**_auth(), "content-type": "application/json"},
        )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == {"status": "accepted", "destinations": ["test"]}
    await poll(lambda: notifier.records, what="delivery")
    assert len(notifier.records[0].fingerprints) == 10


async def test_a_chunked_body_over_the_limit_is_refused(
    served: tuple[Sidecar, RecordingNotifier, str],
) -> None:
    sidecar, notifier, base = served
    limit = int(sidecar.config.alerts.receiver.max_body_size)
    async with httpx.AsyncClient() as client:
        answer = await client.post(
            base + "/alerts",
            content=_chunks(b" " * (limit + 1), 64 * 1024),
            headers={**_auth(), "content-type": "application/json"},
        )
        after = await client.post(base + "/alerts", json=payload("after"), headers=_auth())
    assert answer.status_code == 413
    assert answer.json() == {"error": f"body larger than {limit} bytes"}
    assert after.status_code == 200
    await poll(lambda: notifier.records, what="the later notification delivered")


async def test_answers_keep_their_headers(served: tuple[Sidecar, RecordingNotifier, str]) -> None:
    _, _, base = served
    async with httpx.AsyncClient() as client:
        unauthenticated = await client.post(base + "/alerts", json=payload("x"))
        unknown = await client.post(base + "/alerts/nobody", json=payload("x"), headers=_auth())
    assert unauthenticated.status_code == 401
    assert unauthenticated.headers["www-authenticate"].startswith("Bearer")
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "no receiver named 'nobody' is configured"}


async def test_other_methods_and_paths_still_reach_the_router(
    served: tuple[Sidecar, RecordingNotifier, str],
) -> None:
    _, notifier, base = served
    async with httpx.AsyncClient() as client:
        get = await client.get(base + "/alerts", headers=_auth())
        named_get = await client.get(base + "/alerts/default", headers=_auth())
        nested = await client.post(base + "/alerts/a/b", json=payload("x"), headers=_auth())
        metrics = await client.get(base + "/metrics")
    assert (get.status_code, named_get.status_code) == (405, 405)
    assert nested.status_code == 404
    assert metrics.status_code == 200
    assert notifier.records == []


async def test_named_receiver_path_selects_the_receiver(
    served: tuple[Sidecar, RecordingNotifier, str],
) -> None:
    _, notifier, base = served
    async with httpx.AsyncClient() as client:
        answer = await client.post(
            base + "/alerts/default", json=payload("named", receiver="other"), headers=_auth()
        )
        await poll(lambda: notifier.records, what="delivery")
        page = (await client.get(base + "/metrics")).text
    assert answer.status_code == 200, answer.text
    assert 'sidecar_alerts_received_total{outcome="accepted",receiver="default"} 1.0' in page


async def test_a_repeated_authorization_header_counts_by_its_first_value(
    served: tuple[Sidecar, RecordingNotifier, str],
) -> None:
    _, notifier, base = served
    body = json.dumps(payload("repeated")).encode()
    async with httpx.AsyncClient() as client:
        bad_first = await client.post(
            base + "/alerts",
            content=body,
            headers=[
                ("content-type", "application/json"),
                ("authorization", "Bearer wrong-token"),
                ("authorization", f"Bearer {TOKEN}"),
            ],
        )
        good_first = await client.post(
            base + "/alerts",
            content=body,
            headers=[
                ("content-type", "application/json"),
                ("authorization", f"Bearer {TOKEN}"),
                ("authorization", "Bearer wrong-token"),
            ],
        )
    assert (bad_first.status_code, good_first.status_code) == (401, 200)
    await poll(lambda: notifier.records, what="the authenticated notification delivered")
