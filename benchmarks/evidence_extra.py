"""Extra runs for the evidence benchmark (no attacks), written as a runs-only JSON that
``benchmarks/evidence.py --merge`` accepts: ``python benchmarks/evidence_extra.py OUT.json METHOD[,METHOD] SEEDS [STEPS]``."""

from __future__ import annotations

import json
import sys

import torch

from concept_exclusion.safeio import write_text
from concept_exclusion.world.bench import BenchConfig, run
from concept_exclusion.world.model import load_base
from concept_exclusion.world.train import TrainConfig


def main(argv: list[str]) -> int:
    out, methods, seeds = argv[0], tuple(argv[1].split(",")), tuple(int(s) for s in argv[2].split(","))
    torch.set_num_threads(1)
    done = []

    def on_run(entry: dict) -> None:
        done.append(entry)
        write_text(out, json.dumps({"command": "python benchmarks/evidence_extra.py " + " ".join(argv),
                                    "runs": done}, indent=1, default=str) + "\n")

    lora = TrainConfig(kind="lora", steps=int(argv[3])) if len(argv) > 3 else TrainConfig(kind="lora")
    run(load_base(), BenchConfig(methods=methods, kinds=("lora",), seeds=seeds, lora=lora), on_run=on_run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
