"""The images the behavioural check runs on: exemplars of the concept (a folder, or the preset's own exemplars
pasted onto a plain canvas), where the concept is in each, and what each is compared against.

Invariants: images are read by ``regions.images.decode_image`` only (Pillow; never unpickled); every image is
brought to the base model's resolution (shorter side scaled, centre cropped); the concept's region comes from
the preset's ``[exemplars]`` (``TemplateLocator``), never from the file under audit.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from concept_exclusion.audit.behaviour.check import Probe
from concept_exclusion.concept.preset import Preset
from concept_exclusion.errors import AuditError
from concept_exclusion.regions.exemplars import exemplar_images
from concept_exclusion.regions.images import decode_image
from concept_exclusion.regions.locate import TemplateLocator

SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_IMAGE_BYTES = 50_000_000


def fit(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """``image`` [3, h, w] scaled so its shorter side is ``resolution`` and centre cropped to a square."""
    h, w = image.shape[1:]
    if (h, w) == (resolution, resolution):
        return image
    s = resolution / min(h, w)
    nh, nw = max(resolution, round(h * s)), max(resolution, round(w * s))
    x = F.interpolate(image[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    return x[:, top:top + resolution, left:left + resolution].clamp(-1, 1)


def image_files(folder: str | Path, limit: int, flag: str) -> list[Path]:
    """The first ``limit`` image files (by name) of ``folder``; ``AuditError`` naming the flag when the folder is
    missing or holds none."""
    root = Path(folder)
    if not root.is_dir():
        raise AuditError(f"{flag} {root}: no such folder")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file())[:limit]
    if not files:
        raise AuditError(f"{flag} {root}: no images ({', '.join(SUFFIXES)}) in the folder")
    return files


def read_folder(folder: str | Path, limit: int, flag: str) -> list[torch.Tensor]:
    """``image_files`` as [3, h, w] tensors in [-1, 1] at their own sizes; ``AuditError`` naming the flag and file
    when one is unreadable or too large."""
    out = []
    for path in image_files(folder, limit, flag):
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise AuditError(f"{flag} {path}: larger than {MAX_IMAGE_BYTES} bytes")
        out.append(decode_image(path.read_bytes(), f"{flag} {path}", AuditError))
    return out


def located(preset: Preset, images: list[torch.Tensor], resolution: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the images fitted to ``resolution`` [n, 3, R, R], the concept's masks [n, 1, R, R] or None when the preset
    lists no exemplars). The concept is located in each image at its own size, where the preset's scales hold (as
    in training), and the mask is fitted with its image (a cell touched by the concept is the concept's)."""
    fitted = torch.stack([fit(x, resolution) for x in images])
    if preset.exemplars is None:
        return fitted, None
    locator = TemplateLocator.from_preset(preset)
    masks = [fit(locator.masks(x[None])[0].expand(3, -1, -1), resolution)[:1] for x in images]
    return fitted, (torch.stack(masks) > 0).float()


def require_comparison(preset: Preset, has_controls: bool) -> None:
    """Exemplar images need something to be compared against: the rest of each image (the preset's exemplars
    locate the concept in it) or control images; ``AuditError`` when there is neither."""
    if preset.exemplars is None and not has_controls:
        raise AuditError(f"--preset {preset.name}: lists no [exemplars] to find the concept in the images with; give "
                         "--controls DIR (images without the concept) to compare against")


def folder_probe(preset: Preset, exemplar_images: list[torch.Tensor], control_images: list[torch.Tensor] | None,
                 resolution: int, source: str) -> Probe:
    """Exemplar images with the concept located in each by the preset's exemplars; their controls are the rest of
    each image, or ``control_images`` (whole images without the concept) when given."""
    exemplars, masks = located(preset, exemplar_images, resolution)
    controls = None if control_images is None else torch.stack([fit(x, resolution) for x in control_images])
    n = exemplars.shape[0]
    whole = torch.ones(n, 1, *exemplars.shape[2:])
    notes: list[str] = []
    found = masks.flatten(1).amax(1) > 0 if masks is not None else torch.zeros(n, dtype=torch.bool)
    if controls is None:
        require_comparison(preset, has_controls=False)
        if not bool(found.any()):
            raise AuditError(f"{source}: the preset's exemplars are found in none of the {n} images (are they images "
                             "of this concept?)")
        if not bool(found.all()):
            notes.append(f"the concept was not found in {int((~found).sum())} of {n} exemplar images; they are left "
                         "out")
        keep = found.nonzero().flatten()
        m = masks[keep]
        return Probe(exemplars[keep], m, 1.0 - m, torch.zeros(len(keep), dtype=torch.long), len(keep), source, notes)
    inside = torch.where(found.view(-1, 1, 1, 1), masks, whole) if masks is not None else whole
    k = controls.shape[0]
    images = torch.cat([exemplars, controls])
    zeros_e, zeros_c = torch.zeros_like(whole), torch.zeros(k, 1, *controls.shape[2:])
    return Probe(images, torch.cat([inside, zeros_c]), torch.cat([zeros_e, torch.ones_like(zeros_c)]),
                 torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(k, dtype=torch.long)]), int(found.sum()),
                 source, notes)


def preset_probe(preset: Preset, resolution: int, count: int, seed: int) -> Probe:
    """The preset's exemplars, each scaled by the preset's first scale, pasted at seeded positions onto a canvas of
    its border's colour; the concept region is where it was pasted, its control the rest of the canvas."""
    if preset.exemplars is None:
        raise AuditError(f"--preset {preset.name}: lists no [exemplars]; give --exemplars DIR (images of the concept)")
    crops = exemplar_images(preset)
    scale = preset.exemplars.scales[0]
    gen = torch.Generator().manual_seed(seed)
    images, masks = [], []
    for i in range(count):
        crop = crops[i % len(crops)]
        h, w = (max(1, min(resolution, round(d * scale))) for d in crop.shape[1:])
        crop = F.interpolate(crop[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]
        border = torch.cat([crop[:, 0], crop[:, -1], crop[:, :, 0], crop[:, :, -1]], dim=1).mean(dim=1)
        canvas = border.view(3, 1, 1).expand(3, resolution, resolution).clone()
        top = int(torch.randint(0, resolution - h + 1, (1,), generator=gen))
        left = int(torch.randint(0, resolution - w + 1, (1,), generator=gen))
        canvas[:, top:top + h, left:left + w] = crop
        mask = torch.zeros(1, resolution, resolution)
        mask[:, top:top + h, left:left + w] = 1.0
        images.append(canvas.clamp(-1, 1))
        masks.append(mask)
    m = torch.stack(masks)
    return Probe(torch.stack(images), m, 1.0 - m, torch.zeros(count, dtype=torch.long), count,
                 f"the preset's {len(crops)} exemplar(s) pasted onto plain canvases",
                 ["no --exemplars: the preset's exemplars on plain canvases can show that a file learned the concept, "
                  "never that it did not (in the evidence world, files that draw it read 0 here); give --exemplars "
                  "DIR, images of the concept in context"], conclusive=False)
