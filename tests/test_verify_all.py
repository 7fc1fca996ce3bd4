"""`make verify-all` on a hold-out style layout: goldens in holdout/reference/<variant>/ whose
manifest, synth_ckpt.py and image live in shared/reference/, found through the paths the
goldens record."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from helpers import REFERENCE_DIR
from verify.reference import load_golden
from verify.verify_all import find_cases, main

pytestmark = [pytest.mark.needs_tf, pytest.mark.slow,
              pytest.mark.skipif(not (REFERENCE_DIR / "efficientdet-d0" / "golden.json").is_file(),
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


def test_verify_all_passes_the_good_golden_and_fails_the_wrong_seed(holdout, tmp_path):
    result = CliRunner().invoke(main, ["--ref", str(holdout), "--work-dir", str(tmp_path / "w")])
    assert result.exit_code == 1, result.output
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:-1]}
    assert "47/47" in rows["efficientdet-d0"] and "FAIL" not in rows["efficientdet-d0"]
    assert "FAIL at backbone/stem" in rows["efficientdet-d0-wrong-seed"]
    assert result.stdout.splitlines()[-1] == "1/2 passed; failed: efficientdet-d0-wrong-seed"
