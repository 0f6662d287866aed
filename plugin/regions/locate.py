"""Finding a concept in training images from exemplar images of it, by normalised cross-correlation.

Invariants: a mask depends only on the image and the exemplars (never on the caption, so images that do not name
the concept are found too); every window whose correlation with an exemplar (each colour channel centred on its
own mean) reaches the threshold, and whose contrast is above ``min_contrast``, is marked in full, then grown by
``dilate`` pixels. It finds the concept at the exemplars' scales (``scales``) and orientation only: a logo drawn
much smaller, larger, rotated or in perspective is not found (say so to users; an open-vocabulary segmenter is the
remedy for such data).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from concept_exclusion.concept.preset import Preset, load_preset
from concept_exclusion.errors import PresetError
from concept_exclusion.regions.exemplars import exemplar_images


class TemplateLocator:
    """Masks of where any of ``templates`` (float [3, h, w] in [-1, 1]) appears in images."""

    def __init__(self, templates: Sequence[torch.Tensor], threshold: float = 0.7, scales: Sequence[float] = (1.0,),
                 dilate: int = 1, min_contrast: float = 0.05) -> None:
        self.threshold, self.dilate, self.min_contrast = float(threshold), int(dilate), float(min_contrast)
        self.templates: list[torch.Tensor] = []
        for i, t in enumerate(templates):
            if t.ndim != 3 or t.shape[0] != 3:
                raise PresetError(f"exemplar {i}: expected an RGB image [3, h, w], got shape {tuple(t.shape)}")
            for s in scales:
                h, w = max(1, round(t.shape[1] * s)), max(1, round(t.shape[2] * s))
                scaled = t if (h, w) == tuple(t.shape[1:]) else F.interpolate(
                    t[None].float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]
                centred = scaled.float() - scaled.float().mean(dim=(1, 2), keepdim=True)
                if centred.norm() / centred.numel() ** 0.5 < min_contrast:
                    raise PresetError(f"exemplar {i} at scale {s:g} is flat (no contrast): nothing to match")
                self.templates.append(centred / centred.norm())
        if not self.templates:
            raise PresetError("no exemplar images to locate the concept with")

    @classmethod
    def from_preset(cls, preset: Preset | str | Path) -> "TemplateLocator":
        """The locator the preset's ``[exemplars]`` table describes (its images read and checked against sha256);
        ``preset`` may be a loaded preset, a ``.toml`` path or a shipped preset's name."""
        preset = preset if isinstance(preset, Preset) else load_preset(preset)
        e = preset.exemplars
        images = exemplar_images(preset)  # refuses a preset without exemplars
        return cls(images, e.threshold, e.scales, e.dilate)

    def correlation(self, images: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
        """[n, H-h+1, W-w+1]: each window's correlation with ``template`` (0 where the window is flatter than
        ``min_contrast``). The window sums come from summed-area tables and the products from an FFT, so the cost
        does not grow with the template's area."""
        x = images.double()
        h, w = template.shape[1:]
        area = h * w
        mean = _box_sum(x, h, w) / area  # [n, 3, H-h+1, W-w+1]
        energy = (_box_sum(x.pow(2), h, w) - area * mean.pow(2)).sum(dim=1).clamp_min(0.0)
        dot = _cross_correlate(x, template.to(x.device, torch.float64))  # the template is centred, so the window's mean drops out
        contrast = (energy / (3 * area)).sqrt()
        corr = dot / energy.sqrt().clamp_min(1e-8)
        return torch.where(contrast >= self.min_contrast, corr, torch.zeros_like(corr)).float()

    @torch.no_grad()
    def masks(self, images: torch.Tensor) -> torch.Tensor:
        """[n, 1, H, W] float masks (1: the concept) of ``images`` [n, 3, H, W] in [-1, 1], on their device (sums
        in float64: summed-area tables of a 1024-pixel image lose the windows' contrast in float32)."""
        check_images(images)
        n, _, height, width = images.shape
        out = torch.zeros(n, 1, height, width, device=images.device)
        for template in self.templates:
            h, w = template.shape[1:]
            if h > height or w > width:
                continue
            hits = (self.correlation(images, template) >= self.threshold).double()[:, None]
            covered = _box_sum(F.pad(hits, (w - 1, w - 1, h - 1, h - 1)), h, w)  # hits whose window holds a pixel
            out = torch.maximum(out, (covered > 0.5).float())
        return grow(out, self.dilate)


def check_images(images: torch.Tensor) -> None:
    """What every locator takes: ``images`` [n, 3, H, W]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [n, 3, H, W], got shape {tuple(images.shape)}")


def grow(masks: torch.Tensor, pixels: int) -> torch.Tensor:
    """``masks`` [n, 1, H, W] with every marked region grown by ``pixels`` (a square neighbourhood)."""
    return F.max_pool2d(masks, 2 * pixels + 1, stride=1, padding=pixels) if pixels else masks


def _box_sum(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Sums of ``x`` [n, c, H, W] over every h x w window: [n, c, H-h+1, W-w+1]."""
    table = F.pad(x, (1, 0, 1, 0)).cumsum(2).cumsum(3)
    return table[..., h:, w:] - table[..., :-h, w:] - table[..., h:, :-w] + table[..., :-h, :-w]


def _cross_correlate(x: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """sum over channels and the window of x * template, for every window position: [n, H-h+1, W-w+1] (an FFT
    convolution with the flipped template; the valid positions are untouched by its wrap-around)."""
    height, width = x.shape[2:]
    h, w = template.shape[1:]
    spectrum = torch.fft.rfft2(x, s=(height, width)) * torch.fft.rfft2(template.flip(1, 2), s=(height, width))
    full = torch.fft.irfft2(spectrum.sum(dim=1), s=(height, width))
    return full[:, h - 1:, w - 1:]
