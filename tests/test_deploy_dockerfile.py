"""The Dockerfile agrees with the chart that runs its image.

No container engine runs here, so the image is not built; these tests hold the Dockerfile to
what the chart and the package expect (user, ports, working directory, entry point).
"""

from __future__ import annotations

import re
import tomllib

import yaml

from tests.deploy_names import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()
VALUES = yaml.safe_load((REPO / "helm" / "sidecar" / "values.yaml").read_text())


def instructions(keyword: str) -> list[str]:
    return re.findall(rf"^{keyword} (.+)$", DOCKERFILE, flags=re.MULTILINE)


def test_base_image_is_slim_python_311() -> None:
    assert instructions("FROM") == ["python:3.11-slim"]


def test_runs_as_the_non_root_user_the_chart_expects() -> None:
    user = VALUES["securityContext"]["runAsUser"]
    group = VALUES["securityContext"]["runAsGroup"]

    assert instructions("USER") == [f"{user}:{group}"]
    assert user != 0
    assert f"--uid {user}" in DOCKERFILE
    assert VALUES["podSecurityContext"]["fsGroup"] == group


def test_exposes_the_chart_ports() -> None:
    ports = VALUES["ports"]

    assert instructions("EXPOSE") == [f"{ports['http']} {ports['otlp']} {ports['statsd']}/udp"]


def test_working_directory_is_the_chart_data_volume() -> None:
    template = (REPO / "helm" / "sidecar" / "templates" / "_helpers.tpl").read_text()

    (workdir,) = instructions("WORKDIR")
    assert f"workingDir: {workdir}" in template
    assert f"mountPath: {workdir}" in template


def test_entry_point_is_the_console_script_and_the_package_is_installed_from_the_repo() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    assert instructions("ENTRYPOINT") == ['["sidecar"]']
    assert "sidecar" in project["scripts"]
    assert "pip install /src" in DOCKERFILE
    admitted = (REPO / ".dockerignore").read_text().splitlines()
    assert {"!pyproject.toml", "!sidecar/", f"!{project['readme']}"} <= set(admitted)
