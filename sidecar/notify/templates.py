"""Jinja2 templates for notifications: sandboxed, loaded and checked with the configuration.

A template is written inline in the configuration (``title: "{{ alert.labels.alertname }}"``)
or read from a file (``title_file: templates/title.j2``, relative to the configuration file).
Every template is compiled and rendered once against a sample notification while the file is
loaded, so a syntax error or a failing expression is reported by ``check-config`` with its
field path instead of surfacing at the first alert.

Templates run in Jinja2's immutable sandbox: they can read the payload and call the helpers
below, but not reach Python internals or mutate anything. Three flavours exist:

- ``markdown`` (Discord): every ``{{ value }}`` is escaped for Discord markdown and its mentions
  are disarmed, unless it went through the ``url`` filter;
- ``html`` (email): autoescaped, so alert text can never inject markup;
- ``text`` (email subject and plain part): no escaping.

Helpers available as filters: ``duration`` (seconds or timedelta as ``1h 5m``), ``time``
(UTC text), ``labels`` (``k=v, ...`` with an optional ``exclude`` list), ``clip`` (cut with
an ellipsis) and ``url`` (a link target: kept only if it is http or https); and the function
``since(time)`` (how long before ``now`` a time was).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import GetCoreSchemaHandler, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError, core_schema

from sidecar.alerts.payload import Notification
from sidecar.fields import Section
from sidecar.notify.sample import sample_notification
from sidecar.notify.text import clip, escape_markdown

Flavour = Literal["markdown", "html", "text"]
if TYPE_CHECKING:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_TEMPLATE_SIZE = 256 * 1024


class TrustedUrl(str):
    """A link target that passed the ``url`` filter; the markdown flavour leaves it as is."""

    __slots__ = ()


def safe_url(value: object) -> TrustedUrl:
    text = str(value or "").strip()
    try:
        parts = urlsplit(text)
    except ValueError:
        return TrustedUrl("")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return TrustedUrl("")
    # Characters that would end a markdown link target or an HTML attribute are encoded.
    for char, code in ((" ", "%20"), ("(", "%28"), (")", "%29"), ('"', "%22"), ("<", "%3C")):
        text = text.replace(char, code)
    return TrustedUrl(text.replace(">", "%3E").replace("\n", "").replace("\r", ""))


def format_duration(value: float | timedelta | None) -> str:
    """Write a duration for people: ``3d 4h``, ``1h 5m``, ``42s``."""
    if value is None:
        return ""
    seconds = int(value.total_seconds() if isinstance(value, timedelta) else value)
    if seconds < 60:
        return f"{max(seconds, 0)}s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
        if len(parts) == 2:
            break
    return " ".join(parts)


def format_time(value: datetime | None) -> str:
    """A time as ``2026-12-03 16:05:03 UTC``."""
    if value is None:
        return ""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_labels(labels: Mapping[str, str], exclude: list[str] | None = None) -> str:
    """A label set as ``name=value, name=value`` in name order."""
    skip = set(exclude or ())
    return ", ".join(
        f"{name}={value}" for name, value in sorted(labels.items()) if name not in skip
    )


def _since(context_now: datetime) -> Callable[[datetime | None], str]:
    def since(value: datetime | None) -> str:
        return "" if value is None else format_duration(context_now - value)

    return since


def _finalize_markdown(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, TrustedUrl):
        return str(value)
    return escape_markdown(str(value))


def _environment(flavour: Flavour) -> ImmutableSandboxedEnvironment:
    # Jinja2 is imported when the first template compiles: a sidecar without Discord or email
    # destinations never pays its memory.
    from jinja2 import select_autoescape
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if flavour == "markdown":
        environment = ImmutableSandboxedEnvironment(
            autoescape=False, finalize=_finalize_markdown, keep_trailing_newline=False
        )
    elif flavour == "html":
        environment = ImmutableSandboxedEnvironment(autoescape=select_autoescape(default=True))
    else:
        environment = ImmutableSandboxedEnvironment(autoescape=False)
    environment.filters.update(
        duration=format_duration,
        time=format_time,
        labels=format_labels,
        clip=lambda value, limit=80: clip(str(value), int(limit)),
        url=safe_url,
    )
    return environment


_ENVIRONMENTS: dict[Flavour, ImmutableSandboxedEnvironment] = {}


def environment(flavour: Flavour) -> ImmutableSandboxedEnvironment:
    """The shared sandboxed environment of one flavour (environments are stateless)."""
    if flavour not in _ENVIRONMENTS:
        _ENVIRONMENTS[flavour] = _environment(flavour)
    return _ENVIRONMENTS[flavour]


class TemplateText:
    """The source of one template and where it came from; compiled on first use per flavour."""

    __slots__ = ("_compiled", "origin", "text")

    def __init__(self, text: str, origin: str = "inline") -> None:
        self.text = text
        self.origin = origin
        self._compiled: dict[Flavour, Any] = {}

    def render(self, flavour: Flavour, **context: Any) -> str:
        """Render with the payload ``context``; raises ``jinja2.TemplateError`` on failure."""
        template = self._compiled.get(flavour)
        if template is None:
            template = environment(flavour).from_string(self.text)
            self._compiled[flavour] = template
        now = context.setdefault("now", datetime.now(UTC))
        result = template.render(since=_since(now), **context)
        return str(result)

    def __repr__(self) -> str:
        return f"TemplateText(origin={self.origin!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TemplateText) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source_type: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.with_info_plain_validator_function(
            _load_template,
            serialization=core_schema.plain_serializer_function_ser_schema(lambda t: t.text),
        )


def _load_template(value: object, info: ValidationInfo) -> TemplateText:
    if isinstance(value, TemplateText):
        return value
    if isinstance(value, str):
        if len(value) > MAX_TEMPLATE_SIZE:
            raise PydanticCustomError("template", "template is larger than 256 KiB")
        return TemplateText(value)
    if isinstance(value, Mapping) and set(value) == {"file"}:
        path = Path(str(value["file"]))
        base_dir = (info.context or {}).get("base_dir")
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir) / path
        try:
            if path.stat().st_size > MAX_TEMPLATE_SIZE:
                raise PydanticCustomError(
                    "template", "template file {path} is larger than 256 KiB", {"path": str(path)}
                )
            return TemplateText(path.read_text(encoding="utf-8"), f"file {path}")
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            raise PydanticCustomError(
                "template",
                "cannot read template file {path}: {reason}",
                {"path": str(path), "reason": reason},
            ) from None
    raise PydanticCustomError("template", "must be template text, or set <field>_file to a path")


def default_template(name: str) -> TemplateText:
    """A template shipped with the package (``sidecar/notify/default_templates/NAME``)."""
    text = resources.files("sidecar.notify").joinpath("default_templates", name).read_text("utf-8")
    return TemplateText(text, f"default {name}")


def check_template(template: TemplateText, flavour: Flavour, context: Mapping[str, Any]) -> None:
    """Compile and render once; raise a configuration error naming the template's problem."""
    from jinja2 import TemplateError

    try:
        template.render(flavour, **context)
    except TemplateError as error:
        line = getattr(error, "lineno", None)
        where = f" (line {line})" if line else ""
        raise PydanticCustomError(
            "template",
            "template ({origin}) does not render{where}: {reason}",
            {"origin": template.origin, "where": where, "reason": str(error.message or error)},
        ) from None
    except Exception as error:
        # A template may raise anything from a filter given the wrong type (int("x")).
        raise PydanticCustomError(
            "template",
            "template ({origin}) fails on a sample notification: {kind}: {reason}",
            {"origin": template.origin, "kind": type(error).__name__, "reason": str(error)},
        ) from None


