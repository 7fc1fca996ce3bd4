"""Typed exceptions of the converter; each carries the CLI exit code it maps to.

The CLI turns these into ``click.ClickException`` at its edge and exits with
``exit_code``; library code only raises them. Messages are always one line and
say what was found, e.g. ``InputError("no data shard next to /x/model.index")``.
"""

from __future__ import annotations

__all__ = [
    "ConversionError",
    "InputError",
    "VariantError",
    "NonFiniteError",
    "OutputError",
    "DownloadError",
    "MappingError",
]


class ConversionError(Exception):
    """Base class of every error the converter raises on purpose (exit code 1)."""

    exit_code: int = 1

    def __init__(self, message: object) -> None:
        # Collapse newlines and runs of blanks: TF error texts span several lines,
        # and the CLI prints exactly one line per error.
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        """The one-line message."""
        return str(self.args[0]) if self.args else ""


class InputError(ConversionError):
    """The input is missing, truncated, corrupt or not a checkpoint."""

    exit_code = 3


class VariantError(ConversionError):
    """The variant is unknown, ambiguous, or does not match the checkpoint."""

    exit_code = 4


class NonFiniteError(ConversionError):
    """A model tensor holds NaN or Inf values."""

    exit_code = 5


class OutputError(ConversionError):
    """The output exists (and --force was not given) or its folder is missing."""

    exit_code = 6


class DownloadError(ConversionError):
    """A release archive could not be downloaded or verified."""

    exit_code = 7


class MappingError(ConversionError):
    """The TF -> PyTorch name mapping does not cover the checkpoint or the model."""

    exit_code = 1
