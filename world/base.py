"""World 3's public base model: the denoiser pre-trained on public scenes only (no panda, no tiger, no purple).

Invariants: the base is looked up as the copy shipped in this package (``data/base.safetensors``),
then the cache (``$CONCEPT_EXCLUSION_CACHE`` or ``~/.cache/concept-exclusion``), else pre-trained
now and cached; a stored copy is used only when it was made for the same denoiser configuration,
pre-training recipe and text encoder (sha256). ``python -m concept_exclusion_world.base --write-shipped``
remakes the shipped copy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .files import atomic_path
from .model import CONFIG, Denoiser, new_denoiser, noisy, scheduler
from .scenes import World, images
from .text import Text

log = logging.getLogger(__name__)

PRETRAIN = dict(steps=3000, batch=64, lr=1e-3, seed=0, dropout=0.1, scenes=8192)
SHIPPED = Path(__file__).parent / "data" / "base.safetensors"


def cache_dir() -> Path:
    return Path(os.environ.get("CONCEPT_EXCLUSION_CACHE") or Path.home() / ".cache" / "concept-exclusion")


def recipe_hash(encoder_sha256: str) -> str:
    # "world" names the version of the public scenes: 3.2 changed only the fine-tune data; 3.3 put the shop logo in
    # the middle slot above objects on the right
    doc = {"denoiser": CONFIG, "pretrain": PRETRAIN, "encoder": encoder_sha256, "world": "3.3"}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def pretrain(text: Text, progress: bool = True) -> Denoiser:
    """A fresh denoiser trained on public scenes (30% with the shop logo, 30% with the crown badge); returned frozen
    in eval mode."""
    cfg = PRETRAIN
    model = new_denoiser(cfg["seed"])
    scenes = World(cfg["seed"] + 1000).scenes(cfg["scenes"], "public")
    x_all = images(scenes)
    cond_all = text.encode([s.caption() for s in scenes])
    empty = text.encode([""])[0]
    gen = torch.Generator().manual_seed(cfg["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    sched = scheduler()
    model.train()
    steps = cfg["steps"]
    bar = tqdm(range(steps), desc="pre-training the base model", disable=not progress)
    for i in bar:
        for g in opt.param_groups:
            g["lr"] = cfg["lr"] * min(1.0, (i + 1) / 200) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * i / steps)))
        idx = torch.randint(0, len(scenes), (cfg["batch"],), generator=gen)
        drop = torch.rand(cfg["batch"], generator=gen) < cfg["dropout"]
        cond = torch.where(drop.view(-1, 1, 1), empty, cond_all[idx])
        x0 = x_all[idx]
        xt, t = noisy(x0, gen, sched)
        loss = torch.nn.functional.mse_loss(model(xt, t, cond), x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval().requires_grad_(False)


def save_base(model: Denoiser, text: Text, path: Path, seconds: float) -> None:
    meta = {"format": "concept-exclusion-world-base/3", "recipe": recipe_hash(text.sha256),
            "denoiser": json.dumps(CONFIG), "pretrain": json.dumps(PRETRAIN), "pretrain_seconds": f"{seconds:.0f}"}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().float().contiguous() for k, v in model.state_dict().items()}, str(tmp), meta)


def _try_load(path: Path, text: Text) -> Denoiser | None:
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("recipe") != recipe_hash(text.sha256):
        log.warning("%s was made for another denoiser, recipe or text encoder; not using it", path)
        return None
    model = new_denoiser(0)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval().requires_grad_(False)


@dataclass
class Base:
    text: Text
    model: Denoiser
    source: str


def load_base(progress: bool = True) -> Base:
    """The text encoder and the base denoiser: shipped copy, else cached copy, else pre-trained now and cached."""
    text = Text()
    for path in (SHIPPED, cache_dir() / "world3-base.safetensors"):
        model = _try_load(path, text)
        if model is not None:
            return Base(text, model, str(path))
    t0 = time.time()
    model = pretrain(text, progress)
    path = cache_dir() / "world3-base.safetensors"
    save_base(model, text, path, time.time() - t0)
    return Base(text, model, f"pre-trained now, cached at {path}")


def main(argv: list[str] | None = None) -> int:
    """Pre-train the base model and write it (the script that made ``data/base.safetensors``)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--write-shipped", action="store_true", help=f"write {SHIPPED}")
    parser.add_argument("--out", type=Path, help="write the weights here instead")
    args = parser.parse_args(argv)
    t0 = time.time()
    text = Text()
    model = pretrain(text)
    out = SHIPPED if args.write_shipped else (args.out or cache_dir() / "world3-base.safetensors")
    save_base(model, text, out, time.time() - t0)
    print(f"wrote {out} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
