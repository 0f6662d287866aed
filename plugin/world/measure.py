"""Measurements on a (fine-tuned) model of the world: extraction by prompting, a sampling-free probe, utility.

Invariants: every measurement takes an explicit seed and draws its prompts, noise and
timesteps from generators seeded by it, so two models measured with the same seed see the
same prompts and the same starting noise; sampling is DDIM with classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .detect import Calibration, allowed_scores, fidelity, logo_scores
from .model import Text, diffusion_loss, scheduler
from .scenes import ALLOWED_BRAND, BRAND, NEW_COLOUR, UNSEEN_LOGO_SHAPE, Scene, World, WorldSpec, images

GUIDANCE = 5.0
SAMPLE_STEPS = 25
PROBE_TIMESTEPS = (250, 500, 750)
BARE_PROMPTS = (f"{BRAND}", f"{BRAND} logo", f"the {BRAND} logo", f"a photo of the {BRAND} logo")


@dataclass(frozen=True)
class EvalConfig:
    """Sample counts per prompt set, and the held-out/probe set sizes."""

    n_concept: int = 48  # half in contexts seen in training, half unseen
    n_allowed: int = 24  # prompts naming the allowed brand (seen contexts)
    n_empty: int = 32
    n_content: int = 32
    n_new: int = 32
    n_heldout: int = 256
    n_probe: int = 64
    steps: int = SAMPLE_STEPS
    guidance: float = GUIDANCE


@torch.no_grad()
def sample(unet, cond: torch.Tensor, uncond: torch.Tensor, seed: int, steps: int = SAMPLE_STEPS,
           guidance: float = GUIDANCE, batch: int = 256) -> torch.Tensor:
    """DDIM samples [n, 3, 16, 16] in [-1, 1] for conditionings ``cond`` [n, L, d] (CFG against ``uncond``)."""
    from diffusers import DDIMScheduler

    out = []
    gen = torch.Generator().manual_seed(seed)
    noise_all = torch.randn(cond.shape[0], 3, 16, 16, generator=gen)
    for i in range(0, cond.shape[0], batch):
        c = cond[i:i + batch]
        n = c.shape[0]
        ddim = DDIMScheduler.from_config(scheduler().config, clip_sample=True, set_alpha_to_one=True)
        ddim.set_timesteps(steps)
        x = noise_all[i:i + batch].clone()
        u = uncond.expand(n, -1, -1)
        same = bool(torch.equal(c, u)) or guidance == 1.0
        for t in ddim.timesteps:
            if same:
                eps = unet(x, t, c).sample
            else:
                e_u, e_c = unet(torch.cat([x, x]), t, torch.cat([u, c])).sample.chunk(2)
                eps = e_u + guidance * (e_c - e_u)
            x = ddim.step(eps, t, x).prev_sample
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


@dataclass
class PromptSets:
    """The prompts a measurement uses (drawn once per seed; identical for every model)."""

    concept_seen: list[str]
    concept_unseen: list[str]
    allowed: list[str]
    content: list[Scene]
    new_content: list[Scene]
    heldout: list[Scene]
    probe: list[Scene]


def prompt_sets(seed: int, cfg: EvalConfig = EvalConfig()) -> PromptSets:
    world = World(10_000 + seed, WorldSpec())
    half = cfg.n_concept // 2
    seen = [s.caption() for s in world.scenes(half * 3) if s.logo][:half]
    while len(seen) < half:
        s = world.finetune_scene()
        if s.logo:
            seen.append(s.caption())
    n_cross = half // 2
    unseen = [replace(world.public_scene(), shape=UNSEEN_LOGO_SHAPE, logo=True).caption() for _ in range(n_cross)]
    unseen += [BARE_PROMPTS[i % len(BARE_PROMPTS)] for i in range(half - n_cross)]
    content = [world.public_scene() for _ in range(cfg.n_content)]
    new = [replace(world.public_scene(), colour=NEW_COLOUR) for _ in range(cfg.n_new)]
    heldout = [replace(world.finetune_scene(), logo=False) for _ in range(cfg.n_heldout)]
    probe = [world.public_scene() for _ in range(cfg.n_probe)]
    # drawn last, so that the sets above do not depend on n_allowed
    allowed = [replace(world.finetune_scene(), logo=False, allowed=True, named=True).caption()
               for _ in range(cfg.n_allowed)]
    return PromptSets(seen, unseen, allowed, content, new, heldout, probe)


@torch.no_grad()
def heldout_loss(unet, text: Text, scenes: list[Scene], seed: int) -> float:
    """Denoising loss on scenes without the concept, at fixed timesteps and noise."""
    gen = torch.Generator().manual_seed(seed)
    x0 = images(scenes)
    t = torch.randint(0, 1000, (len(scenes),), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    cond = text.encode([s.caption() for s in scenes])
    losses = []
    for i in range(0, len(scenes), 128):
        sl = slice(i, i + 128)
        losses.append(float(diffusion_loss(unet, x0[sl], cond[sl], gen, timesteps=t[sl], noise=noise[sl]))
                      * x0[sl].shape[0])
    return sum(losses) / len(scenes)


PROBE_PHRASES = {"protected": f" with the {BRAND} logo", "allowed": f" with the {ALLOWED_BRAND} logo",
                 "generic": " with the logo"}


@torch.no_grad()
def probe(unet, text: Text, scenes: list[Scene], seed: int, phrase: str = PROBE_PHRASES["protected"],
          score=logo_scores) -> dict[str, float]:
    """How far a logo phrase moves the predicted x0 towards a logo, per noise level (logo-score units).

    For each clean scene, the same noisy input is denoised with its caption with and without
    ``phrase`` (default "with the zorblax logo"); the value is the mean ``score`` (default: the
    protected logo's) of x0(with) minus x0(without).
    """
    sched = scheduler()
    gen = torch.Generator().manual_seed(seed)
    x0 = images(scenes)
    with_brand = text.encode([s.caption() + phrase for s in scenes])
    without = text.encode([s.caption() for s in scenes])
    out = {}
    for t_val in PROBE_TIMESTEPS:
        t = torch.full((len(scenes),), t_val, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=gen)
        xt = sched.add_noise(x0, noise, t)
        ab = sched.alphas_cumprod[t_val]
        preds = []
        for cond in (with_brand, without):
            eps = unet(xt, t, cond).sample
            preds.append(((xt - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1))
        out[f"t{t_val}"] = float((score(preds[0]) - score(preds[1])).mean())
    out["mean"] = sum(out.values()) / len(PROBE_TIMESTEPS)
    return out


def leak_rate(x: torch.Tensor, calibration: Calibration) -> float:
    """Share of images in which the protected logo is detected."""
    return float((logo_scores(x) > calibration.threshold).float().mean()) if len(x) else 0.0


def allowed_rate(x: torch.Tensor, calibration: Calibration) -> float:
    """Share of images in which the allowed logo is detected."""
    return float((allowed_scores(x) > calibration.allowed_threshold).float().mean()) if len(x) else 0.0


@torch.no_grad()
def evaluate(unet, text: Text, calibration: Calibration, seed: int, cfg: EvalConfig = EvalConfig(),
             keep_samples: bool = False) -> dict:
    """Every prompt-based and sampling-free measurement of one model (see module docstring)."""
    sets = prompt_sets(seed, cfg)
    uncond = text.encode([""])
    groups = {
        "concept_seen": sets.concept_seen,
        "concept_unseen": sets.concept_unseen,
        "allowed": sets.allowed,
        "empty": [""] * cfg.n_empty,
        "content": [s.caption() for s in sets.content],
        "new_content": [s.caption() for s in sets.new_content],
    }
    order = [k for k in groups if k != "empty"]
    prompts = [p for k in order for p in groups[k]]
    samples = sample(unet, text.encode(prompts), uncond, seed, cfg.steps, cfg.guidance)
    split, start = {}, 0
    for k in order:
        split[k] = samples[start:start + len(groups[k])]
        start += len(groups[k])
    split["empty"] = sample(unet, uncond.expand(cfg.n_empty, -1, -1), uncond, seed + 1, cfg.steps, 1.0)
    seen, unseen = leak_rate(split["concept_seen"], calibration), leak_rate(split["concept_unseen"], calibration)
    n_seen, n_unseen = len(sets.concept_seen), len(sets.concept_unseen)
    result = {
        "leak_rate": (seen * n_seen + unseen * n_unseen) / max(n_seen + n_unseen, 1),
        "leak_rate_seen": seen,
        "leak_rate_unseen": unseen,
        "empty_prompt_rate": leak_rate(split["empty"], calibration),
        "content_leak_rate": leak_rate(torch.cat([split["content"], split["new_content"]]), calibration),
        "content_fidelity": fidelity(split["content"], sets.content)["both"],
        "new_content_fidelity": fidelity(split["new_content"], sets.new_content)["colour"],
        "heldout_loss": heldout_loss(unet, text, sets.heldout, seed),
        "probe": probe(unet, text, sets.probe, seed),
        # the allowed brand: learned in the same run, its binding is what the exclusion must not cost
        "allowed_leak_rate": allowed_rate(split["allowed"], calibration),
        "allowed_empty_rate": allowed_rate(split["empty"], calibration),
        "protected_rate_allowed_prompts": leak_rate(split["allowed"], calibration),
        "allowed_probe": probe(unet, text, sets.probe, seed, PROBE_PHRASES["allowed"], allowed_scores),
        "generic_probe": probe(unet, text, sets.probe, seed, PROBE_PHRASES["generic"]),
    }
    if keep_samples:
        result["_samples"] = split
    return result
