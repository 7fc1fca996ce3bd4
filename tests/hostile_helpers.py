"""Assertions shared by the hostile-input tests: one line, the exit code, nothing left behind."""
from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

__all__ = ["assert_refused", "invoke", "leftovers"]


def invoke(command, *args: object):
    return CliRunner().invoke(command, [str(a) for a in args])


def leftovers(folder: Path) -> list[Path]:
    """Hidden temporary files or folders of ours under ``folder``."""
    return [p for p in Path(folder).rglob(".effdet-*")]


def assert_refused(result, code: int, *fragments: str, out: Path | None = None) -> str:
    """The command failed with ``code`` and one ``Error:`` line naming ``fragments``; no
    traceback, no output file, no temp beside it."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    if out is not None:
        assert not out.exists()
        assert leftovers(out.parent) == []
    return lines[0]
