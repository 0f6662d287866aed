"""Per-seed table of the world-2 LoRA runs: for each method, per seed, the share of plain training's lead over the
scrub-name control that it closes (probe), the name-probe reduction, the allowed brand's probe kept, and held-out
loss against plain training of the same seed. Reads every committed world-2 result file; a run that appears in
several files must be identical in all of them. Prints markdown.

Usage (from a checkout): python benchmarks/evidence_followup.py [METHOD ...]   (default: the methods below)"""

from __future__ import annotations

import glob
import json
import statistics
import sys
from pathlib import Path

from concept_exclusion.world.bench import name_probe

HERE = Path(__file__).resolve().parent
DEFAULT = ("exact-attention", "exact-attention-contrastive+concept", "exact-attention-contexts",
           "exact-attention-contexts-preserve", "exact-context-world-logo", "exact-context")
FILES = ("evidence-w2-lora-s*/results.json", "evidence-w2c-lora-s*/results.json", "evidence-w2-extra-*.json")


def lora_runs() -> dict[tuple[str, int], dict]:
    runs: dict[tuple[str, int], dict] = {}
    for pattern in FILES:
        for path in sorted(glob.glob(str(HERE / pattern))):
            for r in json.loads(Path(path).read_text(encoding="utf-8"))["runs"]:
                if r.get("kind") != "lora" or r["method"] == "base" or "generic_probe" not in r:
                    continue
                key = (r["method"], r["seed"])
                if key in runs and runs[key]["probe"] != r["probe"]:
                    raise SystemExit(f"{path}: run {key} differs from an earlier copy")
                runs.setdefault(key, r)
    return runs


def per_seed(runs: dict, method: str) -> list[dict]:
    rows = []
    for seed in sorted(s for m, s in runs if m == method):
        r, p, c = runs[(method, seed)], runs.get(("plain", seed)), runs.get(("scrub-name", seed))
        if p is None or c is None:
            continue
        rows.append({"seed": seed, "rank": r.get("subspace_rank", ""),
                     "gap": (p["probe"]["mean"] - r["probe"]["mean"]) / (p["probe"]["mean"] - c["probe"]["mean"]),
                     "name": 1 - name_probe(r) / name_probe(p), "kept": r["allowed_probe"]["mean"] / p["allowed_probe"]["mean"],
                     "held": r["heldout_loss"] / p["heldout_loss"] - 1, "wl": r.get("max_weight_leakage", 0.0)})
    return rows


def main(argv: list[str]) -> int:
    runs = lora_runs()
    print("| method | seeds | rank | gap to control closed, per seed | mean | name-probe reduction, per seed "
          "| mean | allowed probe kept, per seed | held-out vs plain, per seed | mean | weight leakage (max) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for method in argv or DEFAULT:
        rs = per_seed(runs, method)
        if not rs:
            continue
        f = lambda k, spec: " / ".join(format(r[k], spec) for r in rs)
        mean = lambda k: statistics.mean(r[k] for r in rs)
        print(f"| {method} | {len(rs)} | {rs[0]['rank']} | {f('gap', '+.0%')} | {mean('gap'):+.0%} | {f('name', '+.0%')} | "
              f"{mean('name'):+.0%} | {f('kept', '.0%')} | {f('held', '+.1%')} | {mean('held'):+.1%} | "
              f"{max(r['wl'] for r in rs):.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
