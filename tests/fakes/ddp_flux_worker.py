"""Worker for tests/test_flux_distributed.py: train a tiny Flux transformer (PEFT LoRA on the dreambooth layers and
the text readers, exact mode + context projection) and save what it ended with.

Run by ``torchrun --nproc_per_node 2 tests/ddp_flux_worker.py OUT`` (gloo, CPU, DDP), or called in-process with
``world=1`` for the single-process reference. Every rank draws the same seeded global batch and trains on its
own slice, so the global batch is the same in all runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from concept_exclusion.concept.preset import Projection

GLOBAL_BATCH = 4
STEPS = 3
T5, POOLED, TOKENS = 48, 32, 6


def subspace():
    """Rank-4 context (T5-wide) and rank-3 pooled bases from seeded rows (same on every rank)."""
    from concept_exclusion import ConceptSubspace

    g = torch.Generator().manual_seed(7)
    rows = {"context": torch.randn(6, T5, generator=g, dtype=torch.float64),
            "pooled": torch.randn(4, POOLED, generator=g, dtype=torch.float64)}
    return ConceptSubspace.from_rows(rows, energy=0.9, max_rank=4)


def batch(step: int) -> dict[str, torch.Tensor]:
    from helpers.mmdit import flux_inputs

    g = torch.Generator().manual_seed(1000 + step)
    inputs = flux_inputs(GLOBAL_BATCH, seed=2000 + step)
    inputs["states"] = torch.randn(GLOBAL_BATCH, TOKENS, T5, generator=g)
    inputs["pooled"] = torch.randn(GLOBAL_BATCH, POOLED, generator=g)
    return inputs


def train(rank: int, world: int) -> dict:
    """STEPS SGD steps; the final weights of every parameter, the leakage and the number of targets."""
    from helpers.mmdit import FLUX_LORA, READERS, add_lora, loss_of

    from concept_exclusion import ConceptExclusion
    from concept_exclusion.testing.tiny_mmdit import flux_transformer

    model = add_lora(flux_transformer(joint_attention_dim=T5, pooled_projection_dim=POOLED), FLUX_LORA + READERS)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    exclusion = ConceptExclusion.attach(wrapped, subspace(), Projection(mode="exact"), optimizer=opt)
    per_rank = GLOBAL_BATCH // world
    for step in range(STEPS):
        full = batch(step)
        part = {k: (v if k == "img_ids" else v[rank * per_rank:(rank + 1) * per_rank]) for k, v in full.items()}
        states, pooled = part.pop("states"), part.pop("pooled")
        loss_of(wrapped, part, states, pooled).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    weights = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"weights": weights, "max_leakage": exclusion.max_leakage(), "targets": len(exclusion.targets),
            "project_context": exclusion.project_context}


def main() -> None:
    from fakes.ddp_worker import run_rank

    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    run_rank(train, args.out, ("max_leakage", "targets", "project_context"))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers and fakes
    main()
