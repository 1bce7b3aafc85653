"""Probe evaluation and the two response formats: kube-apiserver text and health+json.

Evaluation reads only the runner's cache, so a probe costs the same however slow the checks
are. The overall status is the worst of the included checks: a failing critical check fails
the probe, a warning or a failing non-critical check makes it ``warn``. Readiness also fails
while the sidecar drains after SIGTERM, shown as the pseudo-check ``shutdown``.

Text follows kube-apiserver: ``ok`` when passing; one ``[+]name ok`` / ``[-]name failed:
reason`` line per check with ``?verbose`` or on failure, then ``<probe> check passed|failed``.
JSON follows the IETF draft "Health Check Response Format for HTTP APIs"
(draft-inadarei-api-health-check): ``status``, ``checks`` keyed ``name:measurement``, each an
array of objects with ``status``, ``observedValue``, ``observedUnit``, ``time``, ``output``
(omitted on pass, as the draft asks) and ``componentType``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sidecar.health.checks import Status

if TYPE_CHECKING:
    from sidecar.health.runner import CheckState, HealthRunner

WITHHELD = "reason withheld"
SHUTDOWN = "shutdown"
_RANK = {"pass": 0, "warn": 1, "fail": 2}


@dataclass(frozen=True)
class Entry:
    """One check as a probe sees it."""

    name: str
    status: Status
    reason: str
    state: CheckState | None = None
    excluded: bool = False


@dataclass
class Evaluation:
    """A probe's verdict and the entries that led to it."""

    probe: str
    status: Status
    entries: list[Entry]
    unmatched_excludes: list[str] = field(default_factory=list)


def evaluate(
    runner: HealthRunner,
    probe: str,
    *,
    exclude: Iterable[str] = (),
    only: str | None = None,
    now: float | None = None,
) -> Evaluation:
    """Evaluate ``probe`` (``liveness``, ``readiness``, ``all``) from the cache.

    ``only`` limits it to one check (the caller has checked that it belongs to the probe).
    """
    now = time.monotonic() if now is None else now
    excluded = set(exclude)
    entries = []
    if probe == "readiness" and only is None:
        draining = runner.draining()
        entries.append(
            Entry(
                SHUTDOWN,
                "fail" if draining else "pass",
                "the sidecar is shutting down" if draining else "",
                excluded=SHUTDOWN in excluded,
            )
        )
    for state in runner.selected(probe):
        name = state.spec.name
        if only is not None and name != only:
            continue
        status, reason = state.effective(now, probe)
        entries.append(Entry(name, status, reason, state, excluded=name in excluded))

    known = {entry.name for entry in entries}
    overall: Status = "pass"
    for entry in entries:
        if not entry.excluded and _RANK[entry.status] > _RANK[overall]:
            overall = entry.status
    unmatched = sorted(excluded - known)
    return Evaluation(probe, overall, entries, unmatched)


def render_text(evaluation: Evaluation, *, path: str, verbose: bool, show_reasons: bool) -> str:
    """The kube-apiserver style body."""
    if evaluation.status != "fail" and not verbose:
        return "ok"
    lines = []
    for entry in evaluation.entries:
        if entry.excluded:
            lines.append(f"[+]{entry.name} excluded: ok")
        elif entry.status == "pass":
            lines.append(f"[+]{entry.name} ok")
        else:
            reason = entry.reason if show_reasons or entry.name == SHUTDOWN else WITHHELD
            word = "failed" if entry.status == "fail" else "warn"
            # A warning does not fail the probe, so it is listed with the passing sign.
            sign = "-" if entry.status == "fail" else "+"
            lines.append(f"[{sign}]{entry.name} {word}: {reason or WITHHELD}")
    if evaluation.unmatched_excludes:
        names = ", ".join(f'"{name}"' for name in evaluation.unmatched_excludes)
        lines.append(f"warn: some health checks cannot be excluded: no matches for {names}")
    outcome = "failed" if evaluation.status == "fail" else "passed"
    lines.append(f"{path} check {outcome}")
    return "\n".join(lines) + "\n"


def render_json(
    evaluation: Evaluation, *, service: str, version: str, show_reasons: bool
) -> dict[str, Any]:
    """The ``application/health+json`` document."""
    checks: dict[str, list[dict[str, Any]]] = {}
    notes = []
    for entry in evaluation.entries:
        if entry.excluded:
            notes.append(f"{entry.name} excluded")
            continue
        item: dict[str, Any] = {"status": entry.status}
        if entry.state is None:
            key = f"{entry.name}:draining"
            item["componentType"] = "system"
            item["observedValue"] = entry.status == "fail"
        else:
            measurement = entry.state.measurement
            key = f"{entry.name}:{measurement.name}"
            item["componentId"] = entry.name
            item["componentType"] = measurement.component_type
            last = entry.state.last
            if last is not None:
                if last.value is not None:
                    item["observedValue"] = round(last.value, 6)
                    item["observedUnit"] = measurement.unit
                item["time"] = _rfc3339(last.wall_time)
        if entry.status != "pass":
            shown = show_reasons or entry.state is None
            item["output"] = (entry.reason or WITHHELD) if shown else WITHHELD
        checks[key] = [item]
    document: dict[str, Any] = {
        "status": evaluation.status,
        "version": "1",
        "releaseId": version,
        "serviceId": service,
        "description": f"{evaluation.probe} of the sidecar",
        "checks": checks,
    }
    if evaluation.unmatched_excludes:
        notes.append("no matches for " + ", ".join(evaluation.unmatched_excludes))
    if notes:
        document["notes"] = notes
    return document


def _rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
