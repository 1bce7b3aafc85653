"""Configuration of the alert pipeline: defaults, refusals naming the field, and the CLI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.alerts.config import default_data_dir
from sidecar.alerts.routing import parse_matcher
from sidecar.app import Sidecar
from sidecar.config import parse_config
from sidecar.errors import ConfigError
from tests.alerts_support import alerts_config, build_sidecar, payload, running_client
from tests.harness import sidecar_env


def _problems(document: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        Sidecar(parse_config(document))
    return [str(problem) for problem in caught.value.problems]


def test_defaults_use_a_log_destination_and_the_state_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))

    config = parse_config({})

    assert config.alerts.receiver.path == "/alerts"
    assert config.alerts.receiver.auth is None
    assert [d.kind for d in config.alerts.destinations] == ["log"]
    assert config.alerts.outbox.sqlite.resolved_path() == tmp_path / "sidecar/outbox.sqlite3"
    assert default_data_dir() == tmp_path / "sidecar"


def test_without_home_or_xdg_the_data_dir_is_local(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.delenv("HOME", raising=False)

    assert default_data_dir() == Path("sidecar-data")


def test_non_loopback_listen_without_auth_refuses_to_start(tmp_path: Path) -> None:
    document = alerts_config(tmp_path)
    document["server"] = {"listen": "0.0.0.0:9464"}

    problems = _problems(document)

    assert len(problems) == 1
    assert problems[0].startswith("alerts.receiver.auth: server.listen 0.0.0.0:9464")


def test_explicit_auth_none_allows_a_non_loopback_listen(tmp_path: Path) -> None:
    document = alerts_config(tmp_path, receiver={"auth": "none"})
    document["server"] = {"listen": "0.0.0.0:9464"}

    sidecar = Sidecar(parse_config(document))

    assert sidecar.alerts is not None
    assert not sidecar.alerts.receiver.authenticator.required


@pytest.mark.parametrize("path", ["/metrics", "/", "/readyz"])
def test_receiver_path_must_not_shadow_another_endpoint(tmp_path: Path, path: str) -> None:
    problems = _problems(alerts_config(tmp_path, receiver={"path": path}))

    assert problems == [f"alerts.receiver.path: {path} is already served by the sidecar"]


async def test_receiver_path_can_be_changed(tmp_path: Path) -> None:
    sidecar = build_sidecar(alerts_config(tmp_path, receiver={"path": "/hooks/am/"}), {})

    async with running_client(sidecar) as client:
        moved = await client.post("/hooks/am", json=payload())
        direct = await client.post("/hooks/am/default", json=payload("direct"))
        old = await client.post("/alerts", json=payload())

    assert moved.status_code == 200
    assert direct.status_code == 200
    assert old.status_code == 404


@pytest.mark.parametrize(
    ("alerts", "expected"),
    [
        ({"receiver": {"auth": "yes"}}, "alerts.receiver.auth"),
        ({"receiver": {"auth": {}}}, "set bearer_tokens or basic"),
        ({"receiver": {"auth": {"bearer_tokens": [""]}}}, "must not be empty"),
        (
            {"receiver": {"auth": {"bearer_tokens": [{"env": "NO_SUCH_VARIABLE_X"}]}}},
            "alerts.receiver.auth.bearer_tokens[0]: environment variable NO_SUCH_VARIABLE_X",
        ),
        ({"receiver": {"path": "alerts"}}, "alerts.receiver.path"),
        ({"receiver": {"max_body_size": "lots"}}, "alerts.receiver.max_body_size"),
        ({"outbox": {"backend": "kafka"}}, "alerts.outbox.backend"),
        ({"outbox": {"max_depth": 0}}, "alerts.outbox.max_depth"),
        ({"outbox": {"dedup_window": "5 minutes"}}, "alerts.outbox.dedup_window"),
        ({"outbox": {"sqlite": {"wal": True}}}, "alerts.outbox.sqlite.wal: unknown key"),
        ({"destinations": [{"name": "x", "kind": "pager"}]}, "alerts.destinations[0]: kind"),
        ({"destinations": [{"name": "bad name", "kind": "log"}]}, "alerts.destinations[0].name"),
        (
            {"destinations": [{"name": "a", "kind": "log"}, {"name": "a", "kind": "log"}]},
            "duplicate names ['a']",
        ),
        ({"receivers": [{"name": "default", "destinations": ["nope"]}]}, "no destination named"),
        ({"routes": [{"receivers": ["ghost"]}]}, "routes[0].receivers: no receiver named 'ghost'"),
        ({"routes": [{"matchers": ["sev~x"], "receivers": ["default"]}]}, "alerts.routes[0]"),
        ({"routes": [{"matchers": ['a=~"("'], "receivers": ["default"]}]}, "invalid regular"),
        ({"routes": [{"matchers": [], "receivers": []}]}, "alerts.routes[0].receivers"),
        ({"default_receiver": "nobody"}, "default_receiver: no receiver named 'nobody'"),
        ({"dispatcher": {"concurrency": 0}}, "alerts.dispatcher.concurrency"),
    ],
)
def test_bad_settings_name_their_field(
    tmp_path: Path, alerts: dict[str, Any], expected: str
) -> None:
    document = {"alerts": alerts}

    with pytest.raises(ConfigError) as caught:
        parse_config(document, environ={})

    assert any(expected in str(problem) for problem in caught.value.problems), caught.value


@pytest.mark.parametrize(
    ("text", "labels", "matches"),
    [
        ('severity=~"critical|page"', {"severity": "page"}, True),
        ('severity=~"critical|page"', {"severity": "paged"}, False),
        ("severity!~warn.*", {"severity": "warning"}, False),
        ("team=ops", {"team": "ops"}, True),
        ('team!="ops"', {}, True),
        ('team=""', {}, True),
        ('msg="a \\"quoted\\" word"', {"msg": 'a "quoted" word'}, True),
    ],
)
def test_matchers_follow_alertmanager(text: str, labels: dict[str, str], matches: bool) -> None:
    assert parse_matcher(text).matches(labels) is matches


@pytest.mark.parametrize("text", ["", "=x", "1a=b", 'a="open', "a=~[", "a~b"])
def test_malformed_matchers_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="matcher"):
        parse_matcher(text)


async def test_outbox_cli_lists_and_retries_dead_letters(tmp_path: Path) -> None:
    from sidecar.notify.base import DeliveryError
    from tests.alerts_support import RecordingNotifier, poll

    notifier = RecordingNotifier()
    notifier.script = [DeliveryError("bad request (400)", retryable=False, status=400)]
    document = alerts_config(tmp_path)
    sidecar = build_sidecar(document, {"test": notifier})
    config_path = tmp_path / "sidecar.yaml"
    config_path.write_text(yaml.safe_dump(document))
    assert sidecar.alerts is not None

    async with running_client(sidecar) as client:
        await client.post("/alerts", json=payload("cli"))
        dead = await poll(lambda: sidecar.alerts.outbox.list("dead"), what="dead letter")

    config = str(config_path)
    listed = await asyncio.to_thread(_outbox_cli, "list", "--state", "dead", "--config", config)
    retried = await asyncio.to_thread(
        _outbox_cli, "retry", dead[0].delivery_id, "999999", "--config", config
    )
    after = await asyncio.to_thread(_outbox_cli, "list", "--state", "pending", "--config", config)

    assert listed.returncode == 0, listed.stderr
    assert "permanent failure: bad request (400)" in listed.stdout
    assert dead[0].delivery_id in listed.stdout
    assert retried.returncode == 1
    assert "queued 1 dead letter(s) again" in retried.stdout
    assert "999999: no dead letter with this id" in retried.stderr
    assert dead[0].delivery_id in after.stdout


def _outbox_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return _cli("outbox", *args)


def test_check_config_reports_an_open_receiver_on_a_public_listen(tmp_path: Path) -> None:
    path = tmp_path / "public.yaml"
    path.write_text(yaml.safe_dump({"server": {"listen": "0.0.0.0:9464"}}))

    result = _cli("check-config", str(path))

    assert result.returncode == 1
    assert "alerts.receiver.auth: server.listen 0.0.0.0:9464" in result.stderr


def test_run_refuses_an_open_receiver_on_a_public_listen(tmp_path: Path) -> None:
    path = tmp_path / "public.yaml"
    path.write_text(yaml.safe_dump({"server": {"listen": "0.0.0.0:9464"}}))

    result = _cli("run", "--config", str(path))

    assert result.returncode == 2
    assert "alerts.receiver.auth" in result.stderr


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        capture_output=True,
        text=True,
        env=sidecar_env(),
        check=False,
        timeout=60,
    )
