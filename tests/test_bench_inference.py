"""benchmarks/bench_inference.py runs end to end (a smoke test: figures are not asserted)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_inference.py"


def _bench(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *arguments], capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_bench_times_each_path_in_its_own_process(tmp_path):
    report_path = tmp_path / "bench.json"
    done = _bench("--variants", "efficientdet-d0", "--paths", "eager", "optimized",
                  "--runs", "2", "--warmup", "0", "--threads", "1", "--json", str(report_path))
    assert done.returncode == 0, done.stderr
    report = json.loads(report_path.read_text())
    paths = report["variants"][0]["paths"]
    assert list(paths) == ["eager", "optimized", "preprocess", "postprocess global"]
    for stats in paths.values():
        assert stats["runs"] == 2 and 0 < stats["low_ms"] <= stats["median_ms"] <= stats["high_ms"]
        assert stats["ratio_to_tf"] is None                  # no --automl-dir
    assert "optimized" in done.stdout and "postprocess global" in done.stdout


def test_bench_refuses_an_unknown_variant_in_one_line():
    done = _bench("--variants", "efficientdet-d99", "--paths", "eager", "--runs", "1")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("error: efficientdet-d99")
