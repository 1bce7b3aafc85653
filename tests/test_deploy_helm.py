"""The Helm chart: rendered by a real Helm engine, valid Kubernetes, and true to the sidecar.

Every ``ci/*-values.yaml`` scenario is rendered with ``helm-python-sdk``, linted strictly, and
every manifest is validated against the Kubernetes 1.30 and newest schemas in strict mode
(unknown fields are errors). The Operator's resources have no Kubernetes schema: the
PrometheusRule is checked with promtool instead and the ServiceMonitor against the Service.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from helm_python import Chart, HelmValuesError, lint

from tests.deploy_names import ALERT_RULES, DASHBOARDS, REPO
from tests.harness import require_tool

CHART = REPO / "helm" / "sidecar"
EXAMPLE = REPO / "helm" / "examples" / "app-with-sidecar"
SCENARIOS = sorted(path.name for path in (CHART / "ci").glob("*-values.yaml"))
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
RELEASE = "obs"
NAMESPACE = "monitoring"


@cache
def chart() -> Chart:
    return Chart.load(CHART)


def scenario_values(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / "ci" / name).read_text()) or {}


@cache
def render_scenario(name: str) -> tuple[dict[str, Any], ...]:
    return tuple(render(scenario_values(name)))


def render(values: dict[str, Any], source: Chart | None = None) -> list[dict[str, Any]]:
    """Every manifest the chart renders with ``values``, parsed."""
    rendered = (source or chart()).render(values, name=RELEASE, namespace=NAMESPACE)
    manifests: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        manifests.extend(document for document in yaml.safe_load_all(text) if document)
    return manifests


def of_kind(manifests: Any, kind: str) -> list[dict[str, Any]]:
    return [manifest for manifest in manifests if manifest["kind"] == kind]


def one(manifests: Any, kind: str) -> dict[str, Any]:
    found = of_kind(manifests, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def sidecar_container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    return next(container for container in pod_spec["containers"] if container["name"] == "sidecar")


def test_scenarios_exist() -> None:
    assert {
        "default-values.yaml",
        "full-values.yaml",
        "existing-secret-values.yaml",
        "sidecar-mode-values.yaml",
    } <= set(SCENARIOS)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_chart_lints_strictly(scenario: str) -> None:
    report = lint(CHART, scenario_values(scenario), strict=True, kube_version="v1.30.0")

    problems = [message for message in report["messages"] if message["severity"] >= 2]
    assert report["errors"] == [], report
    assert problems == [], problems


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_kubernetes(scenario: str, version: str) -> None:
    manifests = render_scenario(scenario)

    assert manifests
    for manifest in manifests:
        if manifest["kind"] in OPERATOR_KINDS:
            continue
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{scenario}: {manifest['kind']} is invalid for {version}: {error.message}")


def test_strict_validation_rejects_an_unknown_field() -> None:
    deployment = json.loads(json.dumps(one(render_scenario("default-values.yaml"), "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"mode": "daemonset"}, "/mode"),
        ({"ports": {"http": 70000}}, "/ports/http"),
        ({"ports": {"statsd": "8125"}}, "/ports/statsd"),
        ({"replicaCount": -1}, "/replicaCount"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"image": {"repository": ""}}, "/image/repository"),
        ({"mode": "sidecar"}, "/injection/podSelector"),
        ({"livenessProbe": {"periodSeconds": 0}}, "/livenessProbe/periodSeconds"),
        ({"resources": {"limits": {"memory": "lots"}}}, "/resources/limits/memory"),
        ({"serviceMonitor": {"interval": "30 seconds"}}, "/serviceMonitor/interval"),
        ({"prometheusRule": {"runbookUrl": "docs/runbooks.md"}}, "/prometheusRule/runbookUrl"),
        ({"podDisruptionBudget": {"minAvailable": "half"}}, "/podDisruptionBudget/minAvailable"),
        ({"service": {"type": "ExternalName"}}, "/service/type"),
        ({"secrets": {"smtpPassword": 1234}}, "/secrets/smtpPassword"),
        ({"replicas": 2}, "replicas"),
        ({"serviceMonitor": {"enable": True}}, "enable"),
    ],
)
def test_values_schema_rejects_bad_values(values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(HelmValuesError) as error:
        chart().validate_schema(values)

    assert complaint in str(error.value)
    with pytest.raises(HelmValuesError):
        chart().render(values, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_values_schema_accepts_every_scenario(scenario: str) -> None:
    chart().validate_schema(scenario_values(scenario))


def config_of(manifests: Any) -> dict[str, Any]:
    configmap = next(
        manifest
        for manifest in of_kind(manifests, "ConfigMap")
        if "sidecar.yaml" in manifest["data"]
    )
    config: dict[str, Any] = yaml.safe_load(configmap["data"]["sidecar.yaml"])
    return config


# What a Secret the chart does not create (existingSecret) would hold, for the files the
# rendered configuration refers to.
SECRET_PLACEHOLDERS = {
    "receiver-token": "placeholder-token",
    "smtp-password": "placeholder-password",
    "discord-webhook-url": "https://discord.com/api/webhooks/123456789012345678/placeholder",
}


def mount_secrets(manifests: Any, config_text: str, directory: Path) -> str:
    """Write the files the pod would see under /etc/sidecar-secrets; point the config there."""
    rendered = {
        key: base64.b64decode(value).decode()
        for manifest in manifests
        if manifest.get("kind") == "Secret"
        for key, value in (manifest.get("data") or {}).items()
    }
    directory.mkdir()
    for key in set(re.findall(r"/etc/sidecar-secrets/([A-Za-z0-9_.-]+)", config_text)):
        (directory / key).write_text(rendered.get(key, SECRET_PLACEHOLDERS.get(key, "x")))
    return config_text.replace("/etc/sidecar-secrets/", f"{directory}/")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rendered_config_passes_sidecar_check_config(scenario: str, tmp_path: Path) -> None:
    manifests = render_scenario(scenario)
    path = tmp_path / "sidecar.yaml"
    text = yaml.safe_dump(config_of(manifests))
    path.write_text(mount_secrets(manifests, text, tmp_path / "secrets"))

    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )

    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


def test_check_config_catches_a_bad_key_passed_through_the_chart(tmp_path: Path) -> None:
    # Extra configuration passes through untouched, so the sidecar, not the chart, judges it.
    manifests = render({"config": {"server": {"log_level": "loud"}, "metrics": {"hots": {}}}})
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config_of(manifests)))

    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )

    assert result.returncode == 1
    assert "server.log_level" in result.stderr
    assert "metrics.hots: unknown key" in result.stderr


def test_extra_config_is_passed_through_and_listen_follows_the_http_port() -> None:
    values = {
        "ports": {"http": 9555},
        "config": {"server": {"listen": "127.0.0.1:1", "log_level": "warning"}, "anything": [1]},
    }

    config = config_of(render(values))

    assert config["server"] == {
        "listen": "0.0.0.0:9555",
        "log_level": "warning",
        "log_format": "json",
        "shutdown_delay": "5s",
    }
    assert config["anything"] == [1]


@pytest.mark.parametrize("scenario", ["default-values.yaml", "full-values.yaml"])
def test_ports_and_probes_match_what_the_sidecar_serves(scenario: str) -> None:
    manifests = render_scenario(scenario)
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    container = sidecar_container(pod)
    service = one(manifests, "Service")

    ports = {port["name"]: port for port in container["ports"]}
    assert (ports["http"]["containerPort"], ports["http"]["protocol"]) == (9464, "TCP")
    assert (ports["otlp"]["containerPort"], ports["otlp"]["protocol"]) == (4318, "TCP")
    assert (ports["statsd"]["containerPort"], ports["statsd"]["protocol"]) == (8125, "UDP")
    listen_port = int(config_of(manifests)["server"]["listen"].rpartition(":")[2])
    assert listen_port == ports["http"]["containerPort"]
    service_ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert service_ports["http"]["targetPort"] == "http"
    assert service_ports["statsd"]["protocol"] == "UDP"
    assert service_ports["otlp"]["port"] == 4318

    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["httpGet"]["port"] == "http"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30
    assert container["args"] == ["run", "--config", "/etc/sidecar/sidecar.yaml"]


def test_service_can_leave_out_the_ingest_ports() -> None:
    service = one(render_scenario("existing-secret-values.yaml"), "Service")

    assert [port["name"] for port in service["spec"]["ports"]] == ["http"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pod_is_hardened_with_a_writable_data_volume(scenario: str) -> None:
    manifests = render_scenario(scenario)
    pod = pod_spec_of(manifests, scenario)
    container = sidecar_container(pod)

    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    data = mounts[container["workingDir"]]
    assert not data.get("readOnly")
    assert "emptyDir" in volumes[data["name"]] or "persistentVolumeClaim" in volumes[data["name"]]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert mounts["/etc/sidecar"]["readOnly"] is True


def pod_spec_of(manifests: Any, scenario: str) -> dict[str, Any]:
    if scenario == "sidecar-mode-values.yaml":
        manifests = render_example()
    spec: dict[str, Any] = one(manifests, "Deployment")["spec"]["template"]["spec"]
    return spec


def test_secrets_from_values_are_mounted_as_files() -> None:
    manifests = render_scenario("full-values.yaml")
    secret = one(manifests, "Secret")
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]

    decoded = {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
    assert decoded == {
        "discord-webhook-url": "https://discord.example/api/webhooks/1/token",
        "smtp-password": "smtp-secret",
        "receiver-token": "receiver-secret",
    }
    volume = next(volume for volume in pod["volumes"] if "secret" in volume)
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    mounts = {mount["name"]: mount for mount in sidecar_container(pod)["volumeMounts"]}
    assert mounts[volume["name"]]["mountPath"] == "/etc/sidecar-secrets"
    assert "smtp-secret" not in json.dumps(pod)


def test_an_existing_secret_is_mounted_and_none_is_created() -> None:
    manifests = render_scenario("existing-secret-values.yaml")
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]

    assert of_kind(manifests, "Secret") == []
    names = [volume["secret"]["secretName"] for volume in pod["volumes"] if "secret" in volume]
    assert names == ["sidecar-credentials"]
    claims = [volume for volume in pod["volumes"] if "persistentVolumeClaim" in volume]
    assert claims[0]["persistentVolumeClaim"]["claimName"] == "sidecar-outbox"


def test_default_scenario_renders_no_optional_resource() -> None:
    kinds = sorted(manifest["kind"] for manifest in render_scenario("default-values.yaml"))

    assert kinds == ["ConfigMap", "Deployment", "Service", "ServiceAccount"]


def test_service_monitor_scrapes_the_service_http_port() -> None:
    manifests = render_scenario("full-values.yaml")
    monitor = one(manifests, "ServiceMonitor")
    service = one(manifests, "Service")

    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


def test_prometheus_rule_carries_the_shipped_rules(tmp_path: Path) -> None:
    rule = one(render_scenario("full-values.yaml"), "PrometheusRule")
    shipped = yaml.safe_load((ALERT_RULES / "sidecar.rules.yaml").read_text())
    url = "https://git.example/ops/sidecar/blob/main/docs/runbooks.md"

    path = tmp_path / "from-chart.rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    result = subprocess.run(
        [require_tool("promtool"), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert [group["name"] for group in rule["spec"]["groups"]] == [
        group["name"] for group in shipped["groups"]
    ]
    chart_alerts = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    shipped_alerts = [r for group in shipped["groups"] for r in group["rules"]]
    assert [r["expr"] for r in chart_alerts] == [r["expr"] for r in shipped_alerts]
    assert all(r["annotations"]["runbook_url"].startswith(url + "#") for r in chart_alerts)


def test_chart_copies_of_rules_and_dashboards_are_current() -> None:
    copied = CHART / "files" / "alert_rules" / "sidecar.rules.yaml"

    assert copied.read_text() == (ALERT_RULES / "sidecar.rules.yaml").read_text(), (
        "copy alert_rules/sidecar.rules.yaml to helm/sidecar/files/alert_rules/"
    )
    for dashboard in DASHBOARDS.glob("*.json"):
        assert (CHART / "files" / "dashboards" / dashboard.name).read_bytes() == (
            dashboard.read_bytes()
        )


def test_dashboard_configmaps_are_labelled_for_grafana() -> None:
    maps = [
        manifest
        for manifest in of_kind(render_scenario("full-values.yaml"), "ConfigMap")
        if manifest["metadata"]["labels"].get("grafana_dashboard") == "1"
    ]

    assert len(maps) == len(list(DASHBOARDS.glob("*.json")))
    for configmap in maps:
        ((name, text),) = configmap["data"].items()
        assert json.loads(text) == json.loads((DASHBOARDS / name).read_text())
        assert configmap["metadata"]["annotations"]["grafana_folder"] == "Sidecar"


def test_budget_and_policy_select_the_sidecar_pods() -> None:
    manifests = render_scenario("full-values.yaml")
    pod_labels = one(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    budget = one(manifests, "PodDisruptionBudget")
    policy = one(manifests, "NetworkPolicy")

    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert budget["spec"]["minAvailable"] == 1
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    http_rule = policy["spec"]["ingress"][0]
    assert http_rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert http_rule["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }


def test_sidecar_mode_renders_no_deployment_and_selects_the_application() -> None:
    manifests = render_scenario("sidecar-mode-values.yaml")
    application = {"app.kubernetes.io/name": "web"}

    assert of_kind(manifests, "Deployment") == []
    assert of_kind(manifests, "ServiceAccount") == []
    assert one(manifests, "Service")["spec"]["selector"] == application
    assert one(manifests, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == application
    assert one(manifests, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"] == application


@cache
def example_chart(directory: str) -> Chart:
    return Chart.load(directory)


def render_example() -> list[dict[str, Any]]:
    """The example application with the sidecar chart as its dependency."""
    return list(_render_example())


@cache
def _render_example() -> tuple[dict[str, Any], ...]:
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="sidecar-example-"))
    try:
        example = workdir / "app-with-sidecar"
        shutil.copytree(EXAMPLE, example)
        # What `helm dependency build` would do with the file:// repository.
        shutil.copytree(CHART, example / "charts" / "sidecar")
        return tuple(render({}, Chart.load(example)))
    finally:
        shutil.rmtree(workdir)


def test_example_application_carries_the_sidecar_container() -> None:
    manifests = render_example()
    deployment = one(manifests, "Deployment")
    pod = deployment["spec"]["template"]["spec"]

    assert [container["name"] for container in pod["containers"]] == ["web", "sidecar"]
    configmap = one(manifests, "ConfigMap")
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["sidecar-config"]["configMap"]["name"] == configmap["metadata"]["name"]
    service = one(manifests, "Service")
    assert service["spec"]["selector"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    for manifest in manifests:
        kubernetes_validate.validate(manifest, KUBERNETES_VERSIONS[0], strict=True)
    assert config_of(manifests)["metrics"]["process"]["targets"][0]["name"] == "web"


def value_lines(path: Path) -> Iterator[tuple[int, str, str]]:
    """``(number, line, previous non-blank line)`` of every key line of a values file."""
    previous = ""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        if re.match(r"^\s*[\w.-]+:", line):
            yield number, line, previous
        previous = line


@pytest.mark.parametrize("path", [CHART / "values.yaml", EXAMPLE / "values.yaml"])
def test_every_value_has_a_comment_above_it(path: Path) -> None:
    uncommented = []
    list_item_keys = re.compile(r"^\s*-\s")
    for number, line, previous in value_lines(path):
        # Keys inside a list item belong to the item, which the comment above the list explains.
        if list_item_keys.match(previous) or previous.strip().startswith("- "):
            continue
        if not previous.strip().startswith("#"):
            uncommented.append(f"{path.name}:{number}: {line.strip()}")

    assert uncommented == []


def test_readme_documents_every_top_level_value() -> None:
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    missing = [key for key in values if f"`{key}" not in readme]
    assert missing == []
    assert "/livez" in readme
    assert "sidecar.container" in readme
