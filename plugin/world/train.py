"""Fine-tuning the base model on the world with the concept, by one of the compared methods.

Invariants: every method sees the same base weights, the same fine-tune scenes (filtering drops
some), the same random stream of batch indices, timesteps and noise for a given seed, and the
same step count. Excluded runs use only the public API: ``ConceptSubspace.from_text_encoder``
and ``ConceptExclusion.attach(unet, subspace, mode=..., targets=..., optimizer=opt, project_context=...)``,
detached after training so that measurements and attacks see the model as a user loads it.
"""

from __future__ import annotations

import copy
import logging
import re
import time
from dataclasses import dataclass, field
from importlib import resources

import torch
from tqdm.auto import tqdm

from ..exclusion import ConceptExclusion
from ..preset import Preset, parse_preset
from ..subspace import ConceptSubspace
from .model import Base, diffusion_loss, scheduler
from .scenes import BRAND, Scene, World, WorldSpec, images

log = logging.getLogger(__name__)

WORLD_PRESET = "world-logo"
DATA_SEED = 0
DATA_SIZE = 1200
# LoRA on attention, feed-forward and the resnet/up-sampler convolutions ("LoCon"-style, as common SD trainers offer)
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1",
                "conv2", "upsamplers.0.conv", "conv_out")


@dataclass(frozen=True)
class Method:
    """One way to fine-tune. ``data``: 'all', 'filter' (drop logo images), 'scrub' (drop "with the <brand> logo"
    from captions) or 'scrub-name' (drop only the brand's name)."""

    name: str
    description: str
    data: str = "all"
    mode: str | None = None  # None: no projection
    targets: tuple[str, ...] = ()
    tokens: str | None = None  # None: the preset's choice
    freeze_q_out: bool = False
    preset: str = WORLD_PRESET
    project_context: bool = False  # training passes read the text states without the concept's component


DEFAULT_METHOD = "exact-context"
METHODS = {m.name: m for m in (
    Method("plain", "plain fine-tuning on all data"),
    Method("filter", "data filtering: every logo image dropped", data="filter"),
    Method("scrub", "caption scrubbing: brand name removed from captions (the control)", data="scrub"),
    Method("scrub-name", "control: only the brand's name removed (\"... with the logo\"); the model may bind "
           "the logo to the remaining words", data="scrub-name"),
    Method("gradient-kv", "the paper's projection: gradients of attn2 to_k/to_v only", mode="gradient",
           targets=("kv",)),
    Method("exact-kv", "exact mode, attn2 to_k/to_v", mode="exact", targets=("kv",)),
    Method("exact-attention", "exact mode, attn2 k/v + projected q/out (the library's default targets)", mode="exact",
           targets=("attention",)),
    Method("exact-kv-frozen-qo", "exact k/v + attn2 to_q/to_out frozen (blunt)", mode="exact", targets=("kv",),
           freeze_q_out=True),
    Method("exact-attention-phrase", "as exact-attention, preset names the whole phrase 'with the zorblax logo'",
           mode="exact", targets=("attention",), preset="world-logo-phrase"),
    Method("exact-kv-phrase", "exact k/v, preset names the whole phrase 'with the zorblax logo'", mode="exact",
           targets=("kv",), preset="world-logo-phrase"),
    Method("exact-attention-concept", "as exact-attention, basis: concept tokens only", mode="exact",
           targets=("attention",), tokens="concept"),
    Method("exact-attention-contrastive", "as exact-attention, basis: contrastive rows", mode="exact",
           targets=("attention",), tokens="contrastive"),
    Method("exact-attention-contrastive+concept", "as exact-attention, basis: contrastive + concept rows",
           mode="exact", targets=("attention",), tokens="contrastive+concept"),
    Method("exact-attention-contexts", "as exact-attention, preset in 24 caption contexts, contrasted with the "
           "allowed brand (contrastive + concept rows)", mode="exact", targets=("attention",),
           preset="world-logo-contexts"),
    Method("exact-attention-contexts-preserve", "as exact-attention-contexts, the allowed brand in [[preserve]]",
           mode="exact", targets=("attention",), preset="world-logo-contexts-preserve"),
    Method("exact-context-world-logo", "exact-attention (world-logo preset, tokens = all) plus the text states "
           "projected in training", mode="exact", targets=("attention",), project_context=True),
    Method("exact-context", "exact-attention-contexts-preserve plus the text states projected in training "
           "(project_context)", mode="exact", targets=("attention",), preset="world-logo-contexts-preserve",
           project_context=True),
)}


