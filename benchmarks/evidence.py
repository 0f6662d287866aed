"""The evidence benchmark (world 3.3): methods x seeds, each model measured on every prompt family and attacked by
inversion, against the reference (``filter``) and plain training of the same seeds; one JSON per run under
benchmarks/results/.

    python benchmarks/evidence.py                                  # every method, seeds 0-4
    python benchmarks/evidence.py --seeds 0,1 --methods exemplar-masks,preserve-base
    python benchmarks/evidence_report.py                           # benchmarks/RESULTS-evidence.md from the JSONs

plain and filter are run too (the gate and the bar need them) unless ``--skip-references`` says their runs for
these seeds are in other files. Several processes may run at once on different
seeds (one thread each); the report merges their files. ``--out`` elsewhere (e.g. /tmp) keeps exploratory runs
out of the committed results.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from concept_exclusion_world.base import load_base
from concept_exclusion_world.bench import BenchConfig, document, run
from concept_exclusion_world.demo import DEFAULT_METHOD
from concept_exclusion_world.files import write_json
from concept_exclusion_world.methods import METHODS
from concept_exclusion_world.train import TrainConfig
from concept_exclusion_world.uplift import FAMILIES

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated fine-tune seeds (default 0-4)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default: all)")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps, help="fine-tune steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for the result JSON")
    parser.add_argument("--name", help="result file name (default: evidence-<seeds>-<time>.json)")
    parser.add_argument("--skip-references", action="store_true",
                        help="do not re-run filter and plain (their runs for these seeds are in other result files; "
                             "the report judges each method on the seeds all three were measured in)")
    parser.add_argument("--loras", type=Path, help="also write each fine-tuned LoRA here (seed-<n>/lora-<method>."
                                                   "safetensors), for benchmarks/audit_agreement.py")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)} (known: {', '.join(METHODS)})")
    if not args.skip_references:
        methods = tuple(m for m in ("filter", "plain") if m not in methods) + methods
    seeds = tuple(int(s) for s in args.seeds.split(","))
    cfg = BenchConfig(methods=methods, seeds=seeds, train=TrainConfig(steps=args.steps))
    command = "python benchmarks/evidence.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    t0 = time.time()
    base = load_base()
    partial = args.out / ".partial" / (args.name or f"evidence-s{'-'.join(map(str, seeds))}.jsonl")
    partial.parent.mkdir(parents=True, exist_ok=True)

    def on_run(method: str, seed: int, figures: dict) -> None:
        with open(partial, "a", encoding="utf-8") as f:
            f.write(json.dumps({"method": method, "seed": seed, **figures}, default=float) + "\n")
        rates = " ".join(f"{key.removesuffix('_rate')} {figures[key]:.0%}" for key, _ in FAMILIES if key in figures)
        print(f"{method} seed {seed}: {rates} tiger {figures['allowed_leak_rate']:.0%} "
              f"purple {figures['new_content_rate']:.0%} held-out {figures['heldout_loss']:.4f}", flush=True)

    results = run(base, cfg, on_run=on_run, loras=args.loras)
    doc = document(results, cfg, command, time.time() - t0, DEFAULT_METHOD)
    name = args.name or f"evidence-s{'-'.join(map(str, seeds))}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json(doc, args.out / name)
    print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
