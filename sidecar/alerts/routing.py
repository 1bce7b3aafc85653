"""Routing: which receivers, and so which destinations, get a notification.

Matchers follow Alertmanager's syntax (``name="value"``, ``name!=value``, ``name=~"re"``,
``name!~"re"``); regular expressions are anchored at both ends as in Alertmanager. A label
that is absent matches as the empty string, also as in Alertmanager.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from sidecar.alerts.config import AlertsConfig

Operator = Literal["=", "!=", "=~", "!~"]
_MATCHER = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*(.*?)\s*$", re.DOTALL)


@dataclass(frozen=True)
class Matcher:
    """One label condition."""

    name: str
    operator: Operator
    value: str
    pattern: re.Pattern[str] | None = None

    def matches(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.name, "")
        if self.operator == "=":
            return actual == self.value
        if self.operator == "!=":
            return actual != self.value
        assert self.pattern is not None
        found = self.pattern.fullmatch(actual) is not None
        return found if self.operator == "=~" else not found


def parse_matcher(text: str) -> Matcher:
    """Parse ``severity=~"critical|page"``; raise ValueError saying what is wrong."""
    match = _MATCHER.match(text)
    if match is None:
        raise ValueError(
            f"matcher {text!r} must be name=value, name!=value, name=~regex or name!~regex"
        )
    name, operator, raw = match.groups()
    value = raw
    if raw.startswith('"'):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            raise ValueError(f"matcher {text!r}: the quoted value is not closed") from None
        if not isinstance(value, str):  # pragma: no cover - a JSON text starting with " is a str
            raise ValueError(f"matcher {text!r}: the value must be a string")
    pattern = None
    if operator in ("=~", "!~"):
        try:
            pattern = re.compile(value)
        except re.error as error:
            raise ValueError(f"matcher {text!r}: invalid regular expression: {error}") from None
    return Matcher(name, operator, value, pattern)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Route:
    matchers: tuple[Matcher, ...]
    receivers: tuple[str, ...]
    continue_: bool


class Router:
    """Maps a notification's labels (or a receiver named in the URL) to destination names."""

    def __init__(self, config: AlertsConfig) -> None:
        self._routes = [
            Route(
                tuple(parse_matcher(text) for text in route.matchers),
                tuple(route.receivers),
                route.continue_,
            )
            for route in config.routes
        ]
        # Each receiver's destinations once, in order, so that one receiver needs no merging.
        self._receivers = {
            receiver.name: tuple(dict.fromkeys(receiver.destinations))
            for receiver in config.receivers
        }
        self._default = config.default_receiver

    def has_receiver(self, name: str) -> bool:
        return name in self._receivers

    def receivers_for(self, labels: Mapping[str, str]) -> list[str]:
        """The receivers of the routes that match, in order; the default if none matched."""
        chosen: list[str] = []
        for route in self._routes:
            if all(matcher.matches(labels) for matcher in route.matchers):
                chosen.extend(name for name in route.receivers if name not in chosen)
                if not route.continue_:
                    break
        return chosen or [self._default]

    def destinations_for(self, labels: Mapping[str, str], receiver: str | None = None) -> list[str]:
        """Destination names, each once, for a receiver named in the URL or by routing."""
        receivers: Sequence[str] = [receiver] if receiver else self.receivers_for(labels)
        if len(receivers) == 1:
            return list(self._receivers[receivers[0]])
        return list(dict.fromkeys(d for name in receivers for d in self._receivers[name]))
