"""What the behavioural check costs on a real base model's shapes: the unit costs measured now, the default
budget's time computed from them, and a reduced run of the real command to check that arithmetic.

    python benchmarks/audit_time.py --base FOLDER --lora FILE --preset PRESET --exemplars DIR [--controls DIR]
        [--clip-skip 1] [--out benchmarks/results/audit-time-<device>.json]

The check's forward passes: per model side (base, file) and prompt family, ``noises x timesteps`` passes over the
images in batches; its backward passes: per side and region, ``inversion_steps`` steps on one batch. The unit
costs are timed on this machine, on the base's own UNet at its resolution (median of 3).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import torch

from concept_exclusion.audit.base import load_base
from concept_exclusion.audit.behaviour.check import BehaviourConfig, prompt_families
from concept_exclusion.audit.behaviour.run import BehaviourOptions
from concept_exclusion.concept.preset import load_preset

HERE = Path(__file__).resolve().parent


def _median(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def unit_costs(model, batch: int) -> dict:
    r = model.resolution
    images = torch.zeros(batch, 3, r, r)
    with torch.no_grad():
        latents = model.latents(images)
    cond = model.encode([""] * batch)
    t = torch.full((batch,), 500, dtype=torch.long)
    noise = torch.randn_like(latents)

    def forward() -> None:
        with torch.no_grad():
            model.loss_map(latents, noise, t, cond)

    def backward() -> None:
        states = cond.states.detach().clone().requires_grad_(True)
        model.loss_map(latents, noise, t, cond.with_states(states)).mean().backward()

    def encode_images() -> None:
        with torch.no_grad():
            model.latents(images)

    forward()
    return {"forward": _median(forward), "forward_backward": _median(backward), "vae_encode": _median(encode_images)}


def predicted(units: dict, families: int, images: int, controls: int, cfg: BehaviourConfig, fwd_batch: int,
              inv_batch: int) -> float:
    """Seconds the check's passes take at these unit costs (batch costs scaled linearly by rows)."""
    rows = images + controls
    per_fwd_row = units["forward"] / fwd_batch
    per_bwd_row = units["forward_backward"] / inv_batch
    draws = cfg.noises * len(cfg.timesteps)
    regions = 2  # the concept's region and elsewhere (or the exemplars and the controls): one inversion each
    inversion_evals = regions * draws * rows * per_fwd_row
    forward = 2 * (families * draws * rows * per_fwd_row + inversion_evals)
    backward = 2 * regions * cfg.inversion_steps * min(cfg.inversion_batch, images) * per_bwd_row
    encode = math.ceil(rows / fwd_batch) * units["vae_encode"]
    return forward + backward + encode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True)
    parser.add_argument("--lora", required=True)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--exemplars", required=True)
    parser.add_argument("--controls")
    parser.add_argument("--clip-skip", default="1")
    parser.add_argument("--batch", type=int, default=2, help="batch the unit costs are timed at")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = load_base(args.base)
    model = base.denoising(int(args.clip_skip))
    units = unit_costs(model, args.batch)
    families = len(prompt_families(load_preset(args.preset)))
    cfg, opts = BehaviourConfig(), BehaviourOptions()
    controls = opts.max_images if args.controls else 0
    default = predicted(units, families, opts.max_images, controls, cfg, args.batch, args.batch)
    n_small = 2
    small_pred = predicted(units, families, n_small, n_small if args.controls else 0, replace(cfg, inversion_steps=2),
                           args.batch, args.batch)
    command = ["concept-exclusion", "audit", args.lora, "--preset", args.preset, "--base", args.base, "--clip-skip",
               args.clip_skip, "--exemplars", args.exemplars, "--max-images", str(n_small), "--inversion-steps", "2",
               "--json"] + (["--controls", args.controls] if args.controls else [])
    t0 = time.time()
    done = subprocess.run(command, capture_output=True, text=True)
    whole = time.time() - t0
    report = json.loads(done.stdout) if done.stdout.strip() else {}
    doc = {"format": "concept-exclusion-audit-time/1", "device": device, "cpus": torch.get_num_threads(),
           "platform": platform.platform(), "resolution": model.resolution, "unit_seconds": units,
           "unit_batch": args.batch, "families": families,
           "default_budget": {"images": opts.max_images, "controls": controls, "noises": cfg.noises,
                              "timesteps": len(cfg.timesteps), "inversion_steps": cfg.inversion_steps,
                              "predicted_check_seconds": round(default, 1)},
           "reduced_run": {"command": " ".join(command), "exit_code": done.returncode,
                           "predicted_check_seconds": round(small_pred, 1),
                           "check_seconds": (report.get("behaviour") or {}).get("seconds"),
                           "whole_command_seconds": round(whole, 1)}}
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
