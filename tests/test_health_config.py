"""Invalid check definitions fail ``sidecar check-config`` with the field path of each problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.cli import main
from sidecar.config import parse_config
from sidecar.health.config import HttpCheck


def check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str], document: Any) -> str:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(document) if not isinstance(document, str) else document)

    code = main(["check-config", str(path)])

    captured = capsys.readouterr()
    assert code == 1, captured.out
    lines = captured.err.splitlines()
    assert lines[0] == f"invalid configuration {path}:"
    return "\n".join(line.strip() for line in lines[1:])


def checks(*entries: Any) -> dict[str, Any]:
    return {"health": {"checks": list(entries)}}


TCP = {"kind": "tcp", "address": "127.0.0.1:6379"}


def test_timeout_not_shorter_than_interval_names_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = checks(
        {**TCP, "name": "a"},
        {**TCP, "name": "b"},
        {**TCP, "name": "c", "interval": "5s", "timeout": "5s"},
    )

    assert check_config(tmp_path, capsys, document) == (
        "health.checks[2].timeout: must be shorter than interval"
    )


def test_duplicate_and_reserved_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    duplicate = checks({**TCP, "name": "db"}, {**TCP, "name": "web"}, {**TCP, "name": "db"})
    reserved = checks({**TCP, "name": "shutdown"})

    assert check_config(tmp_path, capsys, duplicate) == (
        "health.checks: name 'db' is used twice (entries [0] and [2])"
    )
    assert check_config(tmp_path, capsys, reserved) == (
        "health.checks: name 'shutdown' of entry [0] is reserved for a built-in check"
    )


def test_unknown_missing_and_malformed_kinds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = checks({"kind": "ftp", "name": "a"}, {"name": "b"}, "just text", None)

    assert check_config(tmp_path, capsys, document).splitlines() == [
        "health.checks[0].kind: unknown check kind 'ftp'; expected one of command, disk, http, "
        "memory, process, redis, tcp",
        "health.checks[1].kind: Field required",
        "health.checks[2]: each check must be a mapping with a kind and a name",
        "health.checks[3]: each check must be a mapping with a kind and a name",
    ]


def test_bad_urls_and_addresses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    document = checks(
        {"kind": "http", "name": "a", "url": "ftp://example.org/"},
        {"kind": "http", "name": "b", "url": "http://"},
        {"kind": "http", "name": "c", "url": "http://[::1/"},
        {"kind": "tcp", "name": "d", "address": "localhost"},
        {"kind": "redis", "name": "e", "url": "redis://user:pw@localhost/0"},
        {"kind": "redis", "name": "f", "url": "http://localhost"},
        {"kind": "http", "name": "g", "url": "http://x", "headers": {"Bad Header": "v"}},
        {"kind": "http", "name": "h", "url": "http://x", "headers": {"X": "a\r\nInjected: 1"}},
    )

    output = check_config(tmp_path, capsys, document)

    assert output.splitlines() == [
        "health.checks[0].url: must start with http:// or https://",
        "health.checks[1].url: must name a host",
        output.splitlines()[2],
        "health.checks[3].address: must be host:port, such as 127.0.0.1:9464 (got 'localhost')",
        "health.checks[4].url: must not hold a password; set password_file or password_env",
        "health.checks[5].url: must start with redis://, rediss:// or unix://",
        "health.checks[6].headers: 'Bad Header' is not a valid header name",
        "health.checks[7].headers: value of 'X' contains a line break or NUL",
    ]
    assert output.splitlines()[2].startswith("health.checks[2].url: is not a valid URL: ")


def test_every_field_error_carries_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = checks(
        {**TCP, "name": "bad name!"},
        {**TCP, "name": "a", "interval": "soon"},
        {**TCP, "name": "b", "failure_threshold": 0},
        {**TCP, "name": "c", "probes": []},
        {**TCP, "name": "d", "probes": ["startup"]},
        {**TCP, "name": "e", "colour": "blue"},
        {"kind": "disk", "name": "f", "path": "/", "warn_free_ratio": 1.5},
        {"kind": "process", "name": "g"},
        {"kind": "command", "name": "h", "command": []},
        {**TCP, "name": "i", "timeout": "0s"},
    )

    lines = check_config(tmp_path, capsys, document).splitlines()

    paths = [line.split(":", 1)[0] for line in lines]
    assert paths == [
        "health.checks[0].name",
        "health.checks[1].interval",
        "health.checks[2].failure_threshold",
        "health.checks[3].probes",
        "health.checks[4].probes[0]",
        "health.checks[5].colour",
        "health.checks[6].warn_free_ratio",
        "health.checks[7]",
        "health.checks[8].command",
        "health.checks[9].timeout",
    ]
    assert lines[5] == "health.checks[5].colour: unknown key"
    assert lines[7] == "health.checks[7]: set exactly one of pid_file, process_name and cmdline"
    assert lines[9] == "health.checks[9].timeout: must be longer than 0s"


def test_event_loop_thresholds_must_be_ordered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = {"health": {"event_loop": {"warn_lag": "2s", "fail_lag": "1s"}}}

    assert check_config(tmp_path, capsys, document) == (
        "health.event_loop: fail_lag must be longer than warn_lag"
    )


def test_a_valid_file_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(
        yaml.safe_dump(
            checks(
                {"kind": "http", "name": "web", "url": "https://127.0.0.1:8443/ready"},
                {**TCP, "name": "db", "probes": ["readiness", "liveness"], "critical": False},
                {"kind": "memory", "name": "mem"},
            )
        )
    )

    code = main(["check-config", str(path)])

    assert code == 0
    assert capsys.readouterr().out == f"{path}: valid\n"


def test_defaults_of_a_check() -> None:
    config = parse_config(checks({"kind": "http", "name": "web", "url": "http://x/"}))

    (check,) = config.health.checks
    assert isinstance(check, HttpCheck)
    assert (check.interval, check.timeout, check.critical, check.probes) == (
        10.0,
        2.0,
        True,
        ["readiness"],
    )
    assert config.health.show_reasons is False
