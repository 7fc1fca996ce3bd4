"""The model zoo table in README.md, generated from the release registry (``model/registry.py``).

``python -m model.zoo`` prints one Markdown row per variant: input size, parameters (counted on
the meta device, no weights needed), the COCO AP automl publishes for the variant's release (its
split and the post-processing automl's evaluation used then), the APs of the other releases
of the same variant (fixed 640x640, AdvProp), and the parity this project measured against TF.
"""
from __future__ import annotations

import torch

from .config import get_config
from .efficientdet import EfficientDet
from .registry import RELEASES, VARIANTS, Release

HEADER = ("| variant | input (WxH) | parameters | published AP (split, automl eval NMS) "
          "| other releases: AP | measured parity: worst tap / scale (reference) |"
          "\n|---|---|---|---|---|---|")

#: Worst tap error / tap scale of the converted synthetic checkpoint against automl (every tap
#: within 5e-3 and every detection path matched, 2026-12-02, automl @ 6a54c87, TF 2.21): the shared
#: goldens (seed 0, ``make verify-all``) or live TF (seed 1, ``verify parity --tf-ckpt``, img1.jpg).
MEASURED_PARITY: dict[str, tuple[float, str]] = {
    "efficientdet-d0": (4.2e-5, "golden"), "efficientdet-d1": (3.5e-5, "golden"),
    "efficientdet-d2": (8.7e-5, "live TF"), "efficientdet-d3": (2.4e-4, "live TF"),
    "efficientdet-d4": (5.3e-4, "golden"), "efficientdet-d5": (5.9e-4, "live TF"),
    "efficientdet-d6": (7.7e-4, "live TF"), "efficientdet-d7": (9.7e-4, "live TF"),
    "efficientdet-d7x": (1.2e-3, "golden"), "efficientdet-lite0": (9.9e-7, "golden"),
    "efficientdet-lite1": (1.2e-6, "live TF"), "efficientdet-lite2": (1.6e-6, "live TF"),
    "efficientdet-lite3": (1.5e-6, "live TF"), "efficientdet-lite3x": (1.7e-6, "live TF"),
    "efficientdet-lite4": (2.3e-6, "live TF"),
}


def parameter_count(variant: str) -> int:
    """Parameters of the 90-class model (shapes only, built on the meta device)."""
    with torch.device("meta"):
        model = EfficientDet.from_config(variant)
    return sum(p.numel() for p in model.parameters())


def _ap(release: Release) -> str:
    ap = release.ap
    return f"{ap.ap:g} ({ap.split}, `{ap.eval_nms}`)"


def _parity(variant: str) -> str:
    if variant not in MEASURED_PARITY:
        return "not measured"
    worst, reference = MEASURED_PARITY[variant]
    return f"{worst:.1e} ({reference})"


def zoo_rows() -> list[str]:
    """One Markdown table row per variant of ``VARIANTS``, in registry order."""
    rows = []
    for variant in VARIANTS:
        height, width = get_config(variant).image_size
        own = RELEASES.get(variant)
        others = [r for r in RELEASES.values() if r.variant == variant and r.name != variant]
        rows.append(f"| `{variant}` | {width}x{height} | {parameter_count(variant) / 1e6:.2f} M "
                    f"| {_ap(own) if own else '-'} "
                    f"| {', '.join(f'`{r.name}`: {r.ap.ap:g}' for r in others) or '-'} "
                    f"| {_parity(variant)} |")
    return rows


def zoo_table() -> str:
    """The whole Markdown table."""
    return "\n".join([HEADER, *zoo_rows()])


if __name__ == "__main__":
    print(zoo_table())
