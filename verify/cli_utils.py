"""Helpers shared by the ``verify`` subcommands: exit codes, error conversion, version, logging.

Library code raises typed exceptions; only the CLI edge turns them into ``click.ClickException``
(a one-line ``Error: ...`` on stderr and the exit code below, no traceback).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, NoReturn

import click

EXIT_OK = 0
EXIT_FAILURE = 1        # the check ran and failed (e.g. AP outside tolerance)
EXIT_USAGE = 2          # bad command line (click's own code)
EXIT_INPUT = 3          # missing or corrupt input file
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT

CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"], "show_default": True}
LOGGED_PACKAGES = ("verify", "model", "converter", "mappings")


class CliError(click.ClickException):
    """A ClickException with its own exit code and a message forced onto one line."""

    def __init__(self, message: str, exit_code: int = EXIT_INPUT) -> None:
        super().__init__(" ".join(str(message).split()))
        self.exit_code = exit_code


def fail(message: str, code: int = EXIT_INPUT) -> NoReturn:
    """Stop the command with ``Error: <message>`` on stderr and exit status ``code``."""
    raise CliError(message, code)


@contextlib.contextmanager
def library_errors(*errors: type[BaseException], code: int = EXIT_INPUT) -> Iterator[None]:
    """Turn the given library exception types into :class:`CliError` with ``code``."""
    try:
        yield
    except errors as exc:
        raise CliError(str(exc), code) from exc


def package_version() -> str:
    """This project's version (``model/_version.py``, which setup.cfg reads too)."""
    from model._version import __version__
    return __version__


class _StderrHandler(logging.Handler):
    """Log records to stderr through click (so CliRunner and Windows consoles see them)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(self.format(record), err=True)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class _Formatter(logging.Formatter):
    """Plain message for INFO, ``warning: ...`` / ``error: ...`` above it."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message


def setup_logging(quiet: bool) -> None:
    """Send this project's log records to stderr: INFO and up, or WARNING and up when quiet."""
    level = logging.WARNING if quiet else logging.INFO
    for name in LOGGED_PACKAGES:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
            logger.removeHandler(handler)
        handler = _StderrHandler()
        handler.setFormatter(_Formatter())
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False


DEVICE_HELP = "Torch device: auto (cuda if available, else cpu), cpu, cuda or cuda:N."


def device_option(function: Any) -> Any:
    """The ``--device`` option every command shares (one default: auto)."""
    return click.option("--device", default="auto", show_default=True, metavar="DEVICE",
                        callback=_check_device, help=DEVICE_HELP)(function)


def _check_device(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    name = value.strip().lower()
    kind, _, index = name.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise click.BadParameter(f"{value!r} is not auto, cpu, cuda or cuda:N")
    return name


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is usable, else ``cpu``; other names unchanged."""
    if name != "auto":
        return name
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"
