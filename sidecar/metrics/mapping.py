"""StatsD name mapping: glob or regex rules that turn dotted names into metric names and labels.

The rules follow statsd_exporter's mapping semantics: rules are tried in order and the first
match decides; a glob ``*`` matches one or more characters other than ``.``; captures are
referenced as ``$1`` or ``${1}`` in the mapped name and label values; ``drop`` discards the
line. A name that no rule matches is sanitised into a valid Prometheus name. Results are cached
per (name, kind), because the same few names arrive hundreds of thousands of times a second.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from sidecar.metrics.ingest_config import StatsdMapping

_INVALID_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_:]")
_INVALID_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")
_REFERENCE = re.compile(r"\$(?:(\d+)|\{(\d+)\})")
_CACHE_SIZE = 10_000


def sanitize_name(name: str) -> str:
    """Turn any text into a valid metric name: invalid characters become ``_``."""
    name = _INVALID_NAME_CHARS.sub("_", name)
    if not name or name[0].isdigit():
        name = "_" + name
    return name


def sanitize_label(name: str) -> str:
    """Turn any text into a valid label name (``__`` prefixes are Prometheus' own)."""
    name = _INVALID_LABEL_CHARS.sub("_", name)
    if not name or name[0].isdigit():
        name = "_" + name
    if name.startswith("__"):
        name = "_" + name.lstrip("_")
    return name


@dataclass(frozen=True)
class Mapped:
    """What a StatsD name maps to. ``drop`` means discard the line."""

    name: str
    labels: tuple[tuple[str, str], ...] = ()
    help: str | None = None
    ttl: float | None = None
    buckets: tuple[float, ...] | None = None
    drop: bool = False


def _glob_pattern(glob: str) -> re.Pattern[str]:
    parts = [re.escape(part) for part in glob.split("*")]
    return re.compile("([^.]+)".join(parts))


def _expand(template: str, match: re.Match[str]) -> str:
    def replace(reference: re.Match[str]) -> str:
        index = int(reference.group(1) or reference.group(2))
        if index > (match.re.groups or 0):
            return ""
        return match.group(index) or ""

    return _REFERENCE.sub(replace, template)


class Mapper:
    """Applies the configured mapping rules to StatsD names."""

    def __init__(self, rules: Sequence[StatsdMapping]) -> None:
        self._rules = [
            (
                rule,
                re.compile(rule.match) if rule.match_type == "regex" else _glob_pattern(rule.match),
            )
            for rule in rules
        ]
        self._cache: dict[tuple[str, str], Mapped] = {}

    def map(self, name: str, kind: str) -> Mapped:
        """Map a StatsD name of ``kind`` (``counter``, ``gauge`` or ``observer``)."""
        key = (name, kind)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        result = self._map(name, kind)
        if len(self._cache) >= _CACHE_SIZE:
            # Clearing is cheaper than LRU bookkeeping and names rarely exceed the cache.
            self._cache.clear()
        self._cache[key] = result
        return result

    def _map(self, name: str, kind: str) -> Mapped:
        for rule, pattern in self._rules:
            if rule.match_metric_type is not None and rule.match_metric_type != kind:
                continue
            match = pattern.fullmatch(name)
            if match is None:
                continue
            if rule.action == "drop":
                return Mapped(name="", drop=True)
            assert rule.name is not None  # the config validator requires it for `map`
            labels = tuple(
                (label, _expand(value, match)) for label, value in sorted(rule.labels.items())
            )
            return Mapped(
                name=_expand(rule.name, match),
                labels=labels,
                help=rule.help,
                ttl=rule.ttl,
                buckets=tuple(rule.buckets) if rule.buckets is not None else None,
            )
        return Mapped(name=sanitize_name(name))
