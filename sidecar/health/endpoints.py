"""The probe endpoints: ``/livez``, ``/readyz``, ``/healthz`` and ``/livez|readyz/<name>``.

Status codes: 200 when the probe passes or warns, 503 when it fails. Kubernetes treats any
code from 200 to 399 as success, so a warning keeps the pod in service; 503 (rather than
kube-apiserver's 500) tells load balancers and humans that the service is unavailable for
now, not broken in its handling of the request.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from sidecar import __version__
from sidecar.health.probes import evaluate, render_json, render_text
from sidecar.health.runner import HealthRunner

if TYPE_CHECKING:
    from sidecar.app import Sidecar

HEALTH_JSON = "application/health+json"
_PROBES = {"livez": "liveness", "readyz": "readiness", "healthz": "all"}
_MAX_EXCLUDES = 64
_NO_STORE = {"Cache-Control": "no-store"}


class ProbeEndpoints:
    """Starlette handlers that answer from the runner's cache."""

    def __init__(self, runner: HealthRunner, *, show_reasons: bool) -> None:
        self.runner = runner
        self.show_reasons = show_reasons

    def routes(self) -> list[Route]:
        routes = [Route(f"/{path}", self.probe, methods=["GET"]) for path in _PROBES]
        routes += [
            Route(f"/{path}/{{name}}", self.probe, methods=["GET"]) for path in ("livez", "readyz")
        ]
        return routes

    async def probe(self, request: Request) -> Response:
        path = request.url.path.strip("/").split("/", 1)[0]
        probe = _PROBES[path]
        name: str | None = request.path_params.get("name")

        wants_json = _wants_json(request)
        if wants_json is None:
            return _text(400, "format must be text or json\n")
        excludes = request.query_params.getlist("exclude")
        if len(excludes) > _MAX_EXCLUDES:
            return _text(400, f"at most {_MAX_EXCLUDES} exclude parameters are accepted\n")
        if name is not None and not any(
            state.spec.name == name for state in self.runner.selected(probe)
        ):
            return _text(404, f"no {probe} check named {name[:64]!r}\n")

        evaluation = evaluate(self.runner, probe, exclude=excludes, only=name)
        code = 503 if evaluation.status == "fail" else 200
        if wants_json:
            document = render_json(
                evaluation,
                service="sidecar",
                version=__version__,
                show_reasons=self.show_reasons,
            )
            body = json.dumps(document, separators=(",", ":"))
            return Response(body, code, media_type=HEALTH_JSON, headers=_NO_STORE)
        label = f"{path}/{name}" if name else path
        verbose = "verbose" in request.query_params
        text = render_text(evaluation, path=label, verbose=verbose, show_reasons=self.show_reasons)
        return _text(code, text)


def _wants_json(request: Request) -> bool | None:
    """True for JSON, False for text, None for an unknown ``?format=``."""
    chosen = request.query_params.get("format")
    if chosen is not None:
        return {"json": True, "text": False}.get(chosen)
    accept = request.headers.get("accept", "")
    return "application/health+json" in accept or "application/json" in accept


def _text(code: int, body: str) -> Response:
    return PlainTextResponse(body, code, headers=_NO_STORE)


def install_health(sidecar: Sidecar) -> HealthRunner:
    """Build the runner from ``sidecar.config.health`` and add its component, routes and links."""
    from sidecar.app import Link

    config = sidecar.config.health
    runner = HealthRunner(config, sidecar.registry, draining=lambda: sidecar.lifecycle.draining)
    sidecar.components.append(runner)
    sidecar.routes.extend(ProbeEndpoints(runner, show_reasons=config.show_reasons).routes())
    sidecar.links.extend(
        [
            Link("/livez", "Liveness probe (the sidecar itself)"),
            Link("/readyz", "Readiness probe (dependencies; fails while shutting down)"),
            Link("/healthz", "Every health check"),
        ]
    )
    return runner
