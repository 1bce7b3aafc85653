"""The configuration model: field types, secrets, and errors that name the field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from sidecar.config import Config, load_config, parse_config
from sidecar.errors import ConfigError
from sidecar.fields import Secret, Section, format_duration, parse_duration, split_host_port
from sidecar.reference import BEGIN, END, leaf_paths, render_reference

ROOT = Path(__file__).resolve().parent.parent


def problems(data: object, **kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, **kwargs)  # type: ignore[arg-type]
    return [str(problem) for problem in caught.value.problems]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("15s", 15), ("5m", 300), ("1h30m", 5400), ("250ms", 0.25), ("1.5s", 1.5), ("2d", 172800)],
)
def test_durations_parse_like_prometheus(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("seconds", [0, 0.25, 1, 59, 61, 3600, 5400, 90061])
def test_durations_format_back_to_the_same_value(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "15", "s", "5 m", "1h-5m", "abc", "5mm", "1e3s"])
def test_malformed_durations_are_refused(text: str) -> None:
    assert problems({"server": {"shutdown_delay": text}})[0].startswith(
        "server.shutdown_delay: must be a duration"
    )


def test_negative_duration_names_the_field() -> None:
    assert problems({"server": {"shutdown_timeout": "-5s"}}) == [
        "server.shutdown_timeout: must not be negative (got -5s)"
    ]


def test_bare_number_duration_asks_for_a_unit() -> None:
    assert problems({"server": {"shutdown_timeout": 10}}) == [
        "server.shutdown_timeout: must be a duration with a unit, such as 15s, 5m or 1h30m (got 10)"
    ]


def test_unknown_keys_are_errors_at_every_level() -> None:
    found = problems({"server": {"listne": "x"}, "metrcs": {}, "metrics": {"host": {"cpu": 1}}})

    assert found == [
        "server.listne: unknown key",
        "metrics.host.cpu: unknown key",
        "metrcs: unknown key",
    ]


def test_wrong_types_name_the_field() -> None:
    found = problems({"server": {"access_log": "sometimes", "log_level": "loud"}})

    assert found[0].startswith("server.log_level: Input should be 'debug', 'info'")
    assert found[1].startswith("server.access_log: Input should be a valid boolean")


def test_every_problem_is_reported_at_once() -> None:
    found = problems(
        {
            "server": {"listen": "nowhere", "shutdown_delay": "-1s"},
            "metrics": {
                "process": {"targets": [{"name": "a"}, {"name": "bad name!", "pid_file": "/x"}]}
            },
        }
    )

    assert found == [
        "server.listen: must be host:port, such as 127.0.0.1:9464 (got 'nowhere')",
        "server.shutdown_delay: must not be negative (got -1s)",
        "metrics.process.targets[0]: set exactly one of pid_file, process_name and cmdline",
        "metrics.process.targets[1].name: String should match pattern '^[A-Za-z0-9_.-]{1,64}$'",
    ]


def test_targets_need_unique_names_and_not_self() -> None:
    found = problems(
        {
            "metrics": {
                "process": {
                    "targets": [
                        {"name": "app", "process_name": "a"},
                        {"name": "app", "process_name": "b"},
                        {"name": "self", "process_name": "c"},
                    ]
                }
            }
        }
    )

    assert "metrics.process.targets[2]: the target name 'self' is reserved" in found[0]
    assert len(found) == 1  # the duplicate is reported once the list itself validates


def test_invalid_regex_names_the_field() -> None:
    found = problems({"metrics": {"host": {"network": {"exclude_devices": "(lo"}}}})

    assert found[0].startswith("metrics.host.network.exclude_devices:")


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        (":9464", ("0.0.0.0", 9464)),
        ("[::1]:9464", ("::1", 9464)),
        ("localhost:80", ("localhost", 80)),
    ],
)
def test_listen_addresses_split(address: str, expected: tuple[str, int]) -> None:
    assert split_host_port(address) == expected


@pytest.mark.parametrize("address", ["9464", "host:", "host:99999", "::1:9464", "host:port"])
def test_bad_listen_addresses_are_refused(address: str) -> None:
    assert problems({"server": {"listen": address}})[0].startswith("server.listen: ")


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")

    assert load_config(path) == Config()


def test_no_file_and_no_environment_means_defaults() -> None:
    assert load_config(None, environ={}).server.listen == "127.0.0.1:9464"


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text("server:\n  listen: 127.0.0.1:1234\n")

    assert load_config(None, environ={"SIDECAR_CONFIG": str(path)}).server.listen.endswith(":1234")


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read .*missing.yaml: No such file"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("server:\n  listen: [unclosed\n")

    with pytest.raises(ConfigError, match=r"not valid YAML: .* at line 3, column 1"):
        load_config(path)


def test_a_list_at_the_top_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- server\n")

    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        load_config(path)


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_bytes(b"#" * (5 * 1024 * 1024))

    with pytest.raises(ConfigError, match="larger than"):
        load_config(path)


def test_command_line_overrides_win_and_are_validated(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text("server:\n  listen: 127.0.0.1:1234\n  log_level: debug\n")

    config = load_config(path, overrides={"server": {"listen": "127.0.0.1:4321"}})

    assert (config.server.listen, config.server.log_level) == ("127.0.0.1:4321", "debug")
    with pytest.raises(ConfigError, match=r"server\.listen"):
        load_config(path, overrides={"server": {"listen": "bad"}})


class _SecretHolder(Section):
    token: Secret | None = None


def test_secret_from_each_source(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("from-file\n")
    context = {"environ": {"TOKEN": "from-env"}, "base_dir": tmp_path}

    inline = _SecretHolder.model_validate({"token": "inline"}, context=context)
    from_file = _SecretHolder.model_validate({"token_file": "token"}, context=context)
    from_env = _SecretHolder.model_validate({"token_env": "TOKEN"}, context=context)

    assert inline.token is not None and inline.token.reveal() == "inline"
    assert from_file.token is not None and from_file.token.reveal() == "from-file"
    assert from_env.token is not None and from_env.token.reveal() == "from-env"
    assert [secret.reveal() for secret in from_env.secrets()] == ["from-env"]


def test_secrets_never_show_their_value(tmp_path: Path) -> None:
    holder = _SecretHolder.model_validate({"token": "hunter2-value"})

    shown = [repr(holder), str(holder), holder.model_dump_json(), str(holder.model_dump())]

    assert all("hunter2-value" not in text for text in shown)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"token_env": "NOT_SET"}, "token: environment variable NOT_SET is not set"),
        ({"token_file": "/nonexistent/token"}, "token: cannot read secret file /nonexistent/token"),
        ({"token": "a", "token_file": "/x"}, "set only one of token, token_file and token_env"),
        ({"token": 5}, "token: must be a string, or set <field>_file or <field>_env instead"),
    ],
)
def test_secret_problems_name_the_field(data: dict[str, object], message: str) -> None:
    from pydantic import ValidationError

    from sidecar.config import problems_of

    with pytest.raises(ValidationError) as caught:
        _SecretHolder.model_validate(data, context={"environ": {}})

    assert message in str(problems_of(caught.value)[0])


def test_unreadable_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("x")
    secret.chmod(0)
    if secret.read_bytes() == b"x":  # root reads anything; a directory is unreadable as text
        secret = tmp_path
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="cannot read secret file"):
        _SecretHolder.model_validate({"token_file": str(secret)})


def test_example_file_is_valid_and_shows_every_option() -> None:
    example = ROOT / "examples" / "sidecar.yaml"
    config = load_config(example)
    shown = set(_paths(yaml.safe_load(example.read_text())))

    missing = [path for path in leaf_paths() if not _is_shown(path, shown)]

    assert config.server.shutdown_delay == 5
    assert missing == []


def _is_shown(path: str, shown: set[str]) -> bool:
    return any(candidate in shown for candidate in (path, path + "_file", path + "_env"))


def _paths(node: object, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        found = []
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            found.append(path)
            found.extend(_paths(value, path))
        return found
    if isinstance(node, list):
        return [prefix + "[]"] + [path for item in node for path in _paths(item, prefix + "[]")]
    return []


def test_readme_reference_matches_the_model() -> None:
    readme = (ROOT / "README.md").read_text()
    between = readme[readme.index(BEGIN) + len(BEGIN) : readme.index(END)]

    assert between.strip() == render_reference().strip(), "run scripts/update-docs"


def test_every_field_is_documented() -> None:
    undocumented = re.findall(r"^\| `([^`]+)` \|[^|]*\|[^|]*\|\s*\|$", render_reference(), re.M)

    assert undocumented == []
