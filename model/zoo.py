"""The model zoo table in README.md, generated from the release registry (``model/registry.py``).

``python -m model.zoo`` prints one Markdown row per variant: input size, parameters (counted on
the meta device, no weights needed), the COCO AP automl publishes for the variant's release (its
split and the post-processing automl's evaluation used then), and the APs of the other releases
of the same variant (fixed 640x640, AdvProp).
"""
from __future__ import annotations

import torch

from .config import get_config
from .efficientdet import EfficientDet
from .registry import RELEASES, VARIANTS, Release

HEADER = ("| variant | input (WxH) | parameters | published AP (split, automl eval NMS) "
          "| other releases: AP |\n|---|---|---|---|---|")


def parameter_count(variant: str) -> int:
    """Parameters of the 90-class model (shapes only, built on the meta device)."""
    with torch.device("meta"):
        model = EfficientDet.from_config(variant)
    return sum(p.numel() for p in model.parameters())


def _ap(release: Release) -> str:
    ap = release.ap
    return f"{ap.ap:g} ({ap.split}, `{ap.eval_nms}`)"


def zoo_rows() -> list[str]:
    """One Markdown table row per variant of ``VARIANTS``, in registry order."""
    rows = []
    for variant in VARIANTS:
        height, width = get_config(variant).image_size
        own = RELEASES.get(variant)
        others = [r for r in RELEASES.values() if r.variant == variant and r.name != variant]
        rows.append(f"| `{variant}` | {width}x{height} | {parameter_count(variant) / 1e6:.2f} M "
                    f"| {_ap(own) if own else '-'} "
                    f"| {', '.join(f'`{r.name}`: {r.ap.ap:g}' for r in others) or '-'} |")
    return rows


def zoo_table() -> str:
    """The whole Markdown table."""
    return "\n".join([HEADER, *zoo_rows()])


if __name__ == "__main__":
    print(zoo_table())
