"""Typed training errors; each carries the CLI exit code it maps to (converter's codes)."""
from __future__ import annotations


class TrainError(Exception):
    """A run that cannot go on (exit code 1)."""

    exit_code: int = 1


class TrainInputError(TrainError):
    """Missing or unusable input: annotations, images, weights, a foreign checkpoint."""

    exit_code = 3


class TrainOutputError(TrainError):
    """The output folder cannot be used (missing parent, a checkpoint of another run)."""

    exit_code = 6
