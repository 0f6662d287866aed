"""Cost of the concept-exclusion projection on real model shapes, against a naive baseline and a training step.

Run from a checkout:  python benchmarks/overhead.py [--quick] [--json PATH]

Cases: the cross-attention key/value weights of SD1.5 (16 blocks, [320|640|1280, 768]) and SDXL
(70 blocks, [640|1280, 2048], plus the pooled path add_embedding.linear_1 [1280, 2816]), with the
shapes typed in from the models' published UNet configs (nothing is downloaded), as full weights
and as PEFT LoRA (rank 16 and 64), for concept ranks 8, 32 and 128.

- ours: the hooks and the post-step projection installed by the real ``ConceptExclusion.attach``
  on a module tree carrying the real layer names and shapes; gradient mode = the hooks, exact
  mode = the hooks plus ``after_optimizer_step``.
- naive: research-code style (CUIG's gradient_projection.py): per step, per tensor, in a Python
  loop, build P = I - C (C^T C + lambda I)^-1 C^T from the concept matrix C (lambda = max(1e-4,
  1e-6 tr(C^T C)/k), pseudo-inverse when the condition number exceeds 1e10), then G <- G P.
- step: a real training step (forward, backward, clipping, AdamW) of a tiny diffusers UNet with
  768-d text on CPU, with and without exact mode attached, to express the cost as a share.
- memory: what the exclusion holds (device bases, stored W U, leakage snapshots, hook state).

All times are medians over repeated runs after warm-up, in one thread (torch.set_num_threads(1)), of
process CPU time on the CPU (wall-clock medians are recorded too, under "wall") and of synchronised
wall time on a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from concept_exclusion import ConceptExclusion, ConceptSubspace
from concept_exclusion.model.plan import projection_of
from concept_exclusion.options import AttachOptions

log = logging.getLogger("overhead")

# ---------------------------------------------------------------------------------------------
# Real shapes, typed in from the published UNet configs
# ---------------------------------------------------------------------------------------------
# SD1.5 (runwayml/stable-diffusion-v1-5 unet/config.json): block_out_channels [320, 640, 1280, 1280],
# layers_per_block 2, down = 3 x CrossAttnDownBlock2D + DownBlock2D, up = UpBlock2D + 3 x
# CrossAttnUpBlock2D, transformer_layers_per_block 1, cross_attention_dim 768.
SD15_CONTEXT = 768
SD15_BLOCKS = ([(f"down_blocks.{i}.attentions.{j}", c) for i, c in enumerate((320, 640, 1280)) for j in range(2)]
               + [("mid_block.attentions.0", 1280)]
               + [(f"up_blocks.{i}.attentions.{j}", c) for i, c in ((1, 1280), (2, 640), (3, 320)) for j in range(3)])
SD15_LAYERS = {path: 1 for path, _ in SD15_BLOCKS}
SD15_UNET_PARAMS = 859_520_964  # UNet2DConditionModel with the config above

# SDXL (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json): block_out_channels [320, 640, 1280],
# down = DownBlock2D + 2 x CrossAttnDownBlock2D, transformer_layers_per_block [1, 2, 10], mid 10 layers,
# up = 2 x CrossAttnUpBlock2D (3 attentions each) + UpBlock2D, cross_attention_dim 2048,
# projection_class_embeddings_input_dim 2816 (pooled 1280 + 6 x 256 time ids), time embedding 1280.
SDXL_CONTEXT = 2048
SDXL_POOLED = 1280
SDXL_ADD_IN = 2816
SDXL_BLOCKS = ([(f"down_blocks.1.attentions.{j}", 640) for j in range(2)]
               + [(f"down_blocks.2.attentions.{j}", 1280) for j in range(2)]
               + [("mid_block.attentions.0", 1280)]
               + [(f"up_blocks.0.attentions.{j}", 1280) for j in range(3)]
               + [(f"up_blocks.1.attentions.{j}", 640) for j in range(3)])
SDXL_LAYERS = {path: (2 if c == 640 else 10) for path, c in SDXL_BLOCKS}
SDXL_UNET_PARAMS = 2_567_463_684


def cross_attention_shapes(model: str) -> dict[str, tuple[int, int]]:
    """Layer path -> (in_features, out_features) of every constrained full weight ('kv' set)."""
    blocks, layers, context = ((SD15_BLOCKS, SD15_LAYERS, SD15_CONTEXT) if model == "sd15"
                               else (SDXL_BLOCKS, SDXL_LAYERS, SDXL_CONTEXT))
    shapes = {}
    for path, channels in blocks:
        for t in range(layers[path]):
            for proj in ("to_k", "to_v"):
                shapes[f"{path}.transformer_blocks.{t}.attn2.{proj}"] = (context, channels)
    if model == "sdxl":
        shapes["add_embedding.linear_1"] = (SDXL_ADD_IN, 1280)
    return shapes


def standard_lora_params(model: str, rank: int) -> int:
    """Trainable parameters of diffusers' usual UNet LoRA (to_q/to_k/to_v/to_out.0 of attn1 and attn2)."""
    blocks, layers, context = ((SD15_BLOCKS, SD15_LAYERS, SD15_CONTEXT) if model == "sd15"
                               else (SDXL_BLOCKS, SDXL_LAYERS, SDXL_CONTEXT))
    total = 0
    for path, c in blocks:
        per_block = 8 * c + (2 * c + 2 * (context + c) + 2 * c)  # attn1 q,k,v,out; attn2 q, k, v, out
        total += layers[path] * rank * per_block
    return total


