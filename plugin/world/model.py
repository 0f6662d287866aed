"""The world's "public base model": offline tokenizer, frozen 768-wide CLIP text encoder, tiny pixel-space UNet.

Invariants: the tokenizer and text encoder are rebuilt from fixed seeds (nothing is downloaded);
the base UNet is pre-trained only on public scenes (no logo, no new colour). Its weights are
looked up in this order: the copy shipped in the package (``data/base-unet.safetensors``), the
cache (``$CONCEPT_EXCLUSION_CACHE`` or ``~/.cache/concept-exclusion``), else pre-trained now and
cached. A stored copy is used only if it was made for the same text encoder (fingerprint) and
UNet configuration. ``python -m concept_exclusion.world.model --write-shipped`` remakes the shipped copy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..safeio import read_safetensors, write_safetensors
from ..tiny import clip_text_encoder, clip_tokenizer
from .scenes import World, images, vocabulary

log = logging.getLogger(__name__)

TEXT_WIDTH = 768
TEXT_LAYERS = 2
TEXT_HEADS = 12
MAX_TOKENS = 20
UNET_CONFIG = dict(
    sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
    norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), mid_block_type=None,
    cross_attention_dim=TEXT_WIDTH, attention_head_dim=1,
)
PRETRAIN = dict(steps=2000, batch=32, lr=2e-3, seed=0, dropout=0.1)
SHIPPED = Path(__file__).parent / "data" / "base-unet.safetensors"


def cache_dir() -> Path:
    return Path(os.environ.get("CONCEPT_EXCLUSION_CACHE") or Path.home() / ".cache" / "concept-exclusion")


def new_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG)


def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                         clip_sample=True)


class Text:
    """Tokenizer + frozen text encoder, with a cache of encoded captions (the world's captions are few)."""

    def __init__(self, folder: Path | None = None) -> None:
        folder = folder or cache_dir() / "tokenizer"
        self.tokenizer = clip_tokenizer(vocabulary(), folder, max_length=MAX_TOKENS)
        self.encoder = clip_text_encoder(len(self.tokenizer), hidden_size=TEXT_WIDTH, layers=TEXT_LAYERS,
                                         heads=TEXT_HEADS, max_positions=MAX_TOKENS, seed=0)
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name, p in sorted(self.encoder.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().float().contiguous().numpy().tobytes()[:4096])
        h.update(json.dumps(self.tokenizer.get_vocab(), sort_keys=True).encode())
        return h.hexdigest()[:24]

    def ids(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                              return_tensors="pt").input_ids

    def encode_live(self, texts: list[str]) -> torch.Tensor:
        """Encode without the cache (gradients flow if the encoder's parameters require them)."""
        return self.encoder(self.ids(texts)).last_hidden_state

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """[n, MAX_TOKENS, 768] float32, the states the UNet reads (last layer, as SD1 pipelines)."""
        missing = sorted({t for t in texts if t not in self._cache})
        for i in range(0, len(missing), 256):
            chunk = missing[i:i + 256]
            for t, h in zip(chunk, self.encode_live(chunk)):
                self._cache[t] = h.clone()
        return torch.stack([self._cache[t] for t in texts])


def diffusion_loss(unet, x0: torch.Tensor, cond: torch.Tensor, gen: torch.Generator, sched=None,
                   timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Mean epsilon-prediction MSE at random (or given) timesteps."""
    sched = sched or scheduler()
    n = x0.shape[0]
    if timesteps is None:
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (n,), generator=gen)
    if noise is None:
        noise = torch.randn(x0.shape, generator=gen)
    xt = sched.add_noise(x0, noise, timesteps)
    pred = unet(xt, timesteps, cond).sample
    return torch.nn.functional.mse_loss(pred.float(), noise)


def pretrain_base(text: Text, steps: int = PRETRAIN["steps"], batch: int = PRETRAIN["batch"],
                  lr: float = PRETRAIN["lr"], seed: int = PRETRAIN["seed"], progress: bool = True):
    """Train a fresh UNet on public scenes only (no logo, no new colour); returns it in eval mode."""
    unet = new_unet(seed)
    world = World(seed + 1000)
    scenes = world.scenes(4096, "public")
    x_all = images(scenes)
    captions = [s.caption() for s in scenes]
    cond_all = text.encode(captions)
    empty = text.encode([""])[0]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    lr_at = lambda i: lr * min(1.0, (i + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(i / steps * 3.14159)).item()))
    sched = scheduler()
    unet.train()
    bar = tqdm(range(steps), desc="pre-training the base model", disable=not progress, leave=False)
    for i in bar:
        idx = torch.randint(0, len(scenes), (batch,), generator=gen)
        cond = cond_all[idx].clone()
        drop = torch.rand(batch, generator=gen) < PRETRAIN["dropout"]
        cond[drop] = empty
        for g in opt.param_groups:
            g["lr"] = lr_at(i)
        loss = diffusion_loss(unet, x_all[idx], cond, gen, sched)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return unet.eval().requires_grad_(False)


def _config_hash() -> str:
    return hashlib.sha256(json.dumps({"unet": UNET_CONFIG, "pretrain": PRETRAIN}, sort_keys=True,
                                     default=list).encode()).hexdigest()[:16]


def save_base(unet, text: Text, path: Path, seconds: float) -> None:
    meta = {"format": "concept-exclusion-world-base/1", "text_fingerprint": text.fingerprint,
            "config_hash": _config_hash(), "unet_config": json.dumps(UNET_CONFIG, default=list),
            "pretrain": json.dumps(PRETRAIN), "pretrain_seconds": f"{seconds:.1f}"}
    write_safetensors(path, {k: v.detach().float() for k, v in unet.state_dict().items()}, meta)


def _try_load(path: Path, text: Text):
    if not path.exists():
        return None
    tensors, meta = read_safetensors(path)
    if meta.get("text_fingerprint") != text.fingerprint or meta.get("config_hash") != _config_hash():
        log.warning("%s was made for another text encoder or configuration; not using it", path)
        return None
    unet = new_unet(0)
    unet.load_state_dict(tensors, strict=True)
    return unet.eval().requires_grad_(False)


@dataclass
class Base:
    text: Text
    unet: object
    source: str
    seconds: float


def load_base(progress: bool = True, allow_shipped: bool = True) -> Base:
    """The base model: shipped copy, else cached copy, else pre-trained now (and cached)."""
    t0 = time.time()
    text = Text()
    candidates = ([SHIPPED] if allow_shipped else []) + [cache_dir() / "base-unet.safetensors"]
    for path in candidates:
        unet = _try_load(path, text)
        if unet is not None:
            return Base(text, unet, str(path), time.time() - t0)
    unet = pretrain_base(text, progress=progress)
    path = cache_dir() / "base-unet.safetensors"
    save_base(unet, text, path, time.time() - t0)
    return Base(text, unet, f"pre-trained now, cached at {path}", time.time() - t0)


def main(argv: list[str] | None = None) -> int:
    """Remake the shipped base weights (the script that made ``data/base-unet.safetensors``)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--write-shipped", action="store_true", help=f"write {SHIPPED}")
    parser.add_argument("--out", type=Path, help="write the weights here instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("CONCEPT_EXCLUSION_THREADS", "1")))
    t0 = time.time()
    text = Text()
    unet = pretrain_base(text)
    out = SHIPPED if args.write_shipped else (args.out or cache_dir() / "base-unet.safetensors")
    save_base(unet, text, out, time.time() - t0)
    print(f"wrote {out} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
