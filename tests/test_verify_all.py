"""`make verify-all` on a hold-out style layout: goldens in holdout/reference/<variant>/ whose
manifest, synth_ckpt.py and image live in shared/reference/, found through the paths the
goldens record."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import REFERENCE_DIR
from verify.reference import load_golden
from verify.verify_all import find_cases, main

pytestmark = [pytest.mark.skipif(not (REFERENCE_DIR / "efficientdet-d0" / "golden.json").is_file(),
                                 reason=f"no d0 golden under {REFERENCE_DIR}")]


@pytest.fixture()
def holdout(tmp_path):
    shared = tmp_path / "shared" / "reference"
    (shared / "efficientdet-d0").mkdir(parents=True)
    for name in ("synth_ckpt.py", "img1.jpg"):
        (shared / name).symlink_to(REFERENCE_DIR / name)
    (shared / "efficientdet-d0" / "manifest.json").symlink_to(
        REFERENCE_DIR / "efficientdet-d0" / "manifest.json")
    good = tmp_path / "holdout" / "reference" / "efficientdet-d0"
    good.mkdir(parents=True)
    golden = json.loads((REFERENCE_DIR / "efficientdet-d0" / "golden.json").read_text())
    golden["manifest"] = "shared/reference/efficientdet-d0/manifest.json"
    (good / "golden.json").write_text(json.dumps(golden))
    (good / "golden.npz").symlink_to(REFERENCE_DIR / "efficientdet-d0" / "golden.npz")
    # The same golden claiming another seed: the checkpoint written for it differs.
    bad = good.parent / "efficientdet-d0-wrong-seed"
    bad.mkdir()
    (bad / "golden.json").write_text(json.dumps({**golden, "seed": 7}))
    (bad / "golden.npz").symlink_to(REFERENCE_DIR / "efficientdet-d0" / "golden.npz")
    return good.parent


def test_cases_resolve_manifest_and_image_through_recorded_paths(holdout):
    cases = find_cases(holdout, [])
    assert [c.name for c in cases] == ["efficientdet-d0", "efficientdet-d0-wrong-seed"]
    assert cases[0].manifest.resolve() == (REFERENCE_DIR / "efficientdet-d0" / "manifest.json").resolve()
    assert (cases[0].seed, cases[1].seed) == (0, 7)
    assert load_golden(holdout / "efficientdet-d0").image_file.name == "img1.jpg"


@pytest.mark.needs_tf
@pytest.mark.slow
def test_verify_all_passes_the_good_golden_and_fails_the_wrong_seed(holdout, tmp_path):
    result = CliRunner().invoke(main, ["--ref", str(holdout), "--work-dir", str(tmp_path / "w")])
    assert result.exit_code == 1, result.output
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:-1]}
    assert "48/48" in rows["efficientdet-d0"] and "FAIL" not in rows["efficientdet-d0"]
    assert "FAIL at backbone/stem" in rows["efficientdet-d0-wrong-seed"]
    assert result.stdout.splitlines()[-1] == "1/2 passed; failed: efficientdet-d0-wrong-seed"


def _fake_steps(monkeypatch, parity_code: int, writes_report: bool, ok: bool = True):
    """Replace the three subprocess steps: synth and convert succeed, parity exits ``parity_code``
    and writes a report (verdict ``ok``) only if ``writes_report``."""
    import subprocess
    from verify import verify_all

    def run(step, **_):
        code = 0
        if "parity" in step:
            code = parity_code
            if writes_report:
                report = step[step.index("--report") + 1]
                Path(report).write_text(json.dumps(
                    {"ok": ok, "taps": [], "detections": [], "first_divergence": None}))
        return subprocess.CompletedProcess(step, code, "", "parity: boom" if code > 1 else "")

    monkeypatch.setattr(verify_all.subprocess, "run", run)


@pytest.mark.parametrize("parity_code, writes_report", [(3, False), (1, False), (0, False)])
def test_a_stale_report_in_a_reused_work_dir_is_not_a_pass(tmp_path, monkeypatch, parity_code,
                                                           writes_report):
    from verify.verify_all import Case, run_case
    case = Case("efficientdet-d0", tmp_path, "golden", tmp_path / "manifest.json", 0, True)
    stale = tmp_path / "work" / "efficientdet-d0" / "parity.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"ok": True, "taps": [], "detections": [],
                                 "first_divergence": None}))
    _fake_steps(monkeypatch, parity_code, writes_report)
    row = run_case(case, tmp_path / "synth_ckpt.py", tmp_path / "work")
    assert not row["ok"] and "error" in row


def test_parity_exit_code_and_report_must_agree(tmp_path, monkeypatch):
    from verify.verify_all import Case, run_case
    case = Case("efficientdet-d0", tmp_path, "golden", tmp_path / "manifest.json", 0, True)
    (tmp_path / "work" / "efficientdet-d0").mkdir(parents=True)
    _fake_steps(monkeypatch, 0, True, ok=True)
    assert run_case(case, tmp_path / "s.py", tmp_path / "work")["ok"]
    _fake_steps(monkeypatch, 1, True, ok=False)
    assert not run_case(case, tmp_path / "s.py", tmp_path / "work")["ok"]
    _fake_steps(monkeypatch, 1, True, ok=True)
    assert "disagrees" in run_case(case, tmp_path / "s.py", tmp_path / "work")["error"]
