"""The ``masks`` command: loss masks for a folder of training images, found from the preset's exemplars, in the
layout kohya's ``--masked_loss`` reads (a PNG per image, same stem, white = learn, black = the concept's region).

Invariants: every image is read with Pillow only; the masks appear in ``--out`` all at once (``atomic_folder``:
written to a temporary folder beside it, then renamed) or not at all; an existing non-empty ``--out`` is never mixed with new
masks unless ``--overwrite`` replaces it whole.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from concept_exclusion.errors import DataError
from concept_exclusion.safeio import atomic_folder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "masks", help="write loss masks (kohya --masked_loss layout) for the concept's region in training images",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Find the preset's concept in every image of DATA (matched against the preset's exemplar "
                    "images, or found by a local CLIPSeg segmenter with --segmenter, whatever the captions say) "
                    "and write one mask per image to --out: white where the "
                    "model may learn, black where the concept is. Train with kohya's --masked_loss and "
                    "conditioning_data_dir = OUT in the subset, or read the masks in your own loop.",
        epilog="exit codes: 0 written, 2 unusable input (one line on stderr), 4 internal error")
    p.add_argument("data", type=Path, help="a folder of training images (.png, .jpg, .jpeg, .webp, .bmp)")
    p.add_argument("--preset", required=True, help="a preset with [exemplars] (.toml or shipped name)")
    p.add_argument("--out", type=Path, required=True, help="the folder to write the masks to")
    p.add_argument("--recursive", action="store_true", help="also read images in sub-folders (masks keep the tree)")
    p.add_argument("--segmenter", type=Path, metavar="FOLDER", help="find the concept with this local CLIPSeg folder (prompted with the "
                                                  "preset's names and exemplars) instead of template matching")
    p.add_argument("--segmenter-threshold", type=float, default=0.5, metavar="P",
                   help="the segmenter's probability that marks a pixel (default 0.5)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.set_defaults(func=run)


def _images(data: Path, recursive: bool) -> list[Path]:
    if not data.is_dir():
        raise DataError(f"{data}: not a folder of images")
    found = sorted(p for p in (data.rglob("*") if recursive else data.iterdir())
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise DataError(f"{data}: no images ({', '.join(IMAGE_SUFFIXES)})")
    stems: dict[Path, Path] = {}
    for p in found:
        key = p.relative_to(data).with_suffix("")
        if key in stems:
            raise DataError(f"{p} and {stems[key]} share a name: kohya matches masks by name without extension")
        stems[key] = p
    return found


def _read(path: Path) -> torch.Tensor:
    from concept_exclusion.regions.images import decode_image

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return decode_image(data, str(path), DataError)


def run(args: argparse.Namespace) -> int:
    from PIL import Image
    from tqdm.auto import tqdm

    from concept_exclusion.concept.preset import load_preset
    from concept_exclusion.regions.locate import TemplateLocator
    from concept_exclusion.regions.segment import SegmenterLocator

    preset = load_preset(args.preset)
    locator = (SegmenterLocator.from_pretrained(args.segmenter, preset, args.segmenter_threshold) if args.segmenter
               else TemplateLocator.from_preset(preset))
    images = _images(args.data, args.recursive)
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise DataError(f"--out {out}: exists and is not an empty folder (pass --overwrite to replace it)")
    found = []
    with atomic_folder(out, replace=True) as folder:
        for path in tqdm(images, desc="masks", unit="image", disable=len(images) < 20):
            concept = locator.masks(_read(path)[None])[0, 0]
            if concept.any():
                found.append(path)
            learn = ((1.0 - concept) * 255).to(torch.uint8).numpy()
            name = path.relative_to(args.data).with_suffix(".png")
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(learn, "L").convert("RGB").save(folder / name, format="PNG")
    print(f"{len(images)} masks in {out}; the concept was found in {len(found)} image(s)"
          + (": " + ", ".join(p.name for p in found[:5]) + (" ..." if len(found) > 5 else "") if found else ""))
    print(f"kohya: add conditioning_data_dir = \"{out.resolve()}\" to the subset and train with --masked_loss")
    return 0
