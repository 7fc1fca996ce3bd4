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


def verify_coco_on(tmp_path: Path, images: list[dict], annotations: list[dict]):
    """``verify coco`` on a one-file annotation set (placeholder weights, empty image folder);
    returns ``(result, results_path)``: the annotations are refused before weights are read."""
    import json

    from verify.cli import main as verify_main

    annotation_file = tmp_path / "ann.json"
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                           "categories": [{"id": 1}]}))
    (tmp_path / "images").mkdir()
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    results = tmp_path / "r.json"
    result = invoke(verify_main, "coco", "--weights", weights, "--images", tmp_path / "images",
                    "--annotations", annotation_file, "--results", results)
    return result, results
