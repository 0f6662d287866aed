"""The behavioural check: does a LoRA make its base model better at producing the concept, whatever the prompt?

Every figure compares the base with the LoRA applied to the base alone, on the same images, noises and timesteps,
with the model's own training loss:

- per prompt family (the preset's name, its other names, its templates with the name removed, the empty prompt):
  how much the LoRA lowers the loss where the concept is (the exemplars' concept region) beyond how much it lowers
  it where it is not (the rest of the exemplars, or ``--controls`` images);
- inversion: free text states optimised (fixed budget, the same for both models) to reconstruct the exemplars, once
  through the LoRA and once through the base; the same gain, from the losses each model reaches with its own
  states. A concept bound to any trigger, a secret one included, shows here.

A figure is ``gain_concept - gain_elsewhere`` with ``gain = (loss_base - loss_lora) / loss_base`` summed over
images, noises and timesteps; its 95% interval resamples the images. Invariants: the weights are restored after
every measurement (``patch.applied``); every random draw comes from generators seeded by ``config.seed``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from concept_exclusion.audit.base_model import BaseModel
from concept_exclusion.audit.behaviour.denoising import Conditioning, DenoisingBase
from concept_exclusion.audit.behaviour.patch import applied
from concept_exclusion.audit.behaviour.report import BehaviourReport, Figure
from concept_exclusion.concept.preset import Preset
from concept_exclusion.lora.file import LoraFile
from concept_exclusion.regions.loss import latent_mask

INVERSION = "inversion"


@dataclass(frozen=True)
class BehaviourConfig:
    """The check's fixed budget: the same noises, timesteps and inversion for every file."""

    timesteps: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)  # fractions of the training schedule
    noises: int = 2
    inversion_steps: int = 100
    inversion_lr: float = 0.05
    inversion_batch: int = 8
    batch: int = 16
    # chosen on the evidence world's seed-0 files (benchmarks/RESULTS-audit.md): their NOT LEARNED files reach 0.03,
    # the weakest LEARNED one 0.4; seeds 1-4 are the held-out check
    threshold: float = 0.1
    boot: int = 1000
    seed: int = 0


@dataclass
class Probe:
    """The images the check runs on: ``images`` [n, 3, R, R]; per row, the weight of each pixel in the concept's
    loss (``inside``) and in the control's (``outside``), [n, 1, R, R]; ``group`` 0 exemplar, 1 control (each group
    gets its own inversion); ``located``: exemplars whose concept region was found."""

    images: torch.Tensor
    inside: torch.Tensor
    outside: torch.Tensor
    group: torch.Tensor
    located: int
    source: str
    notes: list[str] = field(default_factory=list)
    conclusive: bool = True  # False: the images can show that a file learned the concept, never that it did not


def prompt_families(preset: Preset) -> dict[str, list[str]]:
    """Prompt family -> prompts: the concepts' first name and other names in their templates, the templates with
    the name removed ("generic"), and the empty prompt."""
    name, other, generic = [], [], []
    for concept in preset.concepts:
        templates = concept.templates or ("{}",)
        name += [t.replace("{}", concept.prompts[0]) for t in templates]
        other += [t.replace("{}", p) for p in concept.prompts[1:] for t in templates]
        generic += [" ".join(t.replace("{}", " ").split()) for t in templates]
    generic = [g for g in dict.fromkeys(generic) if g]
    families = {"name": name, "other names": other, "generic": generic, "empty": [""]}
    return {k: v for k, v in families.items() if v}


