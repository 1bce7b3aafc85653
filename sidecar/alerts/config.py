"""Configuration of the alert pipeline: receiver, outbox, routing and dispatcher.

With no configuration at all the receiver listens at ``/alerts`` without authentication (the
main listener defaults to loopback), stores notifications in SQLite under the data directory
and routes everything to one ``log`` destination.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import ByteSize, Discriminator, Field, Tag, field_validator, model_validator

from sidecar.alerts.routing import parse_matcher
from sidecar.fields import Duration, Secret, Section, Size
from sidecar.notify.destinations import Destination
from sidecar.notify.log import LogDestination

NAME = r"^[A-Za-z0-9_.-]{1,64}$"
DEFAULT_RECEIVER = "default"


def default_data_dir() -> Path:
    """``$XDG_STATE_HOME/sidecar``, else ``~/.local/state/sidecar``, else ``./sidecar-data``."""
    state_home = os.environ.get("XDG_STATE_HOME")
    if state_home:
        return Path(state_home) / "sidecar"
    home = os.environ.get("HOME")
    if home:
        return Path(home) / ".local" / "state" / "sidecar"
    return Path("sidecar-data")


class BasicCredentials(Section):
    username: Annotated[str, Field(min_length=1, max_length=256)]
    """User name Alertmanager sends (`basic_auth.username`)."""

    password: Secret
    """Password (also `password_file` or `password_env`)."""


class AuthConfig(Section):
    bearer_tokens: list[Secret] = Field(default_factory=list)
    """Accepted bearer tokens (`authorization.credentials` in Alertmanager's `http_config`).
    Several tokens allow rotation. Each entry may be a string or `{file: ...}`/`{env: ...}`."""

    basic: list[BasicCredentials] = Field(default_factory=list)
    """Accepted user name and password pairs (`basic_auth` in Alertmanager)."""

    @model_validator(mode="after")
    def _something_accepted(self) -> Self:
        if not self.bearer_tokens and not self.basic:
            raise ValueError("set bearer_tokens or basic, or write `auth: none`")
        for token in self.bearer_tokens:
            if not token.reveal():
                raise ValueError("a bearer token must not be empty")
        return self


def _auth_tag(value: object) -> str:
    return "tag:none" if isinstance(value, str) else "tag:credentials"


# Tagged so that errors name `alerts.receiver.auth.basic[0]`, not the union member tried.
Auth = Annotated[
    Annotated[Literal["none"], Tag("tag:none")] | Annotated[AuthConfig, Tag("tag:credentials")],
    Discriminator(_auth_tag),
]


class ReceiverConfig(Section):
    enabled: bool = True
    """Serve the Alertmanager webhook on the main listener."""

    path: Annotated[str, Field(pattern=r"^/[A-Za-z0-9_./-]*$")] = "/alerts"
    """Path of the webhook; `<path>/<receiver>` delivers to that receiver without routing."""

    auth: Auth | None = None
    """`none`, or accepted credentials. Left out, no authentication is required on a loopback
    listener and a non-loopback `server.listen` refuses to start."""

    max_body_size: Size = ByteSize(4 * 1024 * 1024)
    """Largest accepted request body; larger requests get 413."""

    retry_after: Duration = 5.0
    """`Retry-After` sent with a 503 when the outbox cannot take the notification."""


class SqliteConfig(Section):
    path: Path | None = None
    """Database file. Default: `outbox.sqlite3` in `$XDG_STATE_HOME/sidecar`, else
    `~/.local/state/sidecar`, else `./sidecar-data`."""

    batch_size: Annotated[int, Field(ge=1, le=10_000)] = 256
    """Most writes grouped into one transaction (group commit)."""

    def resolved_path(self) -> Path:
        """The database file, with the default applied."""
        return self.path if self.path is not None else default_data_dir() / "outbox.sqlite3"


class RedisOutboxConfig(Section):
    url: Secret = Secret("redis://127.0.0.1:6379/0")
    """Redis URL (may hold a password: also `url_file`, `url_env`)."""

    prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")] = "sidecar:alerts"
    """Prefix of every key and stream name, so that several sidecar deployments share a Redis."""

    consumer: Annotated[str, Field(pattern=NAME)] | None = None
    """Consumer name of this replica in the stream's consumer group (default: host name and
    process id)."""

    timeout: Duration = 2.0
    """Socket timeout of every Redis command; an enqueue that takes longer is answered 503."""


class OutboxConfig(Section):
    backend: Literal["sqlite", "redis"] = "sqlite"
    """`sqlite` (one replica, a file) or `redis` (Redis Streams, shared by replicas)."""

    sqlite: SqliteConfig = SqliteConfig()
    """SQLite backend settings."""

    redis: RedisOutboxConfig = RedisOutboxConfig()
    """Redis backend settings."""

    max_depth: Annotated[int, Field(ge=1)] = 100_000
    """Most undelivered deliveries kept; above it the receiver answers 503 so that Alertmanager
    keeps the notification and retries."""

    dedup_window: Duration = 300.0
    """A notification identical to one accepted this recently is acknowledged, not delivered
    again (Alertmanager HA peers send the same notification on purpose)."""

    lease: Duration = 60.0
    """How long a claimed delivery belongs to one worker; after it, another worker (or replica)
    takes it over. Longer than the slowest notifier attempt."""

    retention: Duration = 3600.0
    """How long delivered entries are kept before they are pruned."""


class DispatcherConfig(Section):
    concurrency: Annotated[int, Field(ge=1, le=256)] = 4
    """Deliveries in flight at once per destination."""

    poll_interval: Duration = 0.5
    """Longest pause between looks at the outbox when nothing woke the dispatcher."""

    backoff_initial: Duration = 1.0
    """Wait before the second attempt; it doubles per attempt, with jitter."""

    backoff_max: Duration = 300.0
    """Longest wait between two attempts."""

    max_attempts: Annotated[int, Field(ge=1)] = 50
    """Attempts before a delivery becomes a dead letter."""

    max_age: Duration = 86400.0
    """Age after acceptance at which an undelivered delivery becomes a dead letter."""

    stop_timeout: Duration = 10.0
    """On shutdown, how long deliveries in flight may finish before they are released."""


class RouteConfig(Section):
    matchers: list[str] = Field(default_factory=list)
    """Label matchers in Alertmanager's syntax, all of which must hold, e.g.
    `severity=~"critical|page"`. Matched against the notification's common labels."""

    receivers: Annotated[list[Annotated[str, Field(pattern=NAME)]], Field(min_length=1)]
    """Receivers that get a matching notification."""

    continue_: bool = Field(default=False, alias="continue")
    """Keep evaluating later routes after this one matched."""

    @field_validator("matchers")
    @classmethod
    def _matchers_parse(cls, value: list[str]) -> list[str]:
        for text in value:
            parse_matcher(text)
        return value


