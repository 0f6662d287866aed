"""Worker for tests/test_distributed.py: train a tiny UNet with the exclusion attached, save what it ended with.

Run by ``torchrun --nproc_per_node 2 tests/ddp_worker.py --wrap ddp|ddp-context|fsdp|fsdp-lora OUT`` (gloo, CPU), or
called in-process with ``world=1`` for the single-process reference. Every rank draws the same
seeded global batch and trains on its own slice, so the global batch is the same in all runs.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from concept_exclusion.model.plan import projection_of

GLOBAL_BATCH = 4
STEPS = 3
SEQ = 6
DIM = 32


def subspace():
    """A rank-4 basis of the 32-d context space from seeded rows (same on every rank)."""
    from concept_exclusion import ConceptSubspace

    g = torch.Generator().manual_seed(7)
    return ConceptSubspace.from_rows({"context": torch.randn(6, DIM, generator=g, dtype=torch.float64)},
                                     energy=0.9, max_rank=4)


def batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (GLOBAL_BATCH,), generator=g)
    ctx = torch.randn(GLOBAL_BATCH, SEQ, DIM, generator=g)
    target = torch.randn(GLOBAL_BATCH, 4, 8, 8, generator=g)
    return x, t, ctx, target


def constrained_weights(unet) -> dict[str, torch.Tensor]:
    """Full (gathered) to_k / to_v weights by canonical name, float32 on the CPU."""
    from concept_exclusion.hooks.dtensor import full_tensor
    from concept_exclusion.model.roles import canonical_name

    return {canonical_name(n): full_tensor(p.detach()).float().cpu().clone()
            for n, p in unet.named_parameters() if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))
            or ("attn2.to_" in n and ".lora_" in n)}


def train(wrap: str, rank: int, world: int) -> dict:
    """Train STEPS SGD steps; return final weights of every parameter, the initial k/v weights and leakage."""
    from concept_exclusion import ConceptExclusion
    from concept_exclusion.hooks.dtensor import full_tensor
    from concept_exclusion.testing.tiny import unet_sd

    torch.manual_seed(0)
    unet = unet_sd(cross_attention_dim=DIM, seed=0)
    lora = wrap.endswith("-lora")
    if lora:  # PEFT LoRA on the cross-attention, base frozen: the usual fine-tune
        from peft import LoraConfig

        unet.requires_grad_(False)
        torch.manual_seed(1)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=r".*attn2\.(to_k|to_v|to_out\.0)$"))
    initial = constrained_weights(unet)
    sub = subspace()
    if wrap.startswith("fsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(unet, mesh=init_device_mesh("cpu", (world,)))
        model = unet
    elif wrap.startswith("ddp"):
        model = torch.nn.parallel.DistributedDataParallel(unet)
    else:
        model = unet
    # SGD with momentum: Adam divides near-zero gradients (biases before GroupNorm) by their own size,
    # which turns float rounding of the reduction order into 1e-4 weight differences unrelated to us.
    opt = torch.optim.SGD([p for p in unet.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    exclusion = ConceptExclusion.attach(model, sub,
                                        projection_of(sub).overridden(mode="exact", targets="kv",
                                                                      project_context=wrap.endswith("-context")),
                                        optimizer=opt)
    per_rank = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, t, ctx, target = (v[rank * per_rank:(rank + 1) * per_rank] for v in batch(step))
        out = model(x, t, encoder_hidden_states=ctx).sample
        loss = torch.nn.functional.mse_loss(out, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in unet.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    from concept_exclusion.model.roles import canonical_name

    weights = {canonical_name(n): full_tensor(p.detach()).float().cpu().clone() for n, p in unet.named_parameters()}
    return {"weights": weights, "initial": initial, "max_leakage": exclusion.max_leakage(),
            "targets": len(exclusion.targets), "steps": exclusion.steps}


def run_rank(train_rank, out: Path, keys: tuple[str, ...]) -> None:
    """In a process started by torchrun: join the gloo group, run ``train_rank(rank, world)`` (every rank
    waits for the others before writing), and write ``out/rank<N>.safetensors`` (its weights) and
    ``out/rank<N>.json`` (``keys`` of its result, the world size and the pid)."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        result = train_rank(rank, world)
    finally:
        dist.barrier()
    out.mkdir(parents=True, exist_ok=True)
    save_file(result["weights"], str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps(
        {k: result[k] for k in keys} | {"world": world, "pid": os.getpid()}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--wrap", choices=("ddp", "ddp-context", "fsdp", "fsdp-lora"), required=True)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    run_rank(lambda rank, world: train(args.wrap, rank, world), args.out, ("max_leakage", "targets", "steps"))


if __name__ == "__main__":
    main()
