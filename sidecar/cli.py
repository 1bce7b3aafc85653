"""The ``sidecar`` command line.

Exit codes: 0 success; 1 a check failed (``check-config`` found problems); 2 invalid
configuration or usage; 3 the sidecar could not start (port in use, data directory).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sidecar import __version__
from sidecar.alerts.cli import add_outbox_commands
from sidecar.config import Config, load_config
from sidecar.errors import ConfigError, StartupError
from sidecar.logs import configure_logging
from sidecar.notify.cli import add_notify_commands

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_STARTUP = 3

Command = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description="Observability sidecar: metrics, health probes and alert delivery.",
    )
    parser.add_argument("--version", action="version", version=f"sidecar {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="serve metrics, probes and the alert receiver")
    _add_config_argument(run)
    run.add_argument("--listen", help="HTTP listen address, overrides server.listen")
    run.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="overrides server.log_level",
    )
    run.add_argument("--log-format", choices=["text", "json"], help="overrides server.log_format")
    run.set_defaults(handler=run_command)

    check_config = commands.add_parser(
        "check-config", help="validate a configuration file and list every problem"
    )
    check_config.add_argument("file", type=Path, help="the YAML configuration file")
    check_config.set_defaults(handler=check_config_command)

    add_outbox_commands(commands, _add_config_argument)
    add_notify_commands(commands, _add_config_argument)
    check = commands.add_parser(
        "check", help="run the health checks once, print a table, fail if a critical one fails"
    )
    _add_config_argument(check)
    check.add_argument(
        "--only", action="append", default=[], metavar="NAME", help="run only this check"
    )
    check.set_defaults(handler=check_command)
    return parser


def _add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        help="YAML configuration file (default: $SIDECAR_CONFIG, else embedded defaults)",
    )


def _print_problems(error: ConfigError, source: object) -> None:
    print(f"invalid configuration {source}:", file=sys.stderr)
    for problem in error.problems:
        print(f"  {problem}", file=sys.stderr)


def load_or_report(path: Path | None, overrides: dict[str, Any] | None = None) -> Config | None:
    """Load the configuration, or print its problems to standard error and return None."""
    try:
        return load_config(path, overrides=overrides)
    except ConfigError as error:
        _print_problems(error, path or "(defaults)")
        return None


def run_command(args: argparse.Namespace) -> int:
    overrides = {
        key: value
        for key, value in (
            ("listen", args.listen),
            ("log_level", args.log_level),
            ("log_format", args.log_format),
        )
        if value is not None
    }
    config = load_or_report(args.config, {"server": overrides} if overrides else None)
    if config is None:
        return EXIT_CONFIG
    configure_logging(
        config.server.log_level,
        config.server.log_format,
        secrets=[secret.reveal() for secret in config.secrets()],
    )

    from sidecar.app import Sidecar
    from sidecar.server import serve

    try:
        sidecar = Sidecar(config)
        _run_loop(serve(sidecar))
    except StartupError as error:
        logger.error("%s", error)
        return EXIT_STARTUP
    except ConfigError as error:
        _print_problems(error, args.config or "(defaults)")
        return EXIT_CONFIG
    return EXIT_OK


def _run_loop(main: Any) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def check_config_command(args: argparse.Namespace) -> int:
    from sidecar.alerts.pipeline import check_receiver_auth

    try:
        check_receiver_auth(load_config(args.file))
    except ConfigError as error:
        _print_problems(error, args.file)
        return EXIT_FAILED
    print(f"{args.file}: valid")
    return EXIT_OK


def check_command(args: argparse.Namespace) -> int:
    config = load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    from sidecar.health.report import run_checks_once

    return run_checks_once(config, args.only, sys.stdout)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sidecar`` console script and ``python -m sidecar``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Command = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return EXIT_OK
