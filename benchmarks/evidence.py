"""The evidence benchmark, from a checkout: every method, LoRA and full fine-tuning, attacks, seeds.

    python benchmarks/evidence.py                 # 3 seeds, all methods, writes benchmarks/RESULTS-evidence.md
    python benchmarks/evidence.py --seeds 5 --steps 400
    # two processes in parallel (one per fine-tune kind), then one report from both:
    python benchmarks/evidence.py --kinds lora --out benchmarks/evidence-lora
    python benchmarks/evidence.py --kinds full --out benchmarks/evidence-full
    python benchmarks/evidence.py --merge benchmarks/evidence-lora/results.json benchmarks/evidence-full/results.json
    # ... into another report file, with notes appended:
    python benchmarks/evidence.py --merge a/results.json b/results.json --notes notes.md --target report.md

Writes benchmarks/evidence-output/ (grid.png, results.json, the first seed's two LoRA files and the report)
and copies the report (table, bar, grid, machine, this command) to benchmarks/RESULTS-evidence.md.
It is ``concept-exclusion demo --full`` with the output folder set to ``benchmarks/evidence-output``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from concept_exclusion.demo import _configs, command_line, register, run_benchmark

HERE = Path(__file__).resolve().parent


def merge(paths: list[Path], command: str, notes: Path | None = None, target: Path | None = None) -> Path:
    """One report from several runs' results.json (e.g. the LoRA and the full fine-tuning process)."""
    from concept_exclusion.world.bench import summarize
    from concept_exclusion.world.report import write_results

    loaded = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
    _drop_repeated_runs(loaded)
    docs = [d for d in loaded if "config" in d]  # complete results.json; runs-partial.json holds runs only
    config = dict(docs[0]["config"])
    config["kinds"] = list(dict.fromkeys(r["kind"] for d in loaded for r in d["runs"]))
    config["seeds"] = sorted({r["seed"] for d in loaded for r in d["runs"]})
    config["methods"] = list(dict.fromkeys(r["method"] for d in loaded for r in d["runs"]
                                           if r["kind"] == "lora" and r["method"] != "base"))
    for d in docs:
        if "full" in d["config"]["kinds"]:
            config["full"] = d["config"]["full"]
    full_methods = list(dict.fromkeys(r["method"] for d in loaded for r in d["runs"]
                                      if r["kind"] == "full" and r["method"] != "base"))
    config["full_methods"] = full_methods or None
    results = {"calibration": docs[0]["calibration"], "config": config, "base_source": docs[0]["base_source"],
               "subspace_ranks": {k: v for d in docs for k, v in d["subspace_ranks"].items()},
               "runs": [r for d in loaded for r in d["runs"]]}
    rows = summarize(results)
    target = target or HERE / "RESULTS-evidence.md"
    grid = Path(docs[0]["grid"]).resolve()
    folder = target.resolve().parent
    grid_name = str(grid.relative_to(folder)) if grid.is_relative_to(folder) else str(grid)
    wall = max(d["seconds"] for d in docs)
    commands = "\n".join([*(d.get("command", "?") for d in loaded), command])
    from concept_exclusion.world import coverage as cov
    from concept_exclusion.world.model import load_base

    explanation = cov.__doc__.split("\n\n", 1)[1]
    sections = ("## Basis coverage (sampling-free, measured when this report was written)\n\n" + explanation
                + "\n" + cov.coverage_table(cov.coverage(load_base(progress=False))) + "\n")
    if notes is not None:
        sections += "\n" + notes.read_text(encoding="utf-8") + "\n"
    write_results(target, results, rows, commands, grid_name, wall, sections)
    return target


def _drop_repeated_runs(loaded: list[dict]) -> None:
    """Keep the first of runs that repeat a (kind, method, seed) from an earlier file; a repeat must reproduce
    the first run's probe and held-out loss exactly (the runs are deterministic), else merging stops."""
    first: dict[tuple, dict] = {}
    repeats = 0
    for d in loaded:
        kept = []
        for r in d["runs"]:
            key = (r["kind"], r["method"], r["seed"])
            if key not in first:
                first[key] = r
                kept.append(r)
                continue
            old = first[key]
            same = all(old.get(k) == r.get(k) for k in ("probe", "heldout_loss", "attack_ti", "attack_lora")
                       if k in old and k in r)
            if not same:
                raise SystemExit(f"merge: run {key} differs from its earlier copy (probe {old.get('probe')} vs "
                                 f"{r.get('probe')}); not merging runs that do not reproduce")
            repeats += 1
        d["runs"] = kept
    if repeats:
        print(f"merge: {repeats} repeated run(s) reproduced their earlier copies exactly and were counted once")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/evidence.py")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--merge"]:
        torch.set_num_threads(1)  # the report's machine line names the thread count the runs used
        notes = None
        if "--notes" in argv:
            i = argv.index("--notes")
            notes = Path(argv[i + 1])
            argv_files = argv[1:i] + argv[i + 2:]
        else:
            argv_files = argv[1:]
        target = None
        if "--target" in argv_files:
            i = argv_files.index("--target")
            target = Path(argv_files[i + 1])
            argv_files = argv_files[:i] + argv_files[i + 2:]
        paths = [Path(p) for p in argv_files]
        target = merge(paths, "python benchmarks/evidence.py " + " ".join(shlex.quote(a) for a in argv), notes,
                       target)
        print(f"Wrote {target}.")
        return 0
    args = parser.parse_args(["demo", "--full", *argv])
    if "--out" not in argv:
        args.out = HERE / "evidence-output"
    torch.set_num_threads(args.threads or 1)  # the committed figures: one thread per process (summation order)
    cfg = _configs(args)
    command = "python benchmarks/evidence.py " + " ".join(shlex.quote(a) for a in argv)
    run_benchmark(cfg, args.out, args.json, True, command.strip(), pretrain=args.pretrain)
    report = args.out / "RESULTS-evidence.md"
    if args.out != HERE:
        target = HERE / "RESULTS-evidence.md"
        text = report.read_text(encoding="utf-8").replace("](grid.png)", f"]({args.out.name}/grid.png)")
        target.write_text(text, encoding="utf-8")
        print(f"Copied the report to {target}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
