"""Cost of the regions loss (the shipped default) against a plain LoRA training step, on SD1.5, SDXL and Flux
image and latent shapes.

    python benchmarks/overhead_regions.py --json benchmarks/results/overhead-regions-cpu.json   # + the .md beside it

- locate: ``TemplateLocator.masks`` on one training image at the model's resolution (SD1.5 512 px, SDXL and Flux
  1024 px), with the shipped example-logo preset's exemplar and scales (1 exemplar, 3 scales). It runs once per
  image (``concept-exclusion train`` finds every image's regions before training; ``masks`` writes kohya's
  files once), so its per-step share is amortised: images x locate / steps.
- loss: ``region_loss`` + ``latent_mask`` against ``F.mse_loss`` on the model's latent prediction shape (SD1.5
  [4, 64, 64], SDXL [4, 128, 128], Flux unpacked [16, 128, 128]; batch 4), forward and backward.
- step: one plain LoRA training step (forward, MSE, backward, AdamW) of the real SD1.5 UNet built from its
  published config (random weights, PEFT rank 16 on attn1/attn2 q/k/v/out, batch 1, 64x64 latents, 768-d text
  of 77 tokens), measured in the same run. SDXL's and Flux's steps do not fit this benchmark's CPU budget; their
  rows give the regions' own cost and the SD1.5 step for scale.

Times are medians of process CPU time after warm-up, with ``--threads`` torch threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from concept_exclusion.regions import TemplateLocator, latent_mask, region_loss

SHAPES = {"SD1.5": (512, (4, 64, 64)), "SDXL": (1024, (4, 128, 128)), "Flux": (1024, (16, 128, 128))}
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def median_cpu(fn, rounds: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def sd15_step(rounds: int) -> float:
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
    x, text = torch.randn(1, 4, 64, 64), torch.randn(1, 77, 768)

    def step():
        loss = F.mse_loss(unet(x, torch.tensor([500]), text).sample, torch.randn_like(x))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return median_cpu(step, rounds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    locator = TemplateLocator.from_preset("example-logo")
    step = sd15_step(max(3, args.rounds // 2))
    rows = {}
    for name, (size, latent) in SHAPES.items():
        image = torch.rand(1, 3, size, size) * 2 - 1
        locate = median_cpu(lambda: locator.masks(image), args.rounds)
        pred = torch.randn(4, *latent, requires_grad=True)
        target = torch.randn(4, *latent)
        concept = (torch.rand(4, 1, size, size) > 0.9).float()

        def masked():
            region_loss(pred, target, latent_mask(concept, pred)).backward()

        def plain():
            F.mse_loss(pred, target).backward()
        extra = median_cpu(masked, args.rounds * 4) - median_cpu(plain, args.rounds * 4)
        rows[name] = {"image_px": size, "latent": list(latent), "locate_s_per_image": locate,
                      "loss_extra_s_per_step": extra, "locate_in_sd15_steps": locate / step,
                      "loss_extra_vs_sd15_step": extra / step}
        print(f"{name}: locate {locate * 1e3:.0f} ms per image ({locate / step:.1%} of an SD1.5 LoRA step), "
              f"regions loss +{extra * 1e3:.1f} ms per step of batch 4 ({extra / step:.2%} of an SD1.5 LoRA step)")
    print(f"SD1.5 LoRA step (real UNet config, batch 1, 64x64 latents, CPU, {args.threads} threads): {step:.1f} s")
    doc = {"format": "overhead-regions-1", "machine": {"platform": platform.platform(), "threads": args.threads,
                                                       "torch": torch.__version__, "gpu": torch.cuda.is_available()},
           "sd15_lora_step_s": step, "shapes": rows, "exemplars": len(locator.templates)}
    if args.json:
        from concept_exclusion.safeio import write_text

        write_text(args.json, json.dumps(doc, indent=1) + "\n")
        write_text(str(args.json).removesuffix(".json") + ".md", markdown(doc, args.json))
    return 0


def markdown(doc: dict, source: str) -> str:
    """The report of one run, generated from its figures."""
    step = doc["sd15_lora_step_s"]
    lines = ["# Regions loss: cost against a LoRA training step", "",
             f"Generated by `python benchmarks/overhead_regions.py --json {source}`; do not edit. Machine: "
             f"{doc['machine']['platform']}, torch {doc['machine']['torch']}, {doc['machine']['threads']} thread(s), "
             f"GPU: {'yes' if doc['machine']['gpu'] else 'none lent'}. Times: medians of process CPU time.", "",
             f"Baseline, measured in the same run: one plain LoRA step of the real SD1.5 UNet config (random "
             f"weights, batch 1, 64x64 latents): **{step:.1f} s**.", "",
             "| shape | image | locate one image (once per image) | in SD1.5 steps | regions loss per step (batch 4) "
             "| share of an SD1.5 step |", "|---|---|---|---|---|---|"]
    for name, r in doc["shapes"].items():
        lines.append(f"| {name} | {r['image_px']} px | {r['locate_s_per_image'] * 1e3:.0f} ms | "
                     f"{r['locate_in_sd15_steps']:.2%} | +{r['loss_extra_s_per_step'] * 1e3:.1f} ms | "
                     f"{r['loss_extra_vs_sd15_step']:.2%} |")
    lines += ["", f"Amortised per step: images x locate / steps + the loss's share (e.g. 1000 SD1.5 images over 2000 "
                  f"steps: {1000 * doc['shapes']['SD1.5']['locate_s_per_image'] / 2000 / step:.2%} of a step, plus "
                  f"{doc['shapes']['SD1.5']['loss_extra_vs_sd15_step']:.2%}). SDXL's and Flux's own steps were "
                  "not measured (not on this CPU); their steps are longer than SD1.5's, so these shares are upper "
                  "bounds for them. On a GPU the step is far shorter than on this CPU: `concept-exclusion train` "
                  "and kohya (masks written once) still pay the locator once per image, but a diffusers loop that "
                  "calls `locator.masks` on every batch on the CPU pays it every step (not measured on a GPU: "
                  "none was lent)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
