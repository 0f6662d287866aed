"""The inversion attack on world 3's models: base, the reference (filter) and methods, seeds, one JSON under
benchmarks/results/.

    python benchmarks/inversion.py                                 # base, filter, plain, preserve-base; seeds 0-4
    python benchmarks/inversion.py --seeds 1 --methods filter,plain --out /tmp/r   # exploratory: /tmp

Every model is fine-tuned exactly as benchmarks/evidence.py fine-tunes it (same seed, same data stream), then
attacked with the same budget and seeds (``concept_exclusion_world.inversion``). The README's first screen reads
the files this writes (``python benchmarks/evidence_report.py``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from concept_exclusion_world.base import load_base
from concept_exclusion_world.demo import DEFAULT_METHOD
from concept_exclusion_world.files import write_json
from concept_exclusion_world.inversion import InversionConfig, inversion_rate
from concept_exclusion_world.methods import METHODS
from concept_exclusion_world.train import TrainConfig, finetune

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated fine-tune seeds (default 0-4)")
    parser.add_argument("--methods", default=f"filter,plain,{DEFAULT_METHOD}", help="comma-separated methods")
    parser.add_argument("--attack-steps", type=int, default=InversionConfig.steps, help="the attack's Adam steps")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for the result JSON")
    parser.add_argument("--name", help="result file name (default: inversion-s<seeds>.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)} (known: {', '.join(METHODS)})")
    seeds = [int(s) for s in args.seeds.split(",")]
    attack, train = InversionConfig(steps=args.attack_steps), TrainConfig()
    t0 = time.time()
    base = load_base()
    doc = {"format": "inversion-1", "command": "python benchmarks/inversion.py " + " ".join(
               shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
           "attack": asdict(attack), "train": asdict(train), "base": {}, "runs": {m: [] for m in methods}}
    bar = tqdm(total=len(seeds) * (len(methods) + 1), desc="inversion runs", unit="run")
    for seed in seeds:
        doc["base"][str(seed)] = inversion_rate(base.model, base.text, seed, attack)
        bar.update(1)
        for method in methods:
            model = finetune(base, METHODS[method], seed, train, progress=False).model
            result = inversion_rate(model, base.text, seed, attack)
            doc["runs"][method].append({"seed": seed, **result})
            print(f"{method} seed {seed}: inversion {result['rate']:.0%}", flush=True)
            bar.update(1)
    bar.close()
    doc["seconds"] = round(time.time() - t0, 1)
    out = args.out / (args.name or f"inversion-s{'-'.join(map(str, seeds))}.json")
    write_json(doc, out)
    print(f"wrote {out} in {doc['seconds'] / 60:.0f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
