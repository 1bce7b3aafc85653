"""Field types shared by every configuration section.

Durations are written like Prometheus writes them (``15s``, ``5m``, ``1h30m``, ``250ms``) and held
as float seconds. Byte sizes accept ``4MiB``, ``10MB`` or a plain number of bytes. Secrets come
from the configuration file, a file (``<field>_file``) or an environment variable
(``<field>_env``), are resolved while the file is loaded, and never print their value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    GetCoreSchemaHandler,
    PlainSerializer,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError, core_schema

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(value: object) -> float:
    """Return the seconds a duration string such as ``1h30m`` stands for."""
    if isinstance(value, bool):
        raise PydanticCustomError("duration", "must be a duration such as 15s, 5m or 1h30m")
    if isinstance(value, int | float):
        if value == 0:
            return 0.0
        raise PydanticCustomError(
            "duration",
            "must be a duration with a unit, such as 15s, 5m or 1h30m (got {value})",
            {"value": value},
        )
    if not isinstance(value, str):
        raise PydanticCustomError("duration", "must be a duration such as 15s, 5m or 1h30m")
    text = value.strip()
    if text.startswith("-"):
        raise PydanticCustomError(
            "duration", "must not be negative (got {value})", {"value": value}
        )
    if text == "0":
        return 0.0
    position = 0
    seconds = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position != len(text) or not text:
        raise PydanticCustomError(
            "duration",
            "must be a duration such as 15s, 5m or 1h30m (got {value!r})",
            {"value": value},
        )
    return seconds


def format_duration(seconds: float) -> str:
    """Write seconds back in the shortest duration notation that parses to the same value."""
    if seconds == 0:
        return "0s"
    milliseconds = round(seconds * 1000)
    if milliseconds % 1000:
        return f"{milliseconds}ms"
    whole = milliseconds // 1000
    parts = []
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if whole >= size:
            parts.append(f"{whole // size}{unit}")
            whole %= size
    return "".join(parts)


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
]
"""Seconds, written in the file as ``15s``, ``5m`` or ``1h30m``."""


def _non_negative_size(value: ByteSize) -> ByteSize:
    if value < 0:
        raise PydanticCustomError("size", "must not be negative")
    return value


Size = Annotated[ByteSize, AfterValidator(_non_negative_size)]
"""Bytes, written in the file as ``4MiB``, ``512KiB`` or a plain number."""


def split_host_port(address: str) -> tuple[str, int]:
    """Split ``host:port`` (``[::1]:9464`` for IPv6, ``:9464`` for every interface)."""
    host, separator, port_text = address.rpartition(":")
    if not separator or not port_text.isdigit():
        raise ValueError(f"must be host:port, such as 127.0.0.1:9464 (got {address!r})")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be between 0 and 65535 (got {port})")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets, such as [::1]:9464 (got {address!r})")
    return host or "0.0.0.0", port


def is_loopback_host(host: str) -> bool:
    """Tell whether a listen host only accepts connections from this machine."""
    return host == "localhost" or host.startswith("127.") or host == "::1"


def _check_listen(value: str) -> str:
    split_host_port(value)
    return value


ListenAddress = Annotated[str, AfterValidator(_check_listen)]
"""A ``host:port`` to listen on."""


class Secret:
    """A secret value that never shows itself in ``repr``, ``str`` or a log line."""

    __slots__ = ("_source", "_value")

    def __init__(self, value: str, source: str = "inline") -> None:
        self._value = value
        self._source = source

    def reveal(self) -> str:
        """Return the secret itself, for the one place that must send it."""
        return self._value

    @property
    def source(self) -> str:
        """Where the value came from (``inline``, ``file /path`` or ``env NAME``), for messages."""
        return self._source

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source_type: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.with_info_plain_validator_function(
            _resolve_secret,
            serialization=core_schema.plain_serializer_function_ser_schema(lambda _: "********"),
        )


def _resolve_secret(value: object, info: ValidationInfo) -> Secret:
    if isinstance(value, Secret):
        return value
    if isinstance(value, str):
        return Secret(value)
    if not isinstance(value, Mapping) or len(value) != 1:
        raise PydanticCustomError(
            "secret", "must be a string, or set <field>_file or <field>_env instead"
        )
    context = info.context or {}
    if "env" in value:
        environ: Mapping[str, str] = context.get("environ", os.environ)
        name = str(value["env"])
        if name not in environ:
            raise PydanticCustomError(
                "secret", "environment variable {name} is not set", {"name": name}
            )
        return Secret(environ[name], f"env {name}")
    if "file" in value:
        path = Path(str(value["file"]))
        base_dir = context.get("base_dir")
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir) / path
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            raise PydanticCustomError(
                "secret",
                "cannot read secret file {path}: {reason}",
                {"path": str(path), "reason": reason},
            ) from None
        # Files written by editors and Kubernetes Secrets often end with one newline.
        return Secret(text.removesuffix("\n").removesuffix("\r"), f"file {path}")
    raise PydanticCustomError("secret", "must be a string, or set <field>_file or <field>_env")


class Section(BaseModel):
    """Base of every configuration model: unknown keys are errors, values are immutable.

    A field typed ``Secret`` may also be given as ``<field>_file`` (a path, relative to the
    configuration file) or ``<field>_env`` (the name of an environment variable).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    _secret_fields: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._secret_fields = frozenset(
            name for name, field in cls.model_fields.items() if _mentions_secret(field.annotation)
        )

    @model_validator(mode="before")
    @classmethod
    def _gather_secret_sources(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not cls._secret_fields:
            return data
        data = dict(data)
        for name in cls._secret_fields:
            sources = {
                kind: data.pop(f"{name}_{kind}")
                for kind in ("file", "env")
                if f"{name}_{kind}" in data
            }
            if not sources:
                continue
            if name in data or len(sources) > 1:
                raise PydanticCustomError(
                    "secret", "set only one of {name}, {name}_file and {name}_env", {"name": name}
                )
            data[name] = sources
        return data

    def secrets(self) -> Iterator[Secret]:
        """Yield every secret held by this section and the sections inside it."""
        yield from _secrets_in(self)


def _mentions_secret(annotation: Any) -> bool:
    if annotation is Secret:
        return True
    return any(_mentions_secret(arg) for arg in getattr(annotation, "__args__", ()))


def _secrets_in(value: object) -> Iterator[Secret]:
    if isinstance(value, Secret):
        yield value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _secrets_in(getattr(value, name))
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _secrets_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _secrets_in(item)