@dataclass(frozen=True)
class TrainConfig:
    kind: str = "lora"  # "lora" | "full"
    steps: int = 1200  # world 2: at 400 steps plain training does not learn to read the brand names
    batch: int = 32
    lr: float | None = None  # None: 3e-3 for LoRA, 5e-4 for full fine-tuning
    rank: int = 8
    dropout: float = 0.1
    lora_targets: tuple[str, ...] = LORA_TARGETS

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (3e-3 if self.kind == "lora" else 5e-4)


@dataclass
class Finetuned:
    method: Method
    config: TrainConfig
    seed: int
    unet: object
    exclusion: ConceptExclusion | None
    seconds: float
    losses: list[float] = field(default_factory=list)


def world_preset(tokens: str | None = None, name: str = WORLD_PRESET) -> Preset:
    """A shipped world preset, with ``[projection].tokens`` replaced when ``tokens`` is given."""
    text = resources.files("concept_exclusion.presets").joinpath(f"{name}.toml").read_text("utf-8")
    if tokens is not None:
        text, n = re.subn(r'(?m)^tokens\s*=\s*"[^"]*"', f'tokens = "{tokens}"', text)
        if n != 1:
            text = text.replace("[projection]", f'[projection]\ntokens = "{tokens}"', 1)
    return parse_preset(text, source=f"<{name} tokens={tokens or 'default'}>")


def subspace_for(base: Base, tokens: str | None = None, preset: str = WORLD_PRESET) -> ConceptSubspace:
    return ConceptSubspace.from_text_encoder(world_preset(tokens, preset), base.text.tokenizer, base.text.encoder)


def finetune_scenes(spec: WorldSpec = WorldSpec()) -> list[Scene]:
    """The fixed fine-tune data set (same for every method and seed)."""
    return World(DATA_SEED, spec).scenes(DATA_SIZE, "finetune")


def _dataset(method: Method, scenes: list[Scene]) -> tuple[list[Scene], list[str]]:
    if method.data == "filter":
        kept = [s for s in scenes if not s.logo]
        return kept, [s.caption() for s in kept]
    if method.data == "scrub-name":
        return scenes, [s.caption().replace(f" {BRAND} ", " ") for s in scenes]
    return scenes, [s.caption(brand=method.data != "scrub") for s in scenes]


def _is_q_or_out(name: str) -> bool:
    return bool(re.search(r"attn2\.(to_q|to_out\.0)\b", name))


def prepare(base: Base, method: Method, config: TrainConfig, seed: int):
    """A trainable copy of the base UNet (LoRA adapter or full weights) and its trainable parameters."""
    unet = copy.deepcopy(base.unet).requires_grad_(False)
    torch.manual_seed(seed)
    if config.kind == "lora":
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.rank, init_lora_weights="gaussian",
                                    target_modules=list(config.lora_targets)))
    elif config.kind == "full":
        unet.requires_grad_(True)
    else:
        raise ValueError(f"unknown fine-tune kind {config.kind!r}")
    if method.freeze_q_out:
        for name, p in unet.named_parameters():
            if _is_q_or_out(name):
                p.requires_grad_(False)
    return unet, [p for p in unet.parameters() if p.requires_grad]


def finetune(base: Base, method: Method, config: TrainConfig, seed: int, scenes: list[Scene] | None = None,
             subspace: ConceptSubspace | None = None, progress: bool = True) -> Finetuned:
    """Fine-tune ``base`` by ``method``; returns the trained UNet (eval mode) and its exclusion, if any."""
    t0 = time.time()
    data, captions = _dataset(method, scenes if scenes is not None else finetune_scenes())
    x_all = images(data)
    cond_all = base.text.encode(captions)
    empty = base.text.encode([""])[0]
    unet, params = prepare(base, method, config, seed)
    opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    exclusion = None
    if method.mode is not None:
        subspace = subspace if subspace is not None else subspace_for(base, method.tokens, method.preset)
        exclusion = ConceptExclusion.attach(unet, subspace, mode=method.mode, targets=method.targets, optimizer=opt,
                                            project_context=method.project_context)
    gen = torch.Generator().manual_seed(seed)
    sched = scheduler()
    unet.train()
    losses = []
    bar = tqdm(range(config.steps), desc=f"{method.name} ({config.kind}, seed {seed})", disable=not progress,
               leave=False)
    for _ in bar:
        idx = torch.randint(0, len(data), (config.batch,), generator=gen)
        drop = torch.rand(config.batch, generator=gen) < config.dropout
        cond = torch.where(drop.view(-1, 1, 1), empty, cond_all[idx])
        loss = diffusion_loss(unet, x_all[idx], cond, gen, sched)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if exclusion is not None:  # measurements and attacks see the trained model as a user loads it
        exclusion.detach()
    unet.eval()
    return Finetuned(method, config, seed, unet, exclusion, time.time() - t0, losses)
