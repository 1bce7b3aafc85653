"""The ``telemetry`` section and the OTEL_* environment variables: precedence and validation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.config import parse_config
from sidecar.errors import ConfigError
from tests.harness import REPO_ROOT


def problems(data: object, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, environ=environ or {})
    return [str(problem) for problem in caught.value.problems]


def test_export_is_off_without_an_endpoint() -> None:
    telemetry = parse_config({}, environ={}).telemetry

    assert telemetry.endpoint is None
    assert not telemetry.metrics_active
    assert not telemetry.traces_active


def test_environment_variables_fill_the_section() -> None:
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
        "OTEL_EXPORTER_OTLP_HEADERS": "api-key=abc%20def,x-tenant=shop",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2500",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
        "OTEL_METRIC_EXPORT_INTERVAL": "15000",
        "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "DELTA",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.25",
        "OTEL_SERVICE_NAME": "checkout-sidecar",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=prod,team=pay%2Cments",
    }

    telemetry = parse_config({}, environ=environ).telemetry

    assert telemetry.endpoint == "http://collector:4318"
    assert {k: v.reveal() for k, v in telemetry.headers.items()} == {
        "api-key": "abc def",
        "x-tenant": "shop",
    }
    assert telemetry.timeout == 2.5
    assert telemetry.compression == "gzip"
    assert telemetry.metrics.interval == 15.0
    assert telemetry.metrics.temporality == "delta"
    assert telemetry.traces_active
    assert telemetry.traces.sampler == "parentbased_traceidratio"
    assert telemetry.traces.ratio == 0.25
    assert telemetry.resource_attributes() == {
        "deployment.environment.name": "prod",
        "team": "pay,ments",
        "service.name": "checkout-sidecar",
    }


def test_the_file_wins_over_the_environment() -> None:
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://from-env:4318",
        "OTEL_METRIC_EXPORT_INTERVAL": "5000",
        "OTEL_SERVICE_NAME": "env-name",
        "OTEL_EXPORTER_OTLP_HEADERS": "api-key=from-env",
        "K8S_POD_NAME": "web-0",
    }
    data = {
        "telemetry": {
            "endpoint": "https://from-file:4318",
            "service_name": "file-name",
            "headers": {"authorization": "Bearer file"},
            "resource": {"team": "ops"},
        }
    }

    telemetry = parse_config(data, environ=environ).telemetry

    assert telemetry.endpoint == "https://from-file:4318"
    assert telemetry.metrics.interval == 5.0  # not in the file: the environment's
    assert telemetry.service_name == "file-name"
    assert list(telemetry.headers) == ["authorization"]  # a header map is replaced whole
    assert telemetry.resource == {"k8s.pod.name": "web-0", "team": "ops"}


def test_kubernetes_downward_api_variables_become_resource_attributes() -> None:
    environ = {
        "K8S_POD_NAME": "web-0",
        "K8S_POD_UID": "5b1c",
        "POD_NAMESPACE": "shop",
        "K8S_NODE_NAME": "node-a",
        # An explicit attribute outranks the derived one.
        "OTEL_RESOURCE_ATTRIBUTES": "k8s.node.name=node-b",
    }

    telemetry = parse_config({}, environ=environ).telemetry

    assert telemetry.resource == {
        "k8s.pod.name": "web-0",
        "k8s.pod.uid": "5b1c",
        "k8s.namespace.name": "shop",
        "k8s.node.name": "node-b",
    }


def test_k8s_namespace_name_is_preferred_over_pod_namespace() -> None:
    environ = {"K8S_NAMESPACE_NAME": "a", "POD_NAMESPACE": "b"}

    assert parse_config({}, environ=environ).telemetry.resource == {"k8s.namespace.name": "a"}


def test_sdk_disabled_turns_everything_off() -> None:
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}

    telemetry = parse_config({}, environ=environ).telemetry

    assert not telemetry.metrics_active
    assert not telemetry.traces_active


def test_exporter_none_turns_one_signal_off() -> None:
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_METRICS_EXPORTER": "none"}

    assert not parse_config({}, environ=environ).telemetry.metrics_active


def test_empty_variables_count_as_unset() -> None:
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "", "OTEL_SERVICE_NAME": "  "}

    telemetry = parse_config({}, environ=environ).telemetry

    assert telemetry.endpoint is None
    assert telemetry.service_name == "sidecar"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("OTEL_METRIC_EXPORT_INTERVAL", "10s", "OTEL_METRIC_EXPORT_INTERVAL must be a whole"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "-1", "OTEL_EXPORTER_OTLP_TIMEOUT must be a whole"),
        ("OTEL_SDK_DISABLED", "yes", "OTEL_SDK_DISABLED must be true or false"),
        ("OTEL_TRACES_EXPORTER", "jaeger", "OTEL_TRACES_EXPORTER must be otlp or none"),
        ("OTEL_TRACES_SAMPLER_ARG", "half", "OTEL_TRACES_SAMPLER_ARG must be a number"),
        ("OTEL_RESOURCE_ATTRIBUTES", "novalue", "OTEL_RESOURCE_ATTRIBUTES must be a list"),
    ],
)
def test_a_malformed_variable_is_named(variable: str, value: str, message: str) -> None:
    found = problems({}, {variable: value})

    assert len(found) == 1
    assert found[0].startswith("telemetry: environment variable ")
    assert message in found[0]


def test_a_malformed_header_variable_never_repeats_its_value() -> None:
    found = problems({}, {"OTEL_EXPORTER_OTLP_HEADERS": "Bearer supersecret"})

    assert found == [
        "telemetry: environment variable OTEL_EXPORTER_OTLP_HEADERS must be a list of key=value "
        "pairs separated by commas"
    ]


@pytest.mark.parametrize(
    ("telemetry", "path", "message"),
    [
        ({"endpoint": "collector:4318"}, "telemetry.endpoint", "must be an http:// or https://"),
        ({"endpoint": "ftp://collector"}, "telemetry.endpoint", "must be an http:// or https://"),
        ({"endpoint": "http://"}, "telemetry.endpoint", "must be an http:// or https://"),
        ({"endpoint": "http://c:99999"}, "telemetry.endpoint", "has an invalid port"),
        ({"endpoint": "http://u:p@c:4318"}, "telemetry.endpoint", "must not contain credentials"),
        ({"endpoint": 4318}, "telemetry.endpoint", "Input should be a valid string"),
        ({"protocol": "grpc"}, "telemetry.protocol", "Input should be 'http/protobuf'"),
        ({"headers": {"bad header": "x"}}, "telemetry.headers", "not a valid HTTP header name"),
        ({"headers": {"x-a": "a\r\nb"}}, "telemetry.headers", "contains a line break"),
        ({"resource": {"": "x"}}, "telemetry.resource", "not a valid attribute key"),
        ({"resource": {"k": "v" * 5000}}, "telemetry.resource", "longer than 4096"),
        ({"metrics": {"interval": "100ms"}}, "telemetry.metrics.interval", "greater than or"),
        ({"metrics": {"temporality": "both"}}, "telemetry.metrics.temporality", "Input should"),
        ({"traces": {"sampler": "sometimes"}}, "telemetry.traces.sampler", "Input should"),
        ({"traces": {"ratio": 2}}, "telemetry.traces.ratio", "less than or equal to 1"),
        ({"timeout": "0s"}, "telemetry.timeout", "greater than 0"),
        ({"endpont": "http://c:4318"}, "telemetry.endpont", "unknown key"),
    ],
)
def test_a_wrong_key_names_its_path(telemetry: dict[str, object], path: str, message: str) -> None:
    found = problems({"telemetry": telemetry})

    assert len(found) == 1, found
    assert found[0].startswith(path + ": ")
    assert message in found[0]


def test_header_values_are_secrets(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    data = {"telemetry": {"headers": {"authorization": {"file": str(token_file)}}}}
    environ = {"OTEL_EXPORTER_OTLP_HEADERS": "x-env=from-env"}

    config = parse_config(
        {"telemetry": {"headers": {"x-inline": "s3cr3t-inline"}}}, environ=environ
    )
    from_file = parse_config(data, environ={})

    assert {secret.reveal() for secret in config.telemetry.secrets()} == {"s3cr3t-inline"}
    assert {secret.reveal() for secret in from_file.telemetry.secrets()} == {"from-file"}
    assert "s3cr3t-inline" in {secret.reveal() for secret in config.secrets()}
    assert "s3cr3t" not in repr(config.telemetry)


def test_check_config_rejects_a_malformed_endpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "sidecar.yaml"
    path.write_text("telemetry:\n  endpoint: localhost:4318\n")

    code = main(["check-config", str(path)])

    assert code == 1
    error = capsys.readouterr().err
    assert "telemetry.endpoint: must be an http:// or https:// URL with a host" in error
    assert "'localhost:4318'" in error


def test_check_config_rejects_a_malformed_endpoint_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "otel-collector")
    path = tmp_path / "sidecar.yaml"
    path.write_text("{}\n")

    code = main(["check-config", str(path)])

    assert code == 1
    assert "telemetry.endpoint: must be an http:// or https:// URL" in capsys.readouterr().err


def test_the_sdk_is_not_imported_while_export_is_off() -> None:
    script = (
        "import sys\n"
        "from sidecar.config import parse_config\n"
        "from sidecar.app import Sidecar\n"
        "sidecar = Sidecar(parse_config({}, environ={}))\n"
        "assert not sidecar.telemetry.tracer.enabled\n"
        "prefixes = ('opentelemetry.sdk', 'opentelemetry.exporter')\n"
        "print(sorted(m for m in sys.modules if m.startswith(prefixes)))\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )

    assert result.stdout.strip() == "[]"
