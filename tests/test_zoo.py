"""README's model zoo table is the output of ``python -m model.zoo`` (model/zoo.py)."""
from __future__ import annotations

from pathlib import Path

from model.zoo import parameter_count, zoo_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_model_zoo_table_is_generated_from_the_registry():
    assert zoo_table() in README.read_text(encoding="utf-8"), \
        "README's model zoo is stale: paste the output of `python -m model.zoo`"


def test_parameter_count_matches_the_published_d0_size():
    assert round(parameter_count("efficientdet-d0") / 1e6, 1) == 3.9   # EfficientDet paper: 3.9M


def test_every_variant_has_a_measured_parity_within_the_tap_tolerance():
    from model.registry import VARIANTS
    from model.zoo import MEASURED_PARITY
    from verify.parity import TAP_RTOL
    assert set(MEASURED_PARITY) == set(VARIANTS)
    assert all(0 < worst <= TAP_RTOL for worst, _ in MEASURED_PARITY.values())