class _Node(nn.Module):
    """An empty container so that a module tree can carry diffusers' dotted layer names."""


def build_model(shapes: dict[str, tuple[int, int]], seed: int = 0) -> nn.Module:
    """A module tree with an ``nn.Linear`` (no bias) at every path, weights ~ N(0, 0.02)."""
    gen = torch.Generator().manual_seed(seed)
    root = _Node()
    for path, (fan_in, fan_out) in shapes.items():
        parent = root
        *parents, leaf = path.split(".")
        for part in parents:
            if part not in parent._modules:
                parent.add_module(part, _Node())
            parent = parent._modules[part]
        layer = nn.Linear(fan_in, fan_out, bias=False)
        with torch.no_grad():
            layer.weight.normal_(0.0, 0.02, generator=gen)
        parent.add_module(leaf, layer)
    return root


def concept_matrix(dim: int, rank: int, seed: int) -> torch.Tensor:
    """[dim, rank] concept vectors like text-encoder states: a shared component plus individual ones."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(dim, 1, generator=gen, dtype=torch.float64) * 3.0
    return common + torch.randn(dim, rank, generator=gen, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def interleaved_ms(fns: dict[str, Callable[[], object]], warmup: int = 2, min_runs: int = 5, max_runs: int = 40,
                   budget_s: float = 2.0) -> tuple[dict[str, float], dict[str, float], int]:
    """Median CPU ms and median wall ms of each function, timed in turns (one call of each per round).

    CPU time (``time.process_time``: this process's CPU seconds, one compute thread) is the primary
    figure: on a machine shared with other jobs, wall time also counts the slices the scheduler
    gives to them (measured here: load average 5-7 on 2 cores, so a 1.5 ms call was often preempted
    and its wall median jumped 2-4x between runs). Taking turns spreads the rest of the noise alike.
    A cheap function (< 50 ms) is called once untimed before its timed call: right after the naive
    baseline frees its large matrices the allocator returns memory to the system, and the next call
    would pay page faults that belong to the baseline.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    wall: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_runs or (rounds < max_runs and time.perf_counter() - start < budget_s * len(fns)):
        for key, fn in fns.items():
            if not wall[key] or wall[key][-1] < 0.05:
                fn()
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[key].append(time.perf_counter() - t0)
            cpu[key].append(time.process_time() - c0)
        rounds += 1
    return ({k: statistics.median(v) * 1e3 for k, v in cpu.items()},
            {k: statistics.median(v) * 1e3 for k, v in wall.items()}, rounds)


# ---------------------------------------------------------------------------------------------
# The naive baseline (research-code style)
# ---------------------------------------------------------------------------------------------
class NaiveProjection:
    """Per step and per tensor: build the dense projector from the concept matrix, then G <- G P.

    Like CUIG's ``gradient_projection.py``: lambda = max(1e-4, 1e-6 tr(C^T C) / k); the inverse is
    a pseudo-inverse when cond(C^T C + lambda I) > 1e10; every value is read back to Python.
    """

    def __init__(self, concepts: list[torch.Tensor]) -> None:
        self.concepts = concepts  # per tensor: [in_features, k] float32

    @staticmethod
    def projector(c: torch.Tensor) -> torch.Tensor:
        dim, k = c.shape
        ctc = c.T @ c
        lam = max(1e-4, 1e-6 * torch.trace(ctc).item() / k)
        m = ctc + lam * torch.eye(k, dtype=c.dtype)
        inv = torch.linalg.pinv(m) if torch.linalg.cond(m).item() > 1e10 else torch.linalg.inv(m)
        return torch.eye(dim, dtype=c.dtype) - c @ inv @ c.T

    def __call__(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        return [g @ self.projector(c) for g, c in zip(grads, self.concepts)]


# ---------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------
@dataclass
class Case:
    model: str  # sd15 | sdxl
    kind: str  # full | lora
    lora_rank: int | None
    concept_rank: int

    @property
    def name(self) -> str:
        kind = "full" if self.kind == "full" else f"lora{self.lora_rank}"
        return f"{self.model}-{kind}-k{self.concept_rank}"


def build_case(case: Case, mode: str, leakage_snapshots: bool = True):
    """(model, subspace, exclusion, concept matrices per target, gradients per target)."""
    shapes = cross_attention_shapes(case.model)
    model = build_model(shapes)
    context_dim = SD15_CONTEXT if case.model == "sd15" else SDXL_CONTEXT
    context_c = concept_matrix(context_dim, case.concept_rank, seed=1)
    rows = {"context": context_c.T}
    pooled_c = None
    if case.model == "sdxl":
        pooled_c = concept_matrix(SDXL_POOLED, case.concept_rank, seed=2)
        rows["pooled"] = pooled_c.T
    subspace = ConceptSubspace.from_rows(rows, energy=1.0, max_rank=case.concept_rank, encoder="benchmark")
    if case.kind == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        modules = ["to_k", "to_v"] + (["linear_1"] if case.model == "sdxl" else [])
        model = inject_adapter_in_model(LoraConfig(r=case.lora_rank, lora_alpha=case.lora_rank,
                                                   target_modules=modules), model)
    for name, p in model.named_parameters():
        p.requires_grad_(case.kind == "full" or "lora_" in name)
    exclusion = ConceptExclusion.attach(model, subspace,
                                        projection_of(subspace).overridden(mode=mode, strength=1.0, targets="kv"),
                                        options=AttachOptions(leakage_snapshots=leakage_snapshots))
    concepts, grads = [], []
    gen = torch.Generator().manual_seed(3)
    for t in exclusion.targets:
        c = context_c if t.role in ("key", "value") else torch.cat(
            [pooled_c, torch.zeros(SDXL_ADD_IN - SDXL_POOLED, case.concept_rank, dtype=torch.float64)])
        concepts.append(c.float())
        grads.append(torch.randn(t.param.shape, generator=gen) * 1e-3)
    return model, subspace, exclusion, concepts, grads


def held_memory(exclusion: ConceptExclusion) -> dict[str, int]:
    """Bytes the exclusion keeps alive beyond the model (``ConceptExclusion.memory``) and the host fp64 bases."""
    held = exclusion.memory()
    host = {id(t.basis): t.basis for t in exclusion.targets} | {id(u): u for u in exclusion.subspace.bases.values()}
    return {"device_bases": held["device_bases"], "stored_wu": held["stored"], "snapshots": held["snapshots"],
            "host_bases_fp64": sum(u.numel() * u.element_size() for u in host.values()), "hook_state": 0,
            "hooks": held["constraints"]}


def deferred_batched(exclusion: ConceptExclusion, grads: list[torch.Tensor]) -> Callable[[], None]:
    """The alternative design: one projection of all same-basis gradients after backward
    (what a post-accumulate hook + queue_callback would run), timed on the same tensors."""
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(exclusion.targets):
        groups.setdefault(id(t.basis), []).append(i)
    plan = [(exclusion.targets[idx[0]].basis.to(grads[idx[0]].device, grads[idx[0]].dtype), [grads[i] for i in idx])
            for idx in groups.values()]

    def run() -> None:
        for basis, gs in plan:
            g = torch.cat(gs)
            clean = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
            out = torch.addmm(g, clean @ basis, basis.T, alpha=-1.0)
            torch._foreach_copy_(gs, list(out.split([x.shape[0] for x in gs])))

    return run


def run_case(case: Case, budget_s: float) -> dict:
    """Time naive vs ours (gradient and exact mode) on one case; check they agree."""
    model, subspace, exclusion, concepts, grads = build_case(case, "exact",
                                                             leakage_snapshots=case.model == "sd15")
    targets = exclusion.targets
    hooks = [list(t.param._backward_hooks.values()) for t in targets]
    assert all(len(h) == 1 for h in hooks), "expected exactly one projection hook per target"
    pairs = [(h[0], g) for h, g in zip(hooks, grads)]

    def ours_grad() -> None:
        for hook, g in pairs:
            hook(g)

    def ours_exact() -> None:
        ours_grad()
        exclusion.after_optimizer_step()

    naive = NaiveProjection(concepts)
    big = case.model == "sdxl" and case.kind == "full"
    runs = dict(warmup=1, min_runs=3, max_runs=3, budget_s=0.0) if big else dict(budget_s=budget_s)
    # agreement: ours and naive project the same gradient the same way (naive has its lambda ridge)
    ours_out = [hook(g) for hook, g in pairs[:3]]
    naive_out = naive(grads[:3])
    agree = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(ours_out, naive_out))
    fns = {"naive": lambda: naive(grads), "gradient": ours_grad, "exact": ours_exact,
           "post": exclusion.after_optimizer_step}
    if case.kind == "lora":
        fns["deferred"] = deferred_batched(exclusion, grads)
    ms, wall, rounds = interleaved_ms(fns, **runs)
    naive_ms, grad_ms, exact_ms, post_ms = ms["naive"], ms["gradient"], ms["exact"], ms["post"]
    row = {
        "case": case.name, "model": case.model, "kind": case.kind, "lora_rank": case.lora_rank,
        "concept_rank": case.concept_rank, "targets": len(targets),
        "constrained_elements": sum(t.param.numel() for t in targets),
        "naive_ms": round(naive_ms, 3), "ours_gradient_ms": round(grad_ms, 3), "ours_exact_ms": round(exact_ms, 3),
        "post_step_ms": round(post_ms, 3),
        "naive_over_ours": round(naive_ms / grad_ms, 1), "naive_over_ours_exact": round(naive_ms / exact_ms, 1),
        "runs": rounds, "clock": "process CPU time (wall-clock medians under 'wall')",
        "wall": {"naive_ms": round(wall["naive"], 3), "ours_gradient_ms": round(wall["gradient"], 3),
                 "ours_exact_ms": round(wall["exact"], 3), "post_step_ms": round(wall["post"], 3),
                 "naive_over_ours": round(wall["naive"] / wall["gradient"], 1),
                 "naive_over_ours_exact": round(wall["naive"] / wall["exact"], 1)},
        "max_rel_diff_vs_naive": float(f"{agree:.2e}"),
    }
    if case.kind == "lora":
        row["deferred_batched_ms"] = round(ms["deferred"], 3)
    # exact mode keeps (W_eff - W_eff0) U = 0: check it after a random update
    with torch.no_grad():
        for t in targets:
            t.param.add_(torch.randn_like(t.param) * 1e-2)
            if t.other is not None:
                t.other.add_(torch.randn_like(t.other) * 1e-2)
    exclusion.after_optimizer_step()
    row["max_leakage_after_step"] = float(f"{exclusion.max_leakage():.2e}")
    mem = held_memory(exclusion)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    extra = mem["device_bases"] + mem["stored_wu"] + mem["snapshots"]
    row.update({"memory": mem, "trainable_bytes": trainable, "extra_bytes": extra,
                "extra_share_of_trainable": float(f"{extra / trainable:.3e}")})
    if case.kind == "lora":
        standard = standard_lora_params(case.model, case.lora_rank) * 4
        row["standard_lora_bytes"] = standard
        row["extra_share_of_standard_lora"] = float(f"{extra / standard:.3e}")
    else:
        unet = (SD15_UNET_PARAMS if case.model == "sd15" else SDXL_UNET_PARAMS) * 4
        row["unet_bytes"] = unet
        row["extra_share_of_unet"] = float(f"{extra / unet:.3e}")
        if case.model == "sdxl":  # attached without snapshots here; what keeping them costs:
            row["snapshot_bytes_if_kept"] = sum(t.param.numel() * 4 for t in targets)
    exclusion.uninstall()
    return row


# ---------------------------------------------------------------------------------------------
# A real training step of a tiny UNet
# ---------------------------------------------------------------------------------------------
SD15_UNET_CONFIG = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json (other fields: diffusers defaults)
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=SD15_CONTEXT, attention_head_dim=8, norm_num_groups=32)
TINY_UNET_CONFIG = dict(  # concept_exclusion.testing.tiny.unet_sd with SD1's 768-d text
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=SD15_CONTEXT, attention_head_dim=8, norm_num_groups=32)


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Seconds ``fn`` costs: process CPU time on the CPU (see ``interleaved_ms``), synchronised wall time on a GPU."""
    def timed(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize(device)
            return time.perf_counter() - t0
        c0 = time.process_time()
        fn()
        return time.process_time() - c0
    return timed


def _cuda_sync_check(fn: Callable[[], object]) -> str:
    """Run ``fn`` under torch.cuda.set_sync_debug_mode('error'): 'none' or the error's first line."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "none"
    except RuntimeError as exc:
        return "synchronised: " + str(exc).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def step_rows(label: str, config: dict, batch: int, kinds: tuple[str, ...], steps: int, concept_rank: int = 32,
              device: str = "cpu", autocast: torch.dtype | None = None) -> list[dict]:
    """Exact mode's cost as a share of a real UNet training step (forward, backward, clip, AdamW).

    The same model is built twice from ``config`` (seeded): one plain, one with exact mode attached
    (kv targets, post-step work registered on its optimizer); their steps are timed in turns.
    The projection's own cost (its hooks on the step's real gradients + ``after_optimizer_step``)
    is also timed alone: ``overhead_share`` = that / the plain step; ``ab_share`` = the difference
    of the two steps' medians / the plain step (noisier: two noisy medians).
    """
    from diffusers import UNet2DConditionModel

    dev = torch.device(device)
    timed = _timer(dev)
    latent = config["sample_size"]
    rows = []
    for kind in kinds:
        def make(attached: bool):
            torch.manual_seed(0)
            unet = UNet2DConditionModel(**config).to(dev)
            if kind.startswith("lora"):
                from peft import LoraConfig

                r = int(kind[4:])
                unet.requires_grad_(False)
                unet.add_adapter(LoraConfig(r=r, lora_alpha=r, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
            params = [p for p in unet.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
            ex = None
            if attached:
                sub = ConceptSubspace.from_rows({"context": concept_matrix(SD15_CONTEXT, concept_rank, 1).T},
                                                energy=1.0, max_rank=concept_rank, encoder="benchmark")
                ex = ConceptExclusion.attach(unet, sub, projection_of(sub).overridden(mode="exact", targets="kv"),
                                             optimizer=opt)
            return unet, params, opt, ex

        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 4, latent, latent, generator=gen).to(dev)
        noise = torch.randn(batch, 4, latent, latent, generator=gen).to(dev)
        ctx = torch.randn(batch, 77, SD15_CONTEXT, generator=gen).to(dev)
        t = torch.randint(0, 1000, (batch,), generator=gen).to(dev)

        def loss_of(unet):
            with torch.autocast(dev.type, dtype=autocast, enabled=autocast is not None):
                return (unet(x, t, encoder_hidden_states=ctx).sample.float() - noise).pow(2).mean()

        def stepper(unet, params, opt):
            def step() -> None:
                loss_of(unet).backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            return step

        plain = make(False)
        with_ex = make(True)
        plain_step, ex_step = stepper(*plain[:3]), stepper(*with_ex[:3])
        for _ in range(2):
            plain_step()
            ex_step()
        plain_t, ex_t = [], []
        for _ in range(steps):  # in turns, so that machine load hits both alike
            plain_t.append(timed(plain_step))
            ex_t.append(timed(ex_step))
        unet, params, opt, ex = with_ex
        loss_of(unet).backward()
        pairs = [(list(tg.param._backward_hooks.values())[0], tg.param.grad.clone()) for tg in ex.targets]

        def projection() -> None:
            for hook, g in pairs:
                hook(g)
            ex.after_optimizer_step()

        for _ in range(3):
            projection()
        proj = [timed(projection) for _ in range(40)]
        proj_ms = statistics.median(proj) * 1e3
        step_ms, step_with_ms = statistics.median(plain_t) * 1e3, statistics.median(ex_t) * 1e3
        trainable = sum(p.numel() for p in plain[1])
        mem = held_memory(ex)
        extra = mem["device_bases"] + mem["stored_wu"] + mem["snapshots"]
        row = {
            "case": f"{label}-{kind}-k{concept_rank}-b{batch}", "model": label, "kind": kind,
            "device": str(dev), "autocast": str(autocast) if autocast else None, "batch": batch,
            "latent": latent, "concept_rank": concept_rank, "targets": len(ex.targets), "trainable_params": trainable,
            "step_ms": round(step_ms, 2), "step_with_exclusion_ms": round(step_with_ms, 2),
            "ours_exact_ms": round(proj_ms, 3), "overhead_share": float(f"{proj_ms / step_ms:.3e}"),
            "ab_share": float(f"{(step_with_ms - step_ms) / step_ms:.3e}"), "runs": {"steps": steps, "projection": 40},
            "clock": "process CPU time" if dev.type == "cpu" else "wall time, synchronised",
            "naive_over_ours": None, "max_leakage": float(f"{ex.max_leakage():.2e}"),
            "extra_bytes": extra, "extra_share_of_trainable": float(f"{extra / (trainable * 4):.3e}"),
        }
        if dev.type == "cuda":
            row["sync_in_projection"] = _cuda_sync_check(projection)
            row["sync_in_step"] = _cuda_sync_check(ex_step)
            row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(dev)
        rows.append(row)
        ex.uninstall()
        del plain, with_ex, unet, params, opt, ex, pairs
    return rows


# ---------------------------------------------------------------------------------------------
def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": str(os.cpu_count()), "threads_used": str(torch.get_num_threads()),
            "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}


def print_table(rows: list[dict]) -> None:
    cols = [("case", 22, "s"), ("targets", 7, "d"), ("naive_ms", 10, ".2f"), ("ours_gradient_ms", 10, ".3f"),
            ("ours_exact_ms", 10, ".3f"), ("naive_over_ours", 9, ".1f"), ("naive_over_ours_exact", 9, ".1f"),
            ("step_ms", 9, ".1f"), ("overhead_share", 9, ".2%"), ("extra_bytes", 12, "d"),
            ("extra_share_of_trainable", 9, ".2%")]
    heads = ["case", "targets", "naive ms", "grad ms", "exact ms", "naive/grad", "naive/exact", "step ms",
             "exact/step", "extra B", "extra/train"]
    print("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, (_, w, _)) in enumerate(zip(heads, cols))))
    for r in rows:
        cells = []
        for i, (key, width, fmt) in enumerate(cols):
            v = r.get(key)
            text = "-" if v is None else format(v, fmt)
            cells.append(text.ljust(width) if i == 0 else text.rjust(width))
        print("  ".join(cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the SD1.5 concept-rank-32 cases (< 1 min)")
    parser.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    parser.add_argument("--only", default="", help="run only cases whose name contains this text")
    parser.add_argument("--no-step", action="store_true", help="skip the tiny UNet training-step rows")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of repeated runs per timing")
    parser.add_argument("--step-batch", type=int, default=4, help="batch of the tiny UNet step")
    parser.add_argument("--steps", type=int, default=9, help="timed tiny UNet steps per variant")
    parser.add_argument("--sd15-step", action="store_true",
                        help="also time the SD1.5 UNet (random weights, 64x64 latents, batch 1 and 4, LoRA 16); "
                             "on by default when a GPU is present (bf16 autocast there)")
    parser.add_argument("--sd15-batches", default="1,4", help="batches of the SD1.5 UNet step (comma-separated)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    cases = [Case(m, kind, r, k) for m in ("sd15", "sdxl") for kind, r in (("full", None), ("lora", 16), ("lora", 64))
             for k in (8, 32, 128)]
    if args.quick:
        cases = [c for c in cases if c.model == "sd15" and c.concept_rank == 32]
    cases = [c for c in cases if args.only in c.name]
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    rows = []
    it = tqdm(cases, desc="cases", file=sys.stderr) if tqdm else cases
    for case in it:
        rows.append(run_case(case, args.budget))
    if not args.quick and not args.no_step and (not args.only or "tiny" in args.only):
        rows += step_rows("tiny-unet", TINY_UNET_CONFIG, args.step_batch, ("lora16", "full"), args.steps)
    if args.sd15_step or (torch.cuda.is_available() and not args.quick and not args.no_step):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        for batch in (int(b) for b in args.sd15_batches.split(",")):
            rows += step_rows("sd15-unet", SD15_UNET_CONFIG, batch, ("lora16",), args.steps, device=device,
                              autocast=torch.bfloat16 if device == "cuda" else None)
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores ({info['threads_used']} thread used), "
          f"torch {info['torch']}, GPU: {info['gpu']}")
    print_table(rows)
    if args.json:
        for r in rows:
            r["machine"] = info
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
