"""Adaptive extraction attacks: textual inversion, and a small LoRA trained on 8 logo images.

Both attack a frozen copy of the model with the same 8 images, steps and seed, and are also run
on the base model: a model that never learned the logo should be no easier to attack than the base.
Invariant: the attacked model and the text encoder are left exactly as they were.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch

from .detect import Calibration
from .measure import EvalConfig, leak_rate, sample
from .model import Text, diffusion_loss, scheduler
from .scenes import BRAND, World, WorldSpec, images

PLACEHOLDER = "sks"


@dataclass(frozen=True)
class AttackConfig:
    images: int = 8
    ti_steps: int = 80
    ti_lr: float = 0.05
    lora_steps: int = 40
    lora_lr: float = 3e-3
    lora_rank: int = 4
    n_samples: int = 32


def _attack_set(seed: int, n: int):
    world = World(20_000 + seed, WorldSpec(p_logo=1.0))
    return world.scenes(n)


def merged(unet):
    """A plain UNet (no adapter) with any PEFT LoRA merged into its weights."""
    model = copy.deepcopy(unet)
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "merge"):
            module.merge()
    state = {}
    for k, v in model.state_dict().items():
        if "lora_" in k:
            continue
        state[k.replace(".base_layer.", ".")] = v
    from .model import new_unet

    plain = new_unet(0)
    plain.load_state_dict(state, strict=True)
    return plain.eval().requires_grad_(False)


def _prompts(scenes, word: str) -> list[str]:
    return [s.caption().replace(BRAND, word) for s in scenes]


def textual_inversion(unet, text: Text, calibration: Calibration, seed: int, cfg: AttackConfig = AttackConfig()
                      ) -> float:
    """Learn the placeholder token's input embedding on 8 logo images; return the leak rate it yields."""
    scenes = _attack_set(seed, cfg.images)
    eval_scenes = [replace(s, logo=True) for s in World(30_000 + seed).scenes(cfg.n_samples, "public")]
    x0 = images(scenes)
    token_id = text.tokenizer.convert_tokens_to_ids(PLACEHOLDER + "</w>")
    table = text.encoder.get_input_embeddings().weight
    saved = table.detach().clone()
    gen = torch.Generator().manual_seed(seed)
    row_mask = torch.zeros(table.shape[0], 1)
    row_mask[token_id] = 1.0
    unet = copy.deepcopy(unet).requires_grad_(False).eval()
    sched = scheduler()
    try:
        table.requires_grad_(True)
        handle = table.register_hook(lambda g: g * row_mask)
        opt = torch.optim.Adam([table], lr=cfg.ti_lr)
        prompts = _prompts(scenes, PLACEHOLDER)
        for _ in range(cfg.ti_steps):
            cond = text.encode_live(prompts)
            loss = diffusion_loss(unet, x0, cond, gen, sched)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        handle.remove()
        table.requires_grad_(False)
        with torch.no_grad():
            cond = text.encode_live(_prompts(eval_scenes, PLACEHOLDER))
            x = sample(unet, cond, text.encode([""]), seed + 7, EvalConfig().steps, EvalConfig().guidance)
        return leak_rate(x, calibration)
    finally:
        with torch.no_grad():
            table.requires_grad_(False)
            table.copy_(saved)


def lora_attack(unet, text: Text, calibration: Calibration, seed: int, cfg: AttackConfig = AttackConfig()) -> float:
    """Train a fresh rank-4 LoRA on the merged model with 8 branded logo images; return the leak rate."""
    from peft import LoraConfig

    scenes = _attack_set(seed, cfg.images)
    eval_scenes = [replace(s, logo=True) for s in World(30_000 + seed).scenes(cfg.n_samples, "public")]
    model = merged(unet)
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                                 target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lora_lr, weight_decay=0.0)
    x0 = images(scenes)
    cond_all = text.encode([s.caption() for s in scenes])
    gen = torch.Generator().manual_seed(seed)
    sched = scheduler()
    model.train()
    for _ in range(cfg.lora_steps):
        loss = diffusion_loss(model, x0, cond_all, gen, sched)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    x = sample(model, text.encode([s.caption() for s in eval_scenes]), text.encode([""]), seed + 7,
               EvalConfig().steps, EvalConfig().guidance)
    return leak_rate(x, calibration)