class TemplateSection(Section):
    """Base of the template sections: ``X_file: path`` is accepted for every field ``X``.

    Subclasses list each field's flavour and per-alert or per-notification context in
    ``flavours``; every template set is rendered against a sample notification at load.
    """

    flavours: ClassVar[dict[str, tuple[Flavour, Literal["alert", "notification"]]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _gather_template_files(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name in cls.model_fields:
            key = f"{name}_file"
            if key not in data:
                continue
            if name in data:
                raise PydanticCustomError(
                    "template", "set only one of {name} and {name}_file", {"name": name}
                )
            data[name] = {"file": data.pop(key)}
        return data

    @field_validator("*", mode="after")
    @classmethod
    def _render_sample(cls, template: Any, info: ValidationInfo) -> Any:
        if not isinstance(template, TemplateText) or info.field_name not in cls.flavours:
            return template
        flavour, scope = cls.flavours[info.field_name]
        notification = sample_notification(now=datetime(2026, 1, 1, tzinfo=UTC))
        context: dict[str, Any] = {"notification": notification}
        if scope == "alert":
            context["alert"] = notification.alerts[0]
        context.update(cls.extra_context(notification))
        check_template(template, flavour, context)
        return template

    @classmethod
    def extra_context(cls, notification: Notification) -> dict[str, Any]:
        """Names the notifier adds to the context besides ``notification`` and ``alert``."""
        return {}
