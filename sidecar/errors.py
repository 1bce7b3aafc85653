"""The sidecar's exceptions.

::

    SidecarError
    ├── ConfigError         the configuration file is wrong; lists every problem
    └── StartupError        a resource needed to start is unavailable (port in use, data dir)

Parts add their own subclasses of ``SidecarError`` next to the code that raises them, and
translate library errors (httpx, redis, SMTP) into them where the adapter meets our code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidecar.config import Problem


class SidecarError(Exception):
    """Base of every error the sidecar raises on purpose."""


class ConfigError(SidecarError):
    """The configuration is invalid; ``problems`` names each field that is wrong."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


class StartupError(SidecarError):
    """Something the sidecar needs in order to start is not available."""
