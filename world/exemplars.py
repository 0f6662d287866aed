"""Exemplar images of the world's panda for ``concept-exclusion audit --exemplars DIR`` (what a user holds: pictures
of the concept in context, never captions).

    python -m concept_exclusion_world.exemplars --out DIR [--count 16] [--seed 0] [--controls DIR2]

Invariants: the scenes come from world seeds of their own (``AUDIT_SEEDS``: disjoint from the fine-tune data, the
measurements and the inversion attack's renders); ``--controls`` writes the same scenes without the logo; files are
PNG at the world's size, each written whole.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from .files import atomic_path
from .scenes import PROTECTED, Scene, World, render

AUDIT_SEEDS = 40_000


def panda_scenes(seed: int, count: int) -> list[Scene]:
    """``count`` fine-tune-like scenes that show the panda logo, from world seed ``AUDIT_SEEDS + seed``."""
    world, out = World(AUDIT_SEEDS + seed), []
    while len(out) < count:
        scene = world.finetune_scene()
        if scene.emblem == PROTECTED:
            out.append(scene)
    return out


def write_png(image: torch.Tensor, path: Path) -> None:
    """``image`` [3, h, w] in [-1, 1] as an 8-bit PNG, written whole."""
    from PIL import Image

    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(pixels, "RGB").save(tmp, format="PNG")


def write(out: Path, count: int, seed: int, controls: Path | None = None) -> list[Path]:
    """The exemplar PNGs (and, with ``controls``, the same scenes without the logo); returns the exemplars' paths."""
    paths = []
    for i, scene in enumerate(panda_scenes(seed, count)):
        paths.append(out / f"panda-{i:03d}.png")
        write_png(render(scene), paths[-1])
        if controls is not None:
            write_png(render(replace(scene, emblem=None)), controls / f"scene-{i:03d}.png")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--controls", type=Path, help="also write the same scenes without the logo here")
    args = parser.parse_args(argv)
    write(args.out, args.count, args.seed, args.controls)
    print(f"wrote {args.count} exemplar(s) to {args.out}" + (f" and controls to {args.controls}" if args.controls
                                                                else ""))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