class AlertReceiverConfig(Section):
    name: Annotated[str, Field(pattern=NAME)]
    """Name used by routes and by `<path>/<receiver>`."""

    destinations: list[Annotated[str, Field(pattern=NAME)]]
    """Names of the destinations that get this receiver's notifications."""


def _log_only() -> list[Destination]:
    return [LogDestination(name="log")]


class AlertsConfig(Section):
    """Alertmanager webhook receiver, durable outbox, routing and delivery."""

    receiver: ReceiverConfig = ReceiverConfig()
    """The webhook endpoint."""

    outbox: OutboxConfig = OutboxConfig()
    """Durable storage of accepted notifications until delivered."""

    dispatcher: DispatcherConfig = DispatcherConfig()
    """Delivery workers, retries and dead letters."""

    destinations: list[Destination] = Field(default_factory=_log_only)
    """Where notifications can be delivered, each with a unique `name` and a `kind`."""

    receivers: list[AlertReceiverConfig] = Field(
        default_factory=lambda: [AlertReceiverConfig(name=DEFAULT_RECEIVER, destinations=["log"])]
    )
    """Named lists of destinations."""

    routes: list[RouteConfig] = Field(default_factory=list)
    """Evaluated in order; the first match wins unless it says `continue: true`."""

    default_receiver: Annotated[str, Field(pattern=NAME)] = DEFAULT_RECEIVER
    """Receiver of a notification no route matched."""

    @model_validator(mode="after")
    def _names_resolve(self) -> Self:
        destinations = [destination.name for destination in self.destinations]
        duplicates = {name for name in destinations if destinations.count(name) > 1}
        if duplicates:
            raise ValueError(f"destinations: duplicate names {sorted(duplicates)}")
        receivers = [receiver.name for receiver in self.receivers]
        duplicates = {name for name in receivers if receivers.count(name) > 1}
        if duplicates:
            raise ValueError(f"receivers: duplicate names {sorted(duplicates)}")
        for index, receiver in enumerate(self.receivers):
            for name in receiver.destinations:
                if name not in destinations:
                    raise ValueError(
                        f"receivers[{index}].destinations: no destination named {name!r}"
                    )
        for index, route in enumerate(self.routes):
            for name in route.receivers:
                if name not in receivers:
                    raise ValueError(f"routes[{index}].receivers: no receiver named {name!r}")
        if self.default_receiver not in receivers:
            raise ValueError(f"default_receiver: no receiver named {self.default_receiver!r}")
        return self
