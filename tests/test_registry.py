"""model/registry.py: every variant against automl's config in the reference manifests, every
release name against automl's bucket layout, and the config a release records when converted."""
from __future__ import annotations

import dataclasses
import tarfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from converter.cli import main as convert_main
from converter.download import DEFAULT_BASE_URL, KNOWN_SHA256, release_url
from helpers import REFERENCE_DIR, cached_manifest, synth_checkpoint
from model import EfficientDet
from model.config import DetConfig, get_config, parse_image_size, release_config
from model.preprocess import resize_and_pad
from model.registry import BUCKET_URL, RELEASES, VARIANTS
from verify.coco.official import OFFICIAL_AP

MANIFEST_DIRS = sorted(p.parent.name for p in REFERENCE_DIR.glob("*/manifest.json"))
PLAIN_MANIFESTS = [d for d in MANIFEST_DIRS if d in VARIANTS]

# The names automl publishes (efficientdet/README.md, Det-AdvProp.md), typed here independently.
EXPECTED_RELEASES = {
    **{f"efficientdet-d{i}": f"coco2/efficientdet-d{i}.tar.gz" for i in range(8)},
    "efficientdet-d7x": "coco2/efficientdet-d7x.tar.gz",
    **{f"efficientdet-lite{i}": f"coco/efficientdet-lite{i}.tgz" for i in range(5)},
    "efficientdet-lite3x": "coco/efficientdet-lite3x.tgz",
    **{f"efficientdet-d{i}-640": f"coco640/efficientdet-d{i}-640.tar.gz" for i in range(2, 7)},
    **{f"efficientdet-d{i}-advprop": f"advprop/efficientdet-d{i}.tar.gz" for i in range(6)},
}


def _automl_value(name: str, value):
    """automl's config value in DetConfig's form (automl leaves some fields None = default)."""
    if name == "image_size":
        return parse_image_size(value)
    if name == "fpn_name":
        return value or "bifpn"
    if name == "fpn_weight_method":
        return value or "fastattn"
    if isinstance(value, list):
        return tuple(value)
    return value


# --------------------------------------------------------------------------- variants

def test_every_variant_has_a_manifest_and_every_manifest_a_variant():
    variants = {cached_manifest(d)["variant"] for d in MANIFEST_DIRS}
    assert variants == set(VARIANTS)
    assert len(VARIANTS) == 15


@pytest.mark.parametrize("dir_name", PLAIN_MANIFESTS)
def test_release_config_equals_automl_config_of_the_manifest(dir_name):
    """Every DetConfig field automl also has, by name, against automl's full config dict."""
    import json
    automl = json.loads((REFERENCE_DIR / dir_name / "hparams.json").read_text())["automl_config"]
    config = release_config(dir_name)
    assert config == get_config(dir_name)
    compared = 0
    for field in dataclasses.fields(DetConfig):
        if field.name not in automl:
            continue
        ours, theirs = getattr(config, field.name), _automl_value(field.name, automl[field.name])
        if field.name in ("mean_rgb", "stddev_rgb", "aspect_ratios"):
            assert np.asarray(ours, float) == pytest.approx(np.asarray(theirs, float)), field.name
        else:
            assert ours == theirs, field.name
        compared += 1
    assert compared == len(dataclasses.fields(DetConfig))   # every field has an automl twin


# --------------------------------------------------------------------------- releases

def test_release_names_and_archives_are_automl_bucket_layout(monkeypatch):
    monkeypatch.delenv("EFFDET_BASE_URL", raising=False)
    assert {name: r.archive for name, r in RELEASES.items()} == EXPECTED_RELEASES
    for name, archive in EXPECTED_RELEASES.items():
        assert release_url(name) == BUCKET_URL + archive
        assert RELEASES[name].variant in VARIANTS
    assert DEFAULT_BASE_URL == BUCKET_URL


def test_release_configs_record_size_and_normalisation():
    for i in range(2, 7):
        config = release_config(f"efficientdet-d{i}-640")
        assert config.name == f"efficientdet-d{i}" and config.image_size == (640, 640)
        assert config == get_config(f"efficientdet-d{i}", image_size=640)
    for i in range(6):
        config = release_config(f"efficientdet-d{i}-advprop")
        assert (config.mean_rgb, config.stddev_rgb, config.scale_range) == (0.0, 1.0, True)
        assert config.image_size == get_config(f"efficientdet-d{i}").image_size
    assert release_config("efficientdet-lite3x").image_size == (640, 640)
    with pytest.raises(KeyError, match="efficientdet-d6-advprop"):
        release_config("efficientdet-d6-advprop")


def test_published_ap_and_digests_come_from_the_registry():
    assert set(OFFICIAL_AP) == set(RELEASES)
    assert OFFICIAL_AP["efficientdet-lite3x"].ap == 42.64
    assert OFFICIAL_AP["efficientdet-d4-640"].ap == 45.7
    assert OFFICIAL_AP["efficientdet-d3-advprop"].ap == 47.7
    assert OFFICIAL_AP["efficientdet-d0"].ap == 34.3
    assert OFFICIAL_AP["efficientdet-d0-advprop"].checkpoint == \
        BUCKET_URL + "advprop/efficientdet-d0.tar.gz"
    for name, release in RELEASES.items():
        assert release.ap.split.startswith(("val2017", "test-dev2017")), name
        assert release.ap.eval_nms in ("per_class", "pyfunc", "global"), name
    assert set(KNOWN_SHA256) == {BUCKET_URL + "coco2/efficientdet-d0.tar.gz",
                                 BUCKET_URL + "coco2/efficientdet-d1.tar.gz"}
    assert all(len(digest) == 64 for digest in KNOWN_SHA256.values())


