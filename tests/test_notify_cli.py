"""``sidecar notify test RECEIVER`` run as a user runs it, against the fake Discord API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.fake_discord import FakeDiscord
from tests.harness import REPO_ROOT, sidecar_env


def notify_test(
    config: dict[str, object], tmp_path: Path, receiver: str
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "notify", "test", receiver, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=sidecar_env(),
        cwd=REPO_ROOT,
    )


def discord_config(url: str) -> dict[str, object]:
    return {
        "alerts": {
            "destinations": [{"kind": "discord", "name": "ops-discord", "webhook_url": url}],
            "receivers": [{"name": "ops", "destinations": ["ops-discord"]}],
            "default_receiver": "ops",
        }
    }


def test_sends_firing_then_resolved(fake_discord: FakeDiscord, tmp_path: Path) -> None:
    url = fake_discord.add_webhook()

    result = notify_test(discord_config(url), tmp_path, "ops")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ops-discord (discord) firing: delivered (status 200")
    assert lines[1].startswith("ops-discord (discord) resolved: delivered (status 200")
    assert len(fake_discord.requests_for(url)) == 2
    assert url.rsplit("/", 1)[1] not in result.stdout + result.stderr


def test_reports_discords_refusal(fake_discord: FakeDiscord, tmp_path: Path) -> None:
    url = fake_discord.add_webhook()
    fake_discord.inject(url, 404, {"message": "Unknown Webhook", "code": 10015})

    result = notify_test(discord_config(url), tmp_path, "ops")

    assert result.returncode == 1
    assert "ops-discord (discord) firing: FAILED (permanent, status 404)" in result.stdout
    assert url.rsplit("/", 1)[1] not in result.stdout + result.stderr


def test_unknown_receiver(fake_discord: FakeDiscord, tmp_path: Path) -> None:
    result = notify_test(discord_config(fake_discord.add_webhook()), tmp_path, "nobody")

    assert result.returncode == 1
    assert "no receiver named 'nobody' (configured: ops)" in result.stderr


def test_invalid_configuration(tmp_path: Path) -> None:
    config = {"alerts": {"destinations": [{"kind": "discord", "name": "d"}]}}

    result = notify_test(config, tmp_path, "ops")

    assert result.returncode == 2
    assert "alerts.destinations[0].webhook_url" in result.stderr
