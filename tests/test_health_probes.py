"""The probe endpoints of an in-process sidecar: formats, status codes, exclusion, draining."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from sidecar.app import Sidecar
from sidecar.config import parse_config
from sidecar.health import CheckFailed, Outcome
from tests.harness import require_tool
from tests.health_peers import HttpPeer, SilentPeer

FAST = {"interval": "1s", "timeout": "800ms"}  # generous: the test machine is shared


@pytest.fixture
def peer() -> Iterator[HttpPeer]:
    server = HttpPeer().start()
    yield server
    server.stop()


def make_sidecar(checks: list[dict[str, Any]], **health: Any) -> Sidecar:
    config = parse_config(
        {
            "metrics": {"host": {"enabled": False}, "process": {"include_self": False}},
            "health": {"checks": checks, **health},
            # Without the receiver there is no outbox, whose built-in check needs it running.
            "alerts": {"receiver": {"enabled": False}},
        }
    )
    return Sidecar(config)


@pytest.fixture
async def client_for() -> AsyncIterator[Any]:
    """Start a sidecar's health runner in process and give an HTTP client for its app.

    Only the runner starts: other components (listeners on fixed default ports) are not what
    these tests are about, and the subprocess tests run the whole sidecar.
    """
    stack: list[tuple[Sidecar, httpx.AsyncClient]] = []

    async def start(sidecar: Sidecar) -> httpx.AsyncClient:
        await sidecar.health.start()
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=sidecar.app), base_url="http://sidecar"
        )
        stack.append((sidecar, client))
        return client

    yield start
    for sidecar, client in reversed(stack):
        await client.aclose()
        await sidecar.health.stop()


async def settle(sidecar: Sidecar) -> None:
    """Wait until every check has a first result."""
    deadline = time.monotonic() + 10
    while any(state.status is None for state in sidecar.health.states.values()):
        assert time.monotonic() < deadline, "checks never produced a result"
        await asyncio.sleep(0.02)


async def test_defaults_pass_with_plain_ok(client_for: Any) -> None:
    sidecar = make_sidecar([])
    client = await client_for(sidecar)
    await settle(sidecar)

    responses = [await client.get(path) for path in ("/livez", "/readyz", "/healthz")]
    head = await client.head("/readyz")

    assert [(r.status_code, r.text) for r in responses] == [(200, "ok")] * 3
    assert (head.status_code, head.text) == (200, "")
    assert responses[0].headers["content-type"] == "text/plain; charset=utf-8"
    assert responses[0].headers["cache-control"] == "no-store"


async def test_verbose_lists_every_check_in_kube_style(client_for: Any, peer: HttpPeer) -> None:
    sidecar = make_sidecar([{"kind": "http", "name": "web", "url": peer.url, **FAST}])
    client = await client_for(sidecar)
    await settle(sidecar)

    ready = await client.get("/readyz?verbose")
    live = await client.get("/livez", params={"verbose": "1"})

    assert ready.status_code == 200
    assert ready.text == "[+]shutdown ok\n[+]event_loop ok\n[+]web ok\nreadyz check passed\n"
    assert live.text == "[+]event_loop ok\nlivez check passed\n"


async def test_a_failing_dependency_fails_readiness_only_and_hides_its_reason(
    client_for: Any, peer: HttpPeer
) -> None:
    peer.status = 500
    sidecar = make_sidecar([{"kind": "http", "name": "web", "url": peer.url, **FAST}])
    client = await client_for(sidecar)
    await settle(sidecar)

    ready = await client.get("/readyz")
    live = await client.get("/livez")
    health = await client.get("/healthz")

    assert ready.status_code == 503
    assert ready.text == (
        "[+]shutdown ok\n[+]event_loop ok\n[-]web failed: reason withheld\nreadyz check failed\n"
    )
    assert (live.status_code, live.text) == (200, "ok")
    assert health.status_code == 503
    assert health.text.endswith("[-]web failed: reason withheld\nhealthz check failed\n")


async def test_reasons_are_shown_when_configured(client_for: Any, peer: HttpPeer) -> None:
    peer.status = 500
    sidecar = make_sidecar(
        [{"kind": "http", "name": "web", "url": peer.url, **FAST}], show_reasons=True
    )
    client = await client_for(sidecar)
    await settle(sidecar)

    response = await client.get("/readyz")

    assert "[-]web failed: unexpected status 500\n" in response.text


async def test_a_failing_non_critical_check_only_warns(client_for: Any, peer: HttpPeer) -> None:
    peer.status = 500
    sidecar = make_sidecar(
        [{"kind": "http", "name": "cache", "url": peer.url, "critical": False, **FAST}]
    )
    client = await client_for(sidecar)
    await settle(sidecar)

    plain = await client.get("/readyz")
    verbose = await client.get("/readyz?verbose")
    document = (await client.get("/readyz?format=json")).json()

    assert (plain.status_code, plain.text) == (200, "ok")
    assert "[+]cache warn: reason withheld\n" in verbose.text
    assert verbose.text.endswith("readyz check passed\n")
    assert document["status"] == "warn"
    assert document["checks"]["cache:responseTime"][0]["status"] == "warn"


async def test_exclude_leaves_a_check_out_and_says_so(client_for: Any, peer: HttpPeer) -> None:
    peer.status = 500
    sidecar = make_sidecar([{"kind": "http", "name": "web", "url": peer.url, **FAST}])
    client = await client_for(sidecar)
    await settle(sidecar)

    plain = await client.get("/readyz?exclude=web")
    verbose = await client.get("/readyz?exclude=web&exclude=nosuch&verbose")

    assert (plain.status_code, plain.text) == (200, "ok")
    assert verbose.status_code == 200
    assert verbose.text == (
        "[+]shutdown ok\n[+]event_loop ok\n[+]web excluded: ok\n"
        'warn: some health checks cannot be excluded: no matches for "nosuch"\n'
        "readyz check passed\n"
    )


async def test_per_check_paths(client_for: Any, peer: HttpPeer) -> None:
    peer.status = 500
    sidecar = make_sidecar([{"kind": "http", "name": "web", "url": peer.url, **FAST}])
    client = await client_for(sidecar)
    await settle(sidecar)

    web = await client.get("/readyz/web")
    loop = await client.get("/livez/event_loop")
    not_live = await client.get("/livez/web")
    unknown = await client.get("/readyz/nosuch")

    assert (web.status_code, web.text) == (
        503,
        "[-]web failed: reason withheld\nreadyz/web check failed\n",
    )
    assert (loop.status_code, loop.text) == (200, "ok")
    assert (not_live.status_code, not_live.text) == (404, "no liveness check named 'web'\n")
    assert (unknown.status_code, unknown.text) == (404, "no readiness check named 'nosuch'\n")


async def test_health_json_follows_the_draft(client_for: Any, peer: HttpPeer) -> None:
    failing = HttpPeer(status=500).start()
    sidecar = make_sidecar(
        [
            {"kind": "http", "name": "web", "url": peer.url, **FAST},
            {"kind": "http", "name": "api", "url": failing.url, **FAST},
            {"kind": "disk", "name": "data", "path": "/", "fail_free_ratio": None, **FAST},
        ],
        show_reasons=True,
    )
    client = await client_for(sidecar)
    await settle(sidecar)

    try:
        by_accept = await client.get("/readyz", headers={"Accept": "application/health+json"})
        by_query = await client.get("/healthz?format=json")
    finally:
        failing.stop()

    assert by_accept.status_code == 503
    assert by_accept.headers["content-type"] == "application/health+json"
    assert by_query.status_code == 503
    for document in (by_accept.json(), by_query.json()):
        assert_draft_document(document)
    document = by_accept.json()
    assert document["status"] == "fail"
    assert set(document["checks"]) == {
        "shutdown:draining",
        "event_loop:lag",
        "web:responseTime",
        "api:responseTime",
        "data:freeBytes",
    }
    web = document["checks"]["web:responseTime"][0]
    assert web["status"] == "pass"
    assert "output" not in web
    assert web["observedUnit"] == "s"
    assert web["componentType"] == "component"
    api = document["checks"]["api:responseTime"][0]
    assert (api["status"], api["output"]) == ("fail", "unexpected status 500")
    data = document["checks"]["data:freeBytes"][0]
    assert data["observedUnit"] == "bytes"
    assert data["observedValue"] > 0


def assert_draft_document(document: dict[str, Any]) -> None:
    """The rules of draft-inadarei-api-health-check that a document must satisfy."""
    assert document["status"] in {"pass", "warn", "fail"}
    for key in ("version", "releaseId", "serviceId", "description"):
        assert isinstance(document.get(key, ""), str)
    assert isinstance(document["checks"], dict)
    for key, items in document["checks"].items():
        assert re.fullmatch(r"[^:]+:[^:]+", key), key
        assert isinstance(items, list)
        assert items
        for item in items:
            assert item["status"] in {"pass", "warn", "fail"}
            if item["status"] == "pass":
                assert "output" not in item
            else:
                assert isinstance(item["output"], str)
            if "observedUnit" in item:
                assert "observedValue" in item
            if "time" in item:
                datetime.fromisoformat(item["time"])
                assert item["time"].endswith("+00:00")
            assert item.get("componentType", "system") in {"component", "datastore", "system"}
    ranks = {"pass": 0, "warn": 1, "fail": 2}
    worst = max(ranks[i["status"]] for items in document["checks"].values() for i in items)
    assert ranks[document["status"]] <= worst


async def test_malformed_requests_get_precise_errors(client_for: Any) -> None:
    sidecar = make_sidecar([])
    client = await client_for(sidecar)
    await settle(sidecar)

    bad_format = await client.get("/readyz?format=xml")
    many = await client.get("/readyz", params=[("exclude", f"c{n}") for n in range(65)])
    long_name = await client.get("/readyz/" + "x" * 5000)
    hostile = await client.get("/readyz/%0d%0aSet-Cookie:%20x")
    post = await client.post("/readyz")
    after = await client.get("/readyz")

    assert (bad_format.status_code, bad_format.text) == (400, "format must be text or json\n")
    assert (many.status_code, many.text) == (
        400,
        "at most 64 exclude parameters are accepted\n",
    )
    assert long_name.status_code == 404
    assert long_name.text == f"no readiness check named {'x' * 64!r}\n"
    assert hostile.status_code == 404
    assert "set-cookie" not in hostile.headers
    assert post.status_code == 405
    assert (after.status_code, after.text) == (200, "ok")


async def test_readiness_fails_at_once_while_draining_and_liveness_stays_ok(
    client_for: Any,
) -> None:
    sidecar = make_sidecar([])
    client = await client_for(sidecar)
    await settle(sidecar)

    sidecar.lifecycle.begin_drain()
    ready = await client.get("/readyz")
    live = await client.get("/livez")
    document = (await client.get("/readyz?format=json")).json()

    assert ready.status_code == 503
    assert ready.text.startswith("[-]shutdown failed: the sidecar is shutting down\n")
    assert (live.status_code, live.text) == (200, "ok")
    assert document["checks"]["shutdown:draining"][0] == {
        "status": "fail",
        "componentType": "system",
        "observedValue": True,
        "output": "the sidecar is shutting down",
    }


async def test_a_hanging_check_never_delays_readiness(client_for: Any) -> None:
    silent = SilentPeer().start()
    sidecar = make_sidecar(
        [{"kind": "http", "name": "stuck", "url": silent.url, "interval": "3s", "timeout": "2s"}]
    )
    client = await client_for(sidecar)

    try:
        deadline = time.monotonic() + 5
        while silent.open_connections() < 1:  # the check's request is now in flight
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        started = time.monotonic()
        response = await client.get("/readyz/stuck")
        elapsed = time.monotonic() - started
        still_in_flight = silent.open_connections()
    finally:
        silent.stop()

    assert (response.status_code, response.text) == (
        503,
        "[-]stuck failed: reason withheld\nreadyz/stuck check failed\n",
    )
    assert still_in_flight == 1
    assert elapsed < 1.0  # far below the 2s the check itself may take


async def test_a_check_starts_counting_after_its_initial_delay(
    client_for: Any, peer: HttpPeer
) -> None:
    sidecar = make_sidecar(
        [{"kind": "http", "name": "slow", "url": peer.url, "initial_delay": "300ms", **FAST}]
    )
    client = await client_for(sidecar)

    early = await client.get("/readyz/slow")
    requests_early = peer.requests
    deadline = time.monotonic() + 5
    while (await client.get("/readyz/slow")).status_code != 200:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)

    assert early.status_code == 503
    assert requests_early == 0


async def test_builtin_checks_from_other_parts(client_for: Any) -> None:
    sidecar = make_sidecar([])
    healthy = True

    async def storage() -> Outcome:
        if not healthy:
            raise CheckFailed("storage unreachable")
        return Outcome()

    async def broken() -> Outcome:
        raise RuntimeError("bug in a probe")

    sidecar.health.add_builtin("storage", storage, interval=0.1, timeout=0.05)
    client = await client_for(sidecar)
    sidecar.health.add_builtin(
        "broken",
        broken,
        interval=0.1,
        timeout=0.05,
        readiness=False,
        liveness=True,
        critical=False,
    )
    await settle(sidecar)

    ready = await client.get("/readyz?verbose")
    live = await client.get("/livez?verbose")
    healthy = False
    deadline = time.monotonic() + 5
    while (await client.get("/readyz")).status_code != 503:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)

    assert "[+]storage ok\n" in ready.text
    assert "[+]broken warn: reason withheld\n" in live.text
    assert live.status_code == 200
    with pytest.raises(ValueError, match="already exists"):
        sidecar.health.add_builtin("storage", storage, interval=1, timeout=0.5)
    with pytest.raises(ValueError, match="shorter than interval"):
        sidecar.health.add_builtin("other", storage, interval=1, timeout=1)
    with pytest.raises(ValueError, match="invalid built-in check name"):
        sidecar.health.add_builtin("shutdown", storage, interval=1, timeout=0.5)


async def test_metrics_follow_the_checks_and_pass_promtool(client_for: Any, peer: HttpPeer) -> None:
    promtool = require_tool("promtool")
    peer.status = 500
    sidecar = make_sidecar([{"kind": "http", "name": "web", "url": peer.url, **FAST}])
    client = await client_for(sidecar)
    await settle(sidecar)

    text = (await client.get("/metrics")).text
    lint = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        check=False,
    )

    assert (
        'sidecar_health_check_status{check="web",critical="true",kind="http",status="fail"} 1.0'
        in text
    )
    assert (
        'sidecar_health_check_status{check="web",critical="true",kind="http",status="pass"} 0.0'
        in text
    )
    assert 'sidecar_health_check_failures_total{check="web",reason="error"}' in text
    assert 'sidecar_health_check_duration_seconds_count{check="web"}' in text
    assert 'sidecar_health_check_last_success_timestamp_seconds{check="event_loop"}' in text
    assert 'sidecar_health_probe_up{probe="livez"} 1.0' in text
    assert 'sidecar_health_probe_up{probe="readyz"} 0.0' in text
    assert "sidecar_event_loop_lag_seconds " in text
    assert (lint.returncode, lint.stdout + lint.stderr) == (0, "")


async def test_the_landing_page_links_the_probes(client_for: Any) -> None:
    sidecar = make_sidecar([])
    client = await client_for(sidecar)

    page = await client.get("/", headers={"Accept": "text/plain"})

    paths = [line.split("\t")[0] for line in page.text.splitlines()]
    assert {"/livez", "/readyz", "/healthz"} <= set(paths)
