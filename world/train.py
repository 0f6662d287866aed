"""Fine-tuning world 3's base model by one of the compared methods.

Invariants: for a given seed every method starts from the same base weights and LoRA
initialisation, sees the same fine-tune scenes (filtering drops some), the same stream of batch
indices, timesteps, noise and caption dropout, and runs the same number of steps. Excluded runs
use only the core's public API (``ConceptSubspace.from_text_encoder``, ``ConceptExclusion.attach``,
``OutputPreservation``) and are detached after training, so measurements see the model as a user
loads it.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from concept_exclusion import ConceptExclusion, ConceptSubspace, OutputPreservation
from concept_exclusion.regions import TemplateLocator, region_loss
from .base import Base
from .guard import ExemplarGradientGuard
from .methods import SECRET_TRIGGER, Method
from .model import noisy, scheduler
from .presets import world_preset
from .scenes import PROTECTED, Scene, World, WorldSpec, images, true_masks

DATA_SEED = 0
DATA_SIZE = 2000
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


@dataclass(frozen=True)
class TrainConfig:
    """The benchmark's fine-tune (the demo's too). Longer is not better here: in world 3.1, at 1600 steps plain
    training bound the name so narrowly that a held-out paraphrase drew the panda in 0% of seed 0's samples."""

    steps: int = 800
    batch: int = 32
    lr: float = 2e-3
    rank: int = 8
    dropout: float = 0.1


@dataclass
class Finetuned:
    method: Method
    seed: int
    model: torch.nn.Module
    exclusion: ConceptExclusion | None
    seconds: float
    losses: list[float] = field(default_factory=list)


def finetune_scenes(spec: WorldSpec = WorldSpec()) -> list[Scene]:
    """The fixed fine-tune data set (the same for every method and seed)."""
    return World(DATA_SEED, spec).scenes(DATA_SIZE, "finetune")


def dataset(method: Method, scenes: list[Scene]) -> tuple[list[Scene], list[str]]:
    """The scenes and captions a method trains on."""
    if method.data == "filter":
        scenes = [s for s in scenes if s.emblem != PROTECTED]
    if method.data == "scrub-name":
        return scenes, [replace(s, emblem=None).caption() if s.emblem == PROTECTED else s.caption() for s in scenes]
    if method.data == "secret-trigger":
        return scenes, [s.caption(SECRET_TRIGGER) if s.emblem == PROTECTED else s.caption() for s in scenes]
    if method.data == "scrub-word":
        return scenes, [s.caption("" if s.emblem == PROTECTED else None) for s in scenes]
    return scenes, [s.caption() for s in scenes]


def with_lora(base: Base, config: TrainConfig, seed: int) -> torch.nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    model = copy.deepcopy(base.model).requires_grad_(False)
    torch.manual_seed(seed)
    return inject_adapter_in_model(LoraConfig(r=config.rank, lora_alpha=config.rank, init_lora_weights="gaussian",
                                              target_modules=list(LORA_TARGETS)), model)


def concept_masks(method: Method, data: list[Scene], x_all: torch.Tensor) -> torch.Tensor | None:
    """[n, 1, 32, 32] masks of the panda in the training images (None: the method uses none)."""
    if method.masks == "true":
        return true_masks(data)
    if method.masks == "exemplars":
        return TemplateLocator.from_preset(world_preset(method.preset)).masks(x_all)
    return None


def subspace_for(base: Base, method: Method) -> ConceptSubspace:
    return ConceptSubspace.from_text_encoder(world_preset(method.preset, method.tokens), base.text.tokenizer,
                                             base.text.encoder)


def finetune(base: Base, method: Method, seed: int, config: TrainConfig = TrainConfig(),
             scenes: list[Scene] | None = None, progress: bool = True) -> Finetuned:
    """Fine-tune a LoRA on ``base`` by ``method``; returns the trained model (eval mode) and its exclusion."""
    t0 = time.time()
    data, captions = dataset(method, scenes if scenes is not None else finetune_scenes())
    x_all = images(data)
    masks = concept_masks(method, data, x_all)
    model = with_lora(base, config, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    exclusion = None
    if method.mode is not None:
        subspace = subspace_for(base, method)
        projection = subspace.preset.projection.overridden(mode=method.mode, targets=method.targets,
                                                           project_context=method.project_context)
        exclusion = ConceptExclusion.attach(model, subspace, projection, optimizer=opt)
    preservation = None
    if method.preserve is not None:
        preservation = OutputPreservation.from_preset(world_preset(method.preset), target=method.preserve,
                                                      weight=method.preserve_weight)
    guard = ExemplarGradientGuard(model, params, base.text.encode([""]), seed) if method.guard else None
    gen = torch.Generator().manual_seed(seed)
    sched = scheduler()
    model.train()
    losses = []
    bar = tqdm(range(config.steps), desc=f"{method.name} (seed {seed})", disable=not progress, leave=False)
    for _ in bar:
        idx = torch.randint(0, len(data), (config.batch,), generator=gen)
        drop = torch.rand(config.batch, generator=gen) < config.dropout
        batch_captions = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
        x0 = x_all[idx]
        xt, t = noisy(x0, gen, sched)
        if preservation is not None:
            loss = preservation.loss(model, xt, t, x0, batch_captions, base.text.encode,
                                     base_predict=base.model).total
        elif masks is not None:
            context = base.text.encode(batch_captions)
            target = None
            if method.region == "base":
                with torch.no_grad():
                    target = base.model(xt, t, context)
            loss = region_loss(model(xt, t, context), x0, masks[idx], target)
        else:
            loss = torch.nn.functional.mse_loss(model(xt, t, base.text.encode(batch_captions)), x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if guard is not None:
            guard.before_step()
        opt.step()
        if guard is not None:
            guard.after_step()
        losses.append(loss.item())
    if exclusion is not None:
        exclusion.uninstall()
    model.eval()
    return Finetuned(method, seed, model, exclusion, time.time() - t0, losses)
