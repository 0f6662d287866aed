"""One fine-tune and its measurements in a process of its own, written to files (the demo runs two at once).

    python -m concept_exclusion_world.worker --method plain --seed 0 --out DIR [--steps N] [--samples N]
        [--attack-prompts FILE] [--threads 1]

Writes ``DIR/figures-<method>.json`` (the measurements, the inversion attack's rate and budget included),
``DIR/samples-<method>.safetensors`` (the samples per prompt set and from the attack's context, for the grid) and
``DIR/lora-<method>.safetensors``. Results travel as
JSON and safetensors files, never pickled. ``--method base`` measures the base model only.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def demo_config(samples: int, custom: tuple[str, ...] = ()):
    """The demo's measurement: ``samples`` per prompt set, the benchmark's attack with as many samples."""
    from .bench import BenchConfig
    from .inversion import InversionConfig
    from .measure import EvalConfig

    n = samples
    return BenchConfig(methods=(), seeds=(), custom_prompts=custom, attack=InversionConfig(samples=max(4, n)),
                       evaluation=EvalConfig(n=n, n_empty=max(2, n // 2), n_new=max(2, n // 2), n_heldout=max(8, n * 3)))


def run_one(method: str, seed: int, out: Path, steps: int | None, samples: int, custom: tuple[str, ...]) -> Path:
    from safetensors.torch import save_file

    from .base import load_base
    from .bench import measure
    from .export import save_lora
    from .methods import METHODS
    from .train import TrainConfig, finetune

    base = load_base(progress=False)
    model, seconds = base.model, 0.0
    if method != "base":
        ft = finetune(base, METHODS[method], seed, TrainConfig() if steps is None else TrainConfig(steps=steps),
                      progress=False)
        save_lora(ft, out / f"lora-{method}.safetensors")
        model, seconds = ft.model, ft.seconds
    cfg = demo_config(samples, custom)
    figures = measure(model, base, seed, cfg, keep_samples=True)
    samples_by_set = figures.pop("_samples")
    figures["inversion"] = {"rate": figures["inversion_rate"], "steps": cfg.attack.steps}
    save_file({k: v.contiguous() for k, v in samples_by_set.items() if len(v)}, str(out / f"samples-{method}.safetensors"))
    figures["train_seconds"], figures["seed"] = round(seconds, 1), seed
    path = out / f"figures-{method}.json"
    path.write_text(json.dumps(figures, default=float), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--attack-prompts", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    custom = ()
    if args.attack_prompts:
        from .demo import read_prompts

        custom = read_prompts(args.attack_prompts)
    args.out.mkdir(parents=True, exist_ok=True)
    run_one(args.method, args.seed, args.out, args.steps, args.samples, custom)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
