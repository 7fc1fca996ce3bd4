"""``convert --to effdet``: a state_dict rwightman's effdet loads strictly and runs identically.

Without effdet: the exported keys and shapes equal effdet's own (``tests/data/effdet/*.tsv``,
dumped from ``effdet.create_model(...)``, effdet 0.4.1 / timm 1.0.31), and the fusion scalars
keep their order. With effdet installed (``make setup-effdet``): strict load and the same raw
class/box outputs for the same input, for every variant effdet has.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from converter.cli import main
from converter.contents import CheckpointContents
from converter.convert import convert_checkpoint
from converter.errors import MappingError
from converter.to_effdet import effdet_model_name, effdet_state_dict
from helpers import REFERENCE_DIR, synth_tensors
from model import EfficientDet
from model.config import VARIANTS
from model.weights_io import save_weights

pytestmark = pytest.mark.usefixtures("single_thread")

DATA = Path(__file__).parent / "data" / "effdet"
D0, LITE0 = "efficientdet-d0", "efficientdet-lite0"
TOLERANCE = 1e-4         # max abs difference / max abs value, per output tensor


def _synth_model(variant: str) -> EfficientDet:
    """The variant with the reference's synthetic weights (numpy, no TF): activations stay in
    range through the whole network, so a misplaced tensor shows in the outputs."""
    if not (REFERENCE_DIR / variant / "manifest.json").is_file():
        pytest.skip(f"no reference manifest for {variant} under {REFERENCE_DIR}")
    tensors = synth_tensors(variant, seed=0, optimizer=False)
    contents = CheckpointContents(format="tf1", source=Path(variant),
                                  names={k: tuple(v.shape) for k, v in tensors.items()},
                                  _loader=tensors.__getitem__)
    model = EfficientDet.from_config(variant)
    model.load_state_dict(convert_checkpoint(contents, model.config)[0], strict=True)
    return model.eval()


def _effdet_keys(name: str) -> dict[str, tuple[int, ...]]:
    lines = (DATA / f"{name}.tsv").read_text().splitlines()
    rows = (line.split("\t") for line in lines if line and not line.startswith("#"))
    return {key: tuple(int(d) for d in shape.strip("[]").split(",") if d.strip())
            for key, shape in rows}


@pytest.mark.parametrize("variant", [D0, LITE0])
def test_keys_and_shapes_are_effdets(variant):
    model = EfficientDet.from_config(variant)
    exported = effdet_state_dict(model)
    expected = _effdet_keys(effdet_model_name(model.config))
    assert {k: tuple(v.shape) for k, v in exported.items()} == expected


def test_fusion_scalars_become_edge_weights_in_input_order():
    model = _synth_model(D0)
    state = model.state_dict()
    exported = effdet_state_dict(model)
    node = "fpn_cells.cell_1.fnode4"
    expected = torch.stack([state[f"{node}.WSM"], state[f"{node}.WSM_1"], state[f"{node}.WSM_2"]])
    assert torch.equal(exported["fpn.cell.1.fnode.4.combine.edge_weights"], expected)
    assert torch.equal(exported["backbone.blocks.5.2.conv_dw.weight"],      # blocks_13 of b0
                       state["backbone.blocks.13.depthwise_conv2d.weight"])


def test_an_unplaceable_key_is_refused():
    model = EfficientDet.from_config(LITE0)
    model.class_net.register_buffer("extra", torch.zeros(1))
    with pytest.raises(MappingError, match="class_net.extra"):
        effdet_state_dict(model)


def test_cli_writes_a_plain_state_dict_and_refuses_bad_outputs(tmp_path):
    model = EfficientDet.from_config(LITE0)
    weights = tmp_path / "lite0.pth"
    save_weights(weights, model.state_dict(), {"config": model.config.to_dict()})
    runner = CliRunner()
    out = tmp_path / "effdet.pth"
    result = runner.invoke(main, ["--ckpt", str(weights), "--to", "effdet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = torch.load(out, weights_only=True)
    assert written.keys() == _effdet_keys("tf_efficientdet_lite0").keys()
    for args in (["--out", str(out)], ["--out", str(tmp_path / "e.safetensors")],
                 ["--out", str(tmp_path / "e.pth"), "--raw-weights", str(weights)]):
        result = runner.invoke(main, ["--ckpt", str(weights), "--to", "effdet", *args])
        assert result.exit_code in (2, 6) and "Traceback" not in result.output, result.output
    assert not (tmp_path / "e.pth").exists()


# ------------------------------------------------------------------ with effdet installed
def _define_torchvision_ops() -> None:
    """PyPI's torchvision ships kernels built for a CUDA torch; beside a CPU-only torch its
    ``_C`` library does not load and its import stops at registering fakes for the missing
    ``torchvision::nms``/``qnms`` ops. Declaring their schemas lets the pure-Python rest import;
    effdet's model (what is compared here) calls no torchvision op."""
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _define_torchvision_ops.library = library      # keep the registration alive


@pytest.fixture(scope="module")
def effdet():
    if importlib.util.find_spec("effdet") is None:
        pytest.skip("effdet is not installed (make setup-effdet)")
    try:
        return importlib.import_module("effdet")
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
    for name in [n for n in sys.modules if n.split(".")[0] in ("torchvision", "timm", "effdet")]:
        del sys.modules[name]
    _define_torchvision_ops()
    return importlib.import_module("effdet")


def _max_relative_difference(effdet, model: EfficientDet,
                             state_dict: dict[str, torch.Tensor] | None = None) -> float:
    """Loads ``state_dict`` (default: the export of ``model``) into effdet's model strictly and
    returns the largest output difference relative to the output's scale."""
    size = 2 ** model.config.max_level          # the smallest input every level divides
    theirs = effdet.create_model(effdet_model_name(model.config), pretrained=False,
                                 pretrained_backbone=False, image_size=(size, size),
                                 num_classes=model.config.num_classes).eval()
    theirs.load_state_dict(effdet_state_dict(model) if state_dict is None else state_dict,
                           strict=True)
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_cls, ours_box = model(images)
        their_cls, their_box = theirs(images)
    return max(float((a - b).abs().max() / a.abs().max())
               for a, b in zip(ours_cls + ours_box, their_cls + their_box, strict=True))


def _param(variant: str):
    return variant if variant in (D0, LITE0) else pytest.param(variant, marks=pytest.mark.slow)


@pytest.mark.parametrize("variant", [_param(v) for v in VARIANTS])
def test_effdet_loads_strictly_and_gives_the_same_outputs(effdet, variant):
    assert _max_relative_difference(effdet, _synth_model(variant)) <= TOLERANCE


def test_the_comparison_sees_fusion_weights_in_the_wrong_order(effdet):
    model = _synth_model(D0)
    state_dict = effdet_state_dict(model)
    key = "fpn.cell.0.fnode.4.combine.edge_weights"
    state_dict[key] = state_dict[key].flip(0)
    assert _max_relative_difference(effdet, model, state_dict) > 10 * TOLERANCE
