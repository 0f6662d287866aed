"""Cost of concept exclusion on Flux.1-dev shapes, against a naive baseline and a training step.

Run from a checkout:  python benchmarks/overhead_flux.py [--quick] [--json PATH] [--markdown PATH]

In an MMDiT only the layers at the entrance read the text encoders' states: diffusers'
``context_embedder`` (T5, [3072, 4096]) and ``time_text_embed.text_embedder.linear_1`` (CLIP pooled,
[3072, 768]). So the exclusion's cost does not grow with the 19 double + 38 single blocks: it is
the context projection of B x 512 x 4096 T5 states (and the pooled vector) per training pass, plus,
in exact mode, the gradient hooks and the post-step projection of those two layers' weights.

- ours: the hooks installed by the real ``ConceptExclusion.attach(..., project_context=True)`` on a
  module tree carrying diffusers' Flux layer names and Flux.1-dev shapes (full weights or PEFT LoRA
  rank 16 on the readers): the context projection (forward pre-hooks on the readers, timed on
  B x 512 x 4096 T5 states and B x 768 pooled vectors) and exact mode (gradient hooks +
  ``after_optimizer_step``).
- naive: research-code style (``overhead.NaiveProjection``, after CUIG): per step, per tensor, build
  the dense projector P = I - C (C^T C + lambda I)^-1 C^T from the concept matrix and multiply
  (states ``x P``; gradients ``G P``).
- step: a real training step (forward, flow-matching MSE, backward, clipping, AdamW) of a diffusers
  ``FluxTransformer2DModel`` with Flux.1-dev's widths (3072, 24 heads of 128, T5 4096 x 512 tokens,
  pooled 768, guidance embedding) but only ``--double``/``--single`` blocks (CPU: 1 + 1), PEFT LoRA
  rank 16 on the dreambooth script's default layers plus ``context_embedder``, plain and with exact
  mode + context projection attached, timed in turns. The whole model's step is estimated by scaling
  the measured step by parameter count (the step is matmul-bound: cost ~ parameters x tokens); the
  projection's cost does not scale with the blocks, so it is not scaled.

Shapes are typed in from black-forest-labs/FLUX.1-dev transformer/config.json (nothing is downloaded).
Times: medians, one thread, process CPU time on the CPU, synchronised wall time on a GPU (as overhead.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import (NaiveProjection, _cuda_sync_check, _timer, build_model, concept_matrix,  # noqa: E402
                      held_memory, interleaved_ms, machine)

from concept_exclusion import ConceptExclusion, ConceptSubspace  # noqa: E402
from concept_exclusion.concept.preset import Projection
from concept_exclusion.model.plan import projection_of
from concept_exclusion.options import AttachOptions

log = logging.getLogger("overhead_flux")

# black-forest-labs/FLUX.1-dev transformer/config.json
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
WIDTH, T5_WIDTH, POOLED, T5_TOKENS = 3072, 4096, 768, 512
FLUX_DEV_PARAMS = 11_901_408_320  # FluxTransformer2DModel(**FLUX_DEV)
READERS = {"context_embedder": (T5_WIDTH, WIDTH), "time_text_embed.text_embedder.linear_1": (POOLED, WIDTH)}
# train_dreambooth_lora_flux.py's default LoRA layers, plus the T5 reader so exact mode has a LoRA to hold
LORA_LAYERS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
               "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
               "ff_context.net.2", "context_embedder"]


def flux_subspace(rank: int) -> ConceptSubspace:
    """A rank-``rank`` T5 context basis (4096) and pooled basis (768) from text-like random concept vectors."""
    rows = {"context": concept_matrix(T5_WIDTH, rank, seed=1).T, "pooled": concept_matrix(POOLED, rank, seed=2).T}
    return ConceptSubspace.from_rows(rows, energy=1.0, max_rank=rank, encoder="benchmark")


def reader_case(kind: str, rank: int, batch: int, budget_s: float, device: torch.device) -> dict:
    """Ours vs naive on the two reader layers: context projection of the states, exact mode on the weights."""
    model = build_model(READERS).to(device)
    if kind.startswith("lora"):
        from peft import LoraConfig, inject_adapter_in_model

        r = int(kind[4:])
        model = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=r, target_modules=list(READERS)), model)
    for name, p in model.named_parameters():
        p.requires_grad_(kind == "full" or "lora_" in name)
    sub = flux_subspace(rank)
    ex = ConceptExclusion.attach(model, sub,
                                 projection_of(sub).overridden(mode="exact", targets="kv", project_context=True),
                                 options=AttachOptions(leakage_snapshots=kind != "full"))
    gen = torch.Generator().manual_seed(0)
    t5 = torch.randn(batch, T5_TOKENS, T5_WIDTH, generator=gen).to(device)
    pooled = torch.randn(batch, POOLED, generator=gen).to(device)
    modules = dict(model.named_modules())
    pre_hooks = [(list(modules[n]._forward_pre_hooks.values()), x) for n, x in
                 (("context_embedder", t5), ("time_text_embed.text_embedder.linear_1", pooled))]
    assert all(len(h) == 1 for h, _ in pre_hooks), "expected one context-projection hook per reader"
    grads = [torch.randn(t.param.shape, generator=gen).to(device) * 1e-3 for t in ex.targets]
    pairs = [(list(t.param._backward_hooks.values())[0], g) for t, g in zip(ex.targets, grads)]

    def ours_context() -> None:
        for hooks, x in pre_hooks:
            hooks[0](modules["context_embedder"], (x,), {})

    def ours_exact() -> None:
        for hook, g in pairs:
            hook(g)
        ex.after_optimizer_step()

    c_t5 = concept_matrix(T5_WIDTH, rank, 1).float().to(device)
    c_pool = concept_matrix(POOLED, rank, 2).float().to(device)
    concepts = [c_t5 if t.param.shape[1] == T5_WIDTH else c_pool for t in ex.targets]
    naive_grad = NaiveProjection([c.cpu() for c in concepts])
    naive_states = NaiveProjection([c_t5.cpu(), c_pool.cpu()])

    def naive_context() -> None:
        naive_states([t5.cpu(), pooled.cpu()])

    def naive_exact() -> None:
        naive_grad([g.cpu() for g in grads])

    projected = pre_hooks[0][0][0](modules["context_embedder"], (t5,), {})[0][0]
    agree = float(((projected.cpu() - naive_states([t5.cpu()])[0]).abs().max()) / t5.abs().max())
    fns = {"ours_context": ours_context, "ours_exact": ours_exact, "naive_context": naive_context,
           "naive_exact": naive_exact}
    timed = _timer(device)
    if device.type == "cuda":
        ms = {k: statistics.median(timed(f) for _ in range(20)) * 1e3 for k, f in fns.items() if k.startswith("ours")}
        ms.update({k: statistics.median(timed(f) for _ in range(3)) * 1e3 for k, f in fns.items()
                   if k.startswith("naive")})
    else:
        ms, _, _ = interleaved_ms(fns, warmup=1, min_runs=3, max_runs=15, budget_s=budget_s)
    with torch.no_grad():
        for t in ex.targets:
            t.param.add_(torch.randn_like(t.param) * 1e-2)
            if t.other is not None:
                t.other.add_(torch.randn_like(t.other) * 1e-2)
    ex.after_optimizer_step()
    mem = held_memory(ex)
    row = {"case": f"flux-readers-{kind}-k{rank}-b{batch}", "kind": kind, "concept_rank": rank, "batch": batch,
           "device": str(device), "targets": len(ex.targets), "readers": len(ex.context.readers),
           **{f"{k}_ms": round(v, 3) for k, v in ms.items()},
           "naive_over_ours_context": round(ms["naive_context"] / ms["ours_context"], 1),
           "naive_over_ours_exact": round(ms["naive_exact"] / ms["ours_exact"], 1),
           "max_rel_diff_vs_naive": float(f"{agree:.2e}"), "max_leakage_after_step": float(f"{ex.max_leakage():.2e}"),
           "extra_bytes": mem["device_bases"] + mem["stored_wu"] + mem["snapshots"]}
    if device.type == "cuda":
        row["sync_in_context"] = _cuda_sync_check(ours_context)
        row["sync_in_exact"] = _cuda_sync_check(ours_exact)
    ex.uninstall()
    return row


def step_rows(double: int, single: int, image_tokens: int, steps: int, rank: int, device: torch.device) -> list[dict]:
    """A Flux-shaped LoRA training step (``double`` + ``single`` blocks), plain vs exact + context projection."""
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    timed = _timer(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def make(attached: bool):
        torch.manual_seed(0)
        model = FluxTransformer2DModel(**{**FLUX_DEV, "num_layers": double, "num_single_layers": single})
        model = model.to(device, dtype).requires_grad_(False)
        model.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=LORA_LAYERS))
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
        ex = ConceptExclusion.attach(model, flux_subspace(rank),
                                     Projection(mode="exact", targets=("kv",), project_context=True),
                                     optimizer=opt) if attached else None
        return model, params, opt, ex

    gen = torch.Generator().manual_seed(0)
    side = int(image_tokens ** 0.5)
    x = torch.randn(1, image_tokens, 64, generator=gen).to(device, dtype)
    noise = torch.randn(1, image_tokens, 64, generator=gen).to(device, dtype)
    t5 = torch.randn(1, T5_TOKENS, T5_WIDTH, generator=gen).to(device, dtype)
    pooled = torch.randn(1, POOLED, generator=gen).to(device, dtype)
    grid = torch.meshgrid(torch.zeros(1), torch.arange(side * 1.0), torch.arange(side * 1.0), indexing="ij")
    img_ids = torch.stack(grid, -1).reshape(-1, 3).to(device)
    txt_ids = torch.zeros(T5_TOKENS, 3, device=device)
    t, guidance = torch.tensor([0.5], device=device), torch.tensor([3.5], device=device)

    def stepper(model, params, opt):
        def step() -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                out = model(hidden_states=x, encoder_hidden_states=t5, pooled_projections=pooled, timestep=t,
                            img_ids=img_ids, txt_ids=txt_ids, guidance=guidance).sample
            (out.float() - noise.float()).pow(2).mean().backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    plain, with_ex = make(False), make(True)
    plain_step, ex_step = stepper(*plain[:3]), stepper(*with_ex[:3])
    plain_step()
    ex_step()
    plain_t, ex_t = [], []
    for _ in range(steps):
        plain_t.append(timed(plain_step))
        ex_t.append(timed(ex_step))
    model, params, opt, ex = with_ex
    step_ms, with_ms = statistics.median(plain_t) * 1e3, statistics.median(ex_t) * 1e3
    sub_params = sum(p.numel() for p in model.parameters())
    scale = FLUX_DEV_PARAMS / sub_params
    row = {"case": f"flux-step-{double}d{single}s-img{image_tokens}", "device": str(device), "dtype": str(dtype),
           "double_blocks": double, "single_blocks": single, "image_tokens": image_tokens, "text_tokens": T5_TOKENS,
           "lora_rank": 16, "concept_rank": rank, "targets": len(ex.targets), "readers": len(ex.context.readers),
           "trainable_params": sum(p.numel() for p in params), "subset_params": sub_params,
           "step_ms": round(step_ms, 1), "step_with_exclusion_ms": round(with_ms, 1),
           "ab_share": float(f"{(with_ms - step_ms) / step_ms:.3e}"), "runs": steps,
           "scale_to_flux_dev": round(scale, 2), "flux_dev_step_estimate_ms": round(step_ms * scale, 0),
           "max_leakage": float(f"{ex.max_leakage():.2e}")}
    if device.type == "cuda":
        row["sync_in_step"] = _cuda_sync_check(ex_step)
        row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    ex.uninstall()
    return [row]


def markdown(rows: list[dict], info: dict) -> str:
    """The results as the Markdown tables of RESULTS.md's Flux section (shares against the estimated step)."""
    steps = [r for r in rows if r["case"].startswith("flux-step")]
    full_step = steps[0]["flux_dev_step_estimate_ms"] if steps else None
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores ({info['threads_used']} thread used), torch "
             f"{info['torch']}, GPU: {info['gpu']}.", "",
             "| case | targets | ours context ms | naive context ms | naive / ours | ours exact ms | naive exact ms | "
             "naive / ours | (context + exact) / Flux.1-dev step | max leakage after a step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if not r["case"].startswith("flux-readers"):
            continue
        share = f"{(r['ours_context_ms'] + r['ours_exact_ms']) / full_step:.2e}" if full_step else "-"
        lines.append(f"| {r['case']} | {r['targets']} | {r['ours_context_ms']:.2f} | {r['naive_context_ms']:.1f} | "
                     f"**{r['naive_over_ours_context']}x** | {r['ours_exact_ms']:.2f} | {r['naive_exact_ms']:.1f} | "
                     f"**{r['naive_over_ours_exact']}x** | {share} | {r['max_leakage_after_step']:.1e} |")
    if steps:
        lines += ["", "| step case | params in subset | step ms | with exclusion ms | (with - plain) / plain | "
                      "x to Flux.1-dev | Flux.1-dev step estimate s |", "|---|---:|---:|---:|---:|---:|---:|"]
        for s in steps:
            lines.append(f"| {s['case']} | {s['subset_params']:,} | {s['step_ms']:.0f} | "
                         f"{s['step_with_exclusion_ms']:.0f} | {s['ab_share']:+.2%} | {s['scale_to_flux_dev']} | "
                         f"{s['flux_dev_step_estimate_ms'] / 1e3:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="LoRA rank 16, concept rank 32 readers only (< 1 min)")
    parser.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    parser.add_argument("--markdown", metavar="PATH", help="write the tables as Markdown")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of repeated runs per timing")
    parser.add_argument("--batch", type=int, default=1, help="batch of T5 states in the reader cases")
    parser.add_argument("--double", type=int, default=1, help="double blocks in the step (Flux.1-dev: 19)")
    parser.add_argument("--single", type=int, default=1, help="single blocks in the step (Flux.1-dev: 38)")
    parser.add_argument("--image-tokens", type=int, default=256, help="image tokens in the step (1024 px: 4096)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--no-step", action="store_true", help="skip the training-step row")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    cases = [("lora16", 32)] if args.quick else [(k, r) for k in ("lora16", "full") for r in (8, 32, 128)]
    rows = [reader_case(kind, rank, args.batch, args.budget, device) for kind, rank in cases]
    if not args.no_step and not args.quick:
        rows += step_rows(args.double, args.single, args.image_tokens, args.steps, 32, device)
    info = machine()
    text = markdown(rows, info)
    print(text)
    if args.json:
        for r in rows:
            r["machine"] = info
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