def test_scale_range_maps_pixels_and_padding_to_minus_one_one():
    image = np.full((4, 8, 3), 255, np.uint8)
    image[0, 0] = 0
    out, _ = resize_and_pad(image, (8, 8), 0.0, 1.0, scale_range=True)
    assert out[:, 4:].eq(-1.0).all()                        # padding: black, not the mean
    assert out[:, 1:4].eq(1.0).all()
    plain, _ = resize_and_pad(image, (8, 8), 127.5, 127.5)
    assert plain[:, 4:].eq(0.0).all()                       # the difference scale_range makes


# --------------------------------------------------------------------------- convert by name

def _bucket(tmp_path, manifest_dir: str, archive: str):
    """``tmp_path/bucket/<archive>`` holding a synthesised checkpoint; returns its file:// URL."""
    folder = tmp_path / "src" / manifest_dir
    synth_checkpoint(manifest_dir, folder, optimizer=False, prefix_name="model", in_process=True)
    target = tmp_path / "bucket" / archive
    target.parent.mkdir(parents=True)
    with tarfile.open(target, "w:gz", compresslevel=1) as tar:
        tar.add(folder, arcname=manifest_dir)
    return (tmp_path / "bucket").as_uri() + "/"


def _convert(tmp_path, name: str, base: str, *extra: str):
    out = tmp_path / "out.pth"
    result = CliRunner().invoke(convert_main, ["--ckpt", name, "--out", str(out), "-q",
                                               "--cache-dir", str(tmp_path / "cache"),
                                               "--base-url", base, *extra])
    return result, out


class _NetworkInput(Exception):
    def __init__(self, images: torch.Tensor):
        super().__init__("network input")
        self.images = images


def _stop_with_input(_module, args):
    """Forward pre-hook: hand the preprocessed batch out and skip the network."""
    raise _NetworkInput(args[0])


@pytest.mark.needs_tf
def test_advprop_release_records_its_normalisation(tmp_path):
    name = "efficientdet-d0-advprop"
    base = _bucket(tmp_path, "efficientdet-d0", RELEASES[name].archive)
    result, out = _convert(tmp_path, name, base)
    assert result.exit_code == 0, result.output
    model = EfficientDet.from_pretrained(out)
    assert model.metadata["release"] == name
    assert model.config == release_config(name)
    # predict() applies it without being told: a black image and its padding become -1.
    model.register_forward_pre_hook(_stop_with_input)
    with pytest.raises(_NetworkInput) as stopped:
        model.predict(np.zeros((256, 512, 3), np.uint8))
    assert stopped.value.images.min() == -1.0 and stopped.value.images.max() == -1.0


@pytest.mark.needs_tf
def test_release_variant_must_match_the_archive(tmp_path):
    """A d0 checkpoint served as the d2-640 archive is refused (exit 4), nothing written."""
    name = "efficientdet-d2-640"
    base = _bucket(tmp_path, "efficientdet-d0", RELEASES[name].archive)
    result, out = _convert(tmp_path, name, base)
    assert result.exit_code == 4, result.output
    assert "efficientdet-d2" in result.output and not out.exists()


@pytest.mark.needs_tf
@pytest.mark.slow
def test_fixed_640_release_records_its_image_size(tmp_path):
    name = "efficientdet-d2-640"
    base = _bucket(tmp_path, "efficientdet-d2", RELEASES[name].archive)
    result, out = _convert(tmp_path, name, base)
    assert result.exit_code == 0, result.output
    model = EfficientDet.from_pretrained(out)
    assert model.metadata["release"] == name
    assert model.config.image_size == (640, 640) and model.config.name == "efficientdet-d2"
    assert model.anchors.boxes_yxyx.shape[0] == sum(
        ((640 + 2 ** level - 1) // 2 ** level) ** 2 for level in range(3, 8)) * 9


def test_verify_coco_compares_a_release_with_its_own_published_ap(tmp_path):
    """Weights recording an AdvProp release are reported (and compared) as that release, not as
    the variant whose config name they share."""
    from model.weights_io import save_weights
    from verify.coco import load_model

    name = "efficientdet-d0-advprop"
    config = release_config(name)
    state = EfficientDet(config).state_dict()
    for release, expected in ((name, name), (None, "efficientdet-d0")):
        metadata = {"variant": config.name, "config": config.to_dict(),
                    **({"release": release} if release else {})}
        path = save_weights(tmp_path / f"{release}.pth", state, metadata)
        loaded = load_model(path, postprocess="per_class", device="cpu")
        assert loaded.variant == expected
    assert (OFFICIAL_AP[name].ap, OFFICIAL_AP["efficientdet-d0"].ap) == (35.1, 34.3)
