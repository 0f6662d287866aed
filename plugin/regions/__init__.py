"""Where a concept is in an image, and a training loss that learns nothing from there.

    locator = TemplateLocator.from_preset(preset)          # the preset's exemplar images
    concept = locator.masks(images)                        # [n, 1, H, W], 1 where the concept is
    loss = region_loss(pred, target, latent_mask(concept, pred))

``SegmenterLocator`` (CLIPSeg from a local folder, prompted with the preset's names and exemplars) gives the same
masks for data where the concept is not a fixed template.
"""

from concept_exclusion.regions.locate import TemplateLocator
from concept_exclusion.regions.loss import latent_mask, region_loss
from concept_exclusion.regions.segment import SegmenterLocator

__all__ = ["SegmenterLocator", "TemplateLocator", "latent_mask", "region_loss"]
