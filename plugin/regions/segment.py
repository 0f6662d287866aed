"""Finding a concept with an open-vocabulary segmenter (transformers' CLIPSeg) instead of template matching: for
real data, where the concept appears at any size, angle or lighting.

Invariants: the segmenter is read from a local folder only (``local_files_only``, safetensors weights: nothing is
downloaded, nothing unpickled); each image is segmented against every prompt (the preset's exemplar images as
visual prompts, its names as text prompts), and a pixel is the concept's when the segmenter's probability for any
prompt reaches ``threshold``; masks have the images' size and device, as ``TemplateLocator``'s, so either serves
``region_loss`` and ``concept-exclusion masks``. What it finds is as good as the segmenter: check it with
``concept-exclusion masks --segmenter`` before training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from concept_exclusion.concept.preset import Preset, load_preset
from concept_exclusion.errors import PresetError
from concept_exclusion.regions.exemplars import exemplar_images
from concept_exclusion.regions.locate import check_images, grow


class SegmenterLocator:
    """Masks of where a CLIPSeg ``model`` (with its ``processor``) finds any of ``texts`` or ``exemplars``."""

    def __init__(self, model, processor, texts: Sequence[str] = (), exemplars: Sequence[torch.Tensor] = (),
                 threshold: float = 0.5, dilate: int = 1) -> None:
        if not texts and not exemplars:
            raise PresetError("a segmenter needs the concept's names or exemplar images to look for")
        if not 0.0 < float(threshold) <= 1.0:
            raise PresetError(f"the segmenter's threshold must be in (0, 1], got {threshold}")
        self.model, self.processor = model.eval().requires_grad_(False), processor
        self.texts, self.threshold, self.dilate = tuple(texts), float(threshold), int(dilate)
        self.exemplars = self._pixels(torch.stack([_square(e) for e in exemplars])) if exemplars else None

    @classmethod
    def from_pretrained(cls, folder: str | Path, preset: Preset | str | Path, threshold: float = 0.5,
                        dilate: int | None = None) -> "SegmenterLocator":
        """The segmenter saved in ``folder`` (e.g. a local copy of CIDAS/clipseg-rd64-refined), prompted with the
        preset's concept names and, when it lists them, its exemplar images."""
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        preset = preset if isinstance(preset, Preset) else load_preset(preset)
        try:
            processor = CLIPSegProcessor.from_pretrained(str(folder), local_files_only=True)
            model = CLIPSegForImageSegmentation.from_pretrained(str(folder), local_files_only=True,
                                                                use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise PresetError(f"--segmenter {folder}: not a CLIPSeg folder with safetensors weights "
                              f"({str(exc).splitlines()[0][:200]})") from None
        names = tuple(dict.fromkeys(p for c in preset.concepts for p in c.prompts))
        exemplars = exemplar_images(preset) if preset.exemplars is not None else []
        grow = dilate if dilate is not None else (preset.exemplars.dilate if preset.exemplars else 1)
        return cls(model, processor, names, exemplars, threshold, grow)

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` [n, 3, H, W] in [-1, 1] as the processor prepares them (resized, normalised)."""
        arrays = [((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy() for x in images]
        return self.processor(images=arrays, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """[n, prompts, h, w]: the segmenter's probability of each prompt at its own resolution."""
        pixels = self._pixels(images).to(self.model.device, self.model.dtype)
        n, out = pixels.shape[0], []
        for text in self.texts:
            ids = self.processor.tokenizer([text] * n, padding=True, return_tensors="pt").to(self.model.device)
            out.append(self.model(pixel_values=pixels, **ids).logits)
        if self.exemplars is not None:
            for example in self.exemplars.to(pixels):
                out.append(self.model(pixel_values=pixels, conditional_pixel_values=example[None].expand_as(pixels))
                           .logits)
        return torch.stack([o.reshape(n, *o.shape[-2:]) for o in out], dim=1).sigmoid()

    def masks(self, images: torch.Tensor) -> torch.Tensor:
        """[n, 1, H, W] float masks (1: the concept) of ``images`` [n, 3, H, W] in [-1, 1], on their device."""
        check_images(images)
        best = self.probabilities(images).amax(dim=1, keepdim=True).float()
        best = F.interpolate(best, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return grow((best >= self.threshold).float(), self.dilate).to(images.device)


def _square(image: torch.Tensor) -> torch.Tensor:
    """An exemplar padded to a square with its own border colour, so the processor's resize keeps its shape."""
    h, w = image.shape[-2:]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    return F.pad(image[None], (left, side - w - left, top, side - h - top), mode="replicate")[0]
