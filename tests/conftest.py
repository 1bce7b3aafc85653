"""Shared fixtures: expensive servers once per run, cheap ones per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tests.fake_discord import FakeDiscord
from tests.harness import PrometheusServer, RedisServer


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """One real Prometheus for the whole run; tests add targets with ``scrape()``."""
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private Redis on a free port that the test may stop and start again."""
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def private_state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sidecar built on defaults keeps its outbox in the test's directory, not in $HOME."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


@pytest.fixture
def registry() -> CollectorRegistry:
    """A fresh registry, so no test sees another's metrics."""
    return CollectorRegistry()


@pytest.fixture(scope="session")
def fake_discord() -> Iterator[FakeDiscord]:
    """One fake Discord API for the run; each test adds its own webhook (its own bucket)."""
    server = FakeDiscord().start()
    yield server
    server.stop()
