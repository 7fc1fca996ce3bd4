"""`verify coco` under torchrun: sharding, agreement on failure, gathering on rank 0, per-rank resume.

The end-to-end test runs `python -m torch.distributed.run --nproc_per_node 2 -m verify coco` with
gloo on CPU against the one-process run of the same random-weight lite0, on the 4-image dataset
of test_coco_eval.py whose ground truth is replaced by some of the model's own detections (so
that AP is neither 0 nor 1 and any row that differs moves it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_coco_eval import GROUND_TRUTH, Dataset, dataset  # noqa: F401 - dataset is a fixture

from verify import coco as coco_lib
from verify.cli import main
from verify.coco.distributed import (
    DistributedSetupError,
    RankFailure,
    RankGroup,
    RanksFailed,
    shard,
)
from verify.coco.inference import partial_paths_of_other_runs

pytestmark = pytest.mark.needs_coco

REPO = Path(__file__).resolve().parents[1]
SORTED_IDS = sorted(GROUND_TRUTH)  # [7, 42, 139, 285]: rank 0 gets [7, 139], rank 1 [42, 285]


# ---------------------------------------------------------------------------------------------
# the helpers, without processes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("count,world_size", [(0, 2), (1, 3), (10, 3), (12, 4), (5, 8)])
def test_shards_are_disjoint_complete_balanced_and_deterministic(count, world_size):
    items = list(range(100, 100 + count))
    shards = [shard(items, rank, world_size) for rank in range(world_size)]
    assert sorted(i for s in shards for i in s) == items
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shards == [shard(items, rank, world_size) for rank in range(world_size)]
    assert shard(items, 0, 1) == items
    with pytest.raises(ValueError, match="outside"):
        shard(items, world_size, world_size)


def test_rank_group_from_env():
    assert RankGroup.from_env({}) == RankGroup()
    assert not RankGroup.from_env({}).is_distributed
    assert RankGroup.from_env({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) == RankGroup()
    group = RankGroup.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (group.rank, group.world_size, group.local_rank) == (3, 4, 1)
    assert group.is_distributed and not group.is_root
    for env, message in [({"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK is not"),
                         ({"WORLD_SIZE": "2", "RANK": "0"}, "LOCAL_RANK is not"),
                         ({"WORLD_SIZE": "two", "RANK": "0", "LOCAL_RANK": "0"}, "not an integer"),
                         ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "outside")]:
        with pytest.raises(DistributedSetupError, match=message):
            RankGroup.from_env(env)


def test_single_process_agreement_returns_work_and_reraises_the_error():
    group = RankGroup()
    assert group.agree(work=3) == 3
    with pytest.raises(KeyError, match="boom"):
        group.agree(KeyError("boom"))
    with pytest.raises(ZeroDivisionError), group.agreed():
        1 / 0  # noqa: B018
    assert group.exchange("x") == ["x"] and group.gather_to_root("x") == ["x"]


def test_ranks_failed_reports_the_first_failing_rank():
    error = RanksFailed([RankFailure(1, 3, "cannot read image a.png"), RankFailure(3, 130, "x")], 4)
    assert error.exit_code == 3
    assert str(error) == "rank 1 of 4: cannot read image a.png (1 other rank(s) failed too)"


def test_partial_files_of_other_world_sizes_are_found(tmp_path):
    results = tmp_path / "r.json"
    names = ["r.json.partial.jsonl", "r.json.rank0-of-2.partial.jsonl",
             "r.json.rank1-of-2.partial.jsonl", "r.json.rank0-of-3.partial.jsonl",
             "rr.json.partial.jsonl", "r.json.rank0-of-2.partial.jsonl.tmp"]
    for name in names:
        (tmp_path / name).write_text("")
    found = {p.name for p in partial_paths_of_other_runs(results, 2)}
    assert found == {"r.json.partial.jsonl", "r.json.rank0-of-3.partial.jsonl"}
    assert coco_lib.partial_path_for(results, 1, 2).name == "r.json.rank1-of-2.partial.jsonl"
    assert {p.name for p in partial_paths_of_other_runs(results, 1)} == {
        "r.json.rank0-of-2.partial.jsonl", "r.json.rank1-of-2.partial.jsonl",
        "r.json.rank0-of-3.partial.jsonl"}


def test_cli_rejects_a_half_set_launcher_environment(dataset, monkeypatch):  # noqa: F811
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    result = CliRunner().invoke(main, [
        "coco", "--weights", str(dataset.root / "w.pth"), "--images", str(dataset.images),
        "--annotations", str(dataset.annotations), "--results", str(dataset.root / "r.json")])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("Error: WORLD_SIZE is set but RANK is not")


# ---------------------------------------------------------------------------------------------
# two gloo processes against one
# ---------------------------------------------------------------------------------------------

def _model_derived_dataset(dataset: Dataset) -> Path:  # noqa: F811
    """Random-weight lite0 weights; the annotations become each image's 2 best detections moved
    right by a fifth of their width (IoU 2/3: matched at IoU thresholds .50 to .65 only), with all
    90 category ids listed, so that the model scores an AP far from 0 and 1."""
    from model import EfficientDet
    from model.weights_io import save_weights

    torch.manual_seed(0)
    model = EfficientDet.from_config("efficientdet-lite0").eval()
    weights = save_weights(dataset.root / "lite0.pth", model.state_dict(),
                           {"config": model.config.to_dict()})
    data = json.loads(dataset.annotations.read_text())
    images = {image["id"]: image for image in data["images"]}
    with torch.inference_mode():
        dets = model.predict([coco_lib.load_image(dataset.images / images[i]["file_name"])
                              for i in SORTED_IDS], postprocess="per_class")
    rows = coco_lib.detections_to_results(dets, SORTED_IDS)
    data["annotations"] = [
        {"id": n, "image_id": image_id, "category_id": c, "bbox": [x + w / 5, y, w, h], "area": w * h,
         "iscrowd": 0}
        for n, (image_id, (c, x, y, w, h, _)) in enumerate(
            ((i, row) for i, per_image in zip(SORTED_IDS, rows) for row in per_image[:2]), start=1)]
    data["categories"] = [{"id": i, "name": str(i)} for i in range(1, 91)]
    dataset.annotations.write_text(json.dumps(data))
    return weights


def _torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
         "-m", "verify", "coco", *args], env=env, capture_output=True, text=True, timeout=300)


def _sorted_rows(path: Path) -> list[dict]:
    return sorted(json.loads(path.read_text()),
                  key=lambda d: (d["image_id"], -d["score"], d["category_id"], d["bbox"]))


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error: ")]


@pytest.mark.slow
def test_two_processes_give_the_one_process_results_and_resume_per_rank(dataset, single_thread):  # noqa: F811
    weights = _model_derived_dataset(dataset)

    def args(results: Path) -> list[str]:
        return ["--weights", str(weights), "--images", str(dataset.images), "--annotations",
                str(dataset.annotations), "--results", str(results), "--batch-size", "1",
                "--device", "cpu", "--json"]

    one = dataset.root / "one.json"
    result = CliRunner().invoke(main, ["coco", *args(one), "--quiet"])
    assert result.exit_code == 0, result.output
    reference = json.loads(result.stdout)
    assert 0.05 < reference["metrics"]["AP"] < 0.95

    # rank 1's second image is unreadable: rank 1 fails at step 2, rank 0 stops with it (no
    # hang), rank 0 alone prints the one error line, every rank keeps its finished images
    bad = dataset.images / f"{285:012d}.png"
    good = bad.read_bytes()
    bad.write_bytes(b"not a png")
    two = dataset.root / "two.json"
    failed = _torchrun(2, args(two))
    assert failed.returncode != 0 and failed.stdout == ""
    assert len(_error_lines(failed.stderr)) == 1, failed.stderr
    assert _error_lines(failed.stderr)[0].startswith("Error: rank 1 of 2: cannot read image")
    workers_stderr = failed.stderr.split("torch/distributed/elastic")[0]  # then torchrun's summary
    assert "Traceback" not in workers_stderr and "cannot read image" in workers_stderr
    partials = [coco_lib.partial_path_for(two, rank, 2) for rank in range(2)]
    assert [len(p.read_text().splitlines()) - 1 for p in partials] == [2, 1]  # [7, 139], [42]
    assert not two.exists()
    saved = dataset.root / "saved"
    saved.mkdir()
    for path in partials:
        shutil.copy(path, saved)

    # the same command with the same world size resumes each rank from its own file
    bad.write_bytes(good)
    resumed = _torchrun(2, args(two))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming: 3 image(s) already done" in resumed.stderr
    assert json.loads(resumed.stdout)["metrics"] == reference["metrics"]
    assert _sorted_rows(two) == _sorted_rows(one)
    assert not any(p.exists() for p in partials)

    # one process picks up what the 2-rank run left
    for path in partials:
        shutil.copy(saved / path.name, path)
    again = CliRunner().invoke(main, ["coco", *args(two)])
    assert again.exit_code == 0, again.output
    assert "resuming: 3 image(s) already done" in again.stderr
    assert json.loads(again.stdout)["metrics"] == reference["metrics"]
    assert _sorted_rows(two) == _sorted_rows(one)
    assert not any(p.exists() for p in partials)
