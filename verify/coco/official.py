"""automl's published COCO AP of every released checkpoint (:data:`OFFICIAL_AP`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from model.registry import BUCKET_URL, RELEASES


@dataclass(frozen=True)
class OfficialAP:
    """One published COCO AP@[.50:.95] of an automl checkpoint (``model.registry.PublishedAP``).

    ``variant`` is the release name (``efficientdet-d0``, ``efficientdet-d0-advprop``, ...);
    ``ap`` is in percent exactly as printed in automl's tables. ``eval_nms`` names the automl
    post-processing (this project's ``postprocess`` names) that automl's COCO evaluation used by
    default at the commit that published the number; automl does not state it next to the table.
    """

    variant: str
    ap: float
    split: str
    checkpoint: str
    eval_nms: str
    published_in: str


#: Release name -> its published AP, from ``model.registry.RELEASES``.
OFFICIAL_AP: Mapping[str, OfficialAP] = {
    name: OfficialAP(name, release.ap.ap, release.ap.split, BUCKET_URL + release.archive,
                     release.ap.eval_nms, release.ap.published_in)
    for name, release in RELEASES.items()
}