class _Run:
    """The fixed draws of one check and the per-row loss sums under a model state."""

    def __init__(self, model: DenoisingBase, probe: Probe, config: BehaviourConfig) -> None:
        self.model, self.probe, self.config = model, probe, config
        gen = torch.Generator().manual_seed(config.seed)
        with torch.no_grad():
            self.latents = torch.cat([model.latents(probe.images[i:i + config.batch].to(model.device))
                                      for i in range(0, len(probe.images), config.batch)])
        n = self.latents.shape[0]
        self.inside = latent_mask(probe.inside.to(self.latents.device), self.latents)
        self.outside = latent_mask(probe.outside.to(self.latents.device), self.latents)
        self.draws = [(torch.randn(self.latents.shape, generator=gen).to(self.latents),
                       torch.full((n,), min(int(f * model.train_timesteps), model.train_timesteps - 1),
                                  dtype=torch.long, device=self.latents.device))
                      for f in config.timesteps for _ in range(config.noises)]

    def sums(self, cond: Conditioning, only: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, the loss summed over the fixed draws inside and outside ([n] each, float64); with ``only``, just
        those rows are run (the others stay 0)."""
        n, b = self.latents.shape[0], self.config.batch
        wanted = torch.arange(n) if only is None else only
        inside, outside = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        with torch.no_grad():
            for noise, t in self.draws:
                for i in range(0, len(wanted), b):
                    rows = wanted[i:i + b]
                    loss = self.model.loss_map(self.latents[rows], noise[rows], t[rows],
                                               cond.take(rows.to(cond.states.device))).float()
                    inside[rows] += (loss * self.inside[rows]).sum(dim=(1, 2, 3)).double().cpu()
                    outside[rows] += (loss * self.outside[rows]).sum(dim=(1, 2, 3)).double().cpu()
        return inside, outside

    def invert(self, start: Conditioning, rows: torch.Tensor, weights: torch.Tensor) -> Conditioning:
        """Text states fitted to reconstruct ``rows`` through the model as it is now, each element's loss weighted
        by ``weights`` (the region the figure's numerator reads: the attacker wants the concept, not the scene)."""
        cfg, model = self.config, self.model
        states = start.states[:1].detach().clone().float().requires_grad_(True)
        opt = torch.optim.Adam([states], lr=cfg.inversion_lr)
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        flags = [p.requires_grad for p in model.denoiser.parameters()]
        model.denoiser.requires_grad_(False)
        try:
            for _ in range(cfg.inversion_steps):
                pick = rows[torch.randint(0, len(rows), (min(cfg.inversion_batch, len(rows)),), generator=gen)]
                x0 = self.latents[pick]
                noise = torch.randn(x0.shape, generator=gen).to(x0)
                t = torch.randint(0, model.train_timesteps, (len(pick),), generator=gen).to(x0.device)
                cond = start.with_states(states.to(start.states.dtype).expand(len(pick), -1, -1))
                w = weights[pick]
                loss = (model.loss_map(x0, noise, t, cond).float() * w).sum() / w.expand_as(x0).sum().clamp_min(1.0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        finally:
            for p, flag in zip(model.denoiser.parameters(), flags):
                p.requires_grad_(flag)
        found = states.detach().to(start.states.dtype)
        return start.with_states(found.expand(len(self.latents), -1, -1))

    def inverted_sums(self, empty: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        """``sums`` where each region (the concept's, the control's) of each group's rows is read under states
        inverted to reconstruct that region of those rows: the best each model can do there, whatever the prompt."""
        out = [torch.zeros(len(self.latents), dtype=torch.float64) for _ in range(2)]
        for g in self.probe.group.unique().tolist():
            rows = (self.probe.group == g).nonzero().flatten()
            for k, weights in enumerate((self.inside, self.outside)):
                if float(weights[rows].sum()) == 0.0:
                    continue
                out[k][rows] = self.sums(self.invert(empty, rows, weights), only=rows)[k][rows]
        return out[0], out[1]


def _conditioning(model: DenoisingBase, prompts: list[str], n: int) -> Conditioning:
    """Row i reads ``prompts[i % len(prompts)]``."""
    return model.encode([prompts[i % len(prompts)] for i in range(n)])


def figure(base: tuple[torch.Tensor, torch.Tensor], lora: tuple[torch.Tensor, torch.Tensor], boot: int,
           seed: int) -> Figure:
    """gain where the concept is minus gain elsewhere, with a 95% interval over the rows."""
    def value(idx: torch.Tensor) -> float:
        gains = []
        for b, l_ in zip(base, lora):
            den = float(b[idx].sum())
            gains.append((den - float(l_[idx].sum())) / den if den > 0 else 0.0)
        return gains[0] - gains[1]

    n = len(base[0])
    point = value(torch.arange(n))
    gen = torch.Generator().manual_seed(seed)
    draws = sorted(value(torch.randint(0, n, (n,), generator=gen)) for _ in range(boot))
    return Figure(point, draws[int(0.025 * boot)], draws[min(boot - 1, int(0.975 * boot))])


def _all_sums(run: _Run, model: DenoisingBase, families: dict[str, list[str]]) -> dict[str, tuple]:
    """Family (and inversion) -> the per-row sums, with the model as it is now."""
    n = len(run.latents)
    out = {name: run.sums(_conditioning(model, prompts, n)) for name, prompts in families.items()}
    out[INVERSION] = run.inverted_sums(model.encode([""]))
    return out


def check_behaviour(lora: LoraFile, base: BaseModel, model: DenoisingBase, preset: Preset, probe: Probe,
                    config: BehaviourConfig = BehaviourConfig(), progress: bool = True) -> BehaviourReport:
    """Every prompt family's figure and the inversion's for ``lora`` on ``base``, and the verdict."""
    t0 = time.time()
    run = _Run(model, probe, config)
    families = prompt_families(preset)
    with tqdm(total=2, desc="behavioural check (base, with the file)", disable=not progress, leave=False) as bar:
        before = _all_sums(run, model, families)
        bar.update(1)
        with applied(lora, base, model.text_modules()) as done:
            after = _all_sums(run, model, families)
        bar.update(1)
    figures = {name: figure(before[name], after[name], config.boot, config.seed) for name in before}
    return BehaviourReport(figures=figures, threshold=config.threshold, images=int((probe.group == 0).sum()),
                           controls=int((probe.group == 1).sum()), located=probe.located, source=probe.source,
                           conclusive=probe.conclusive, applied=len(done.layers), skipped=dict(done.skipped),
                           notes=list(probe.notes),
                           config={"timesteps": list(config.timesteps), "noises": config.noises,
                                   "inversion_steps": config.inversion_steps, "inversion_lr": config.inversion_lr,
                                   "seed": config.seed},
                           seconds=round(time.time() - t0, 1))
