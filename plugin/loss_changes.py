"""The changes to the training loss a preset may ask for, and the one warning an integration gives for each it
does not make itself (it can only install the projections; the user's loop or trainer owns the loss).

- ``output_preservation`` ([projection]): see ``concept_exclusion.preservation``;
- regions ([exemplars]): nothing is learned where the concept is found in an image (``concept_exclusion.regions``).
"""

from __future__ import annotations

import logging
from typing import Mapping

from concept_exclusion.concept.preset import Preset

log = logging.getLogger(__name__)

REGIONS_REMEDY = {
    "loop": "compute masks with TemplateLocator.from_preset(preset).masks(pixel_values) and the loss with "
            "region_loss(pred, target, latent_mask(masks, pred)) (concept_exclusion.regions; README)",
    "kohya": "write masks with `concept-exclusion masks DATA --preset P --out MASKS`, set conditioning_data_dir = "
             "MASKS in the subset and train with --masked_loss (docs/kohya.md)",
}


def asked(preset: Preset) -> dict[str, str]:
    """{change: what the preset asks} for each loss change the preset asks for."""
    out = {}
    if preset.projection.output_preservation != "none":
        out["output_preservation"] = f"output_preservation={preset.projection.output_preservation!r}"
    if preset.exemplars is not None:
        out["regions"] = f"exemplar regions (region={preset.exemplars.region!r})"
    return out


def warn_unapplied(preset: Preset, integration: str, remedies: Mapping[str, str]) -> None:
    """Warn once per loss change the preset asks for and ``integration`` does not make: what is asked, that only
    the projections apply, and the remedy (``remedies[change]``)."""
    for change, what in asked(preset).items():
        if change in remedies:
            log.warning("the preset asks for %s, a change to the training loss that %s does not make: only the "
                        "projections apply (in the evidence world they alone did not stop the concept from being "
                        "learned); %s", what, integration, remedies[change])
