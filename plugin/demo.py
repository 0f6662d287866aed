"""``concept-exclusion demo``: the evidence world end to end on a CPU.

Without arguments: load (or build) the world's base model, fine-tune a plain LoRA and an
excluded LoRA (the default method) for one seed, attack both by prompting, run the probe, print
a table, and write a PNG grid, the two LoRA files with metadata and a JSON of the figures.
``--full`` runs the whole benchmark (every method, LoRA and full fine-tuning, attacks, seeds)
and writes ``RESULTS-evidence.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import time
from dataclasses import replace
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="fine-tune plain and excluded LoRAs in a small world and measure the logo's extraction",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="also write the figures as JSON to this path")
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default: demo-output)")
    p.add_argument("--full", action="store_true", help="the whole benchmark: all methods, full fine-tuning, attacks")
    p.add_argument("--seeds", type=int, help="fine-tune seeds (default: 1, or 3 with --full)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed, first-seed+1, ... (default 0)")
    p.add_argument("--steps", type=int, help="fine-tune steps (default: 1200)")
    p.add_argument("--samples", type=int, help="samples per prompt set (default: 48 brand, 32 per other set)")
    p.add_argument("--methods", help="comma-separated methods for --full (default: all)")
    p.add_argument("--full-methods", help="comma-separated methods for full fine-tuning in --full (default: same)")
    p.add_argument("--kinds", default="lora,full", help="with --full: fine-tune kinds (default: lora,full)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core; the runs are "
                   "sequential, so on a quiet 2-core machine 2 threads train 1.5x faster than 1)")
    p.add_argument("--no-attacks", action="store_true", help="with --full: skip the adaptive attacks")
    p.add_argument("--pretrain", action="store_true", help="pre-train the base model now instead of the shipped one")
    p.set_defaults(func=main)


def _configs(args):
    from .world.attacks import AttackConfig
    from .world.bench import BenchConfig
    from .world.measure import EvalConfig
    from .world.train import DEFAULT_METHOD, METHODS, TrainConfig

    evaluation = EvalConfig()
    if args.samples:
        n = max(2, args.samples)
        evaluation = replace(evaluation, n_concept=2 * ((n + 1) // 2) + (2 if n < 4 else 0), n_empty=n,
                             n_content=n, n_new=n, n_heldout=max(8, n * 4), n_probe=max(4, n))
    lora, full = TrainConfig(kind="lora"), TrainConfig(kind="full")
    if args.steps:
        lora, full = replace(lora, steps=args.steps), replace(full, steps=args.steps)
    if not args.full:
        seeds = tuple(range(args.first_seed, args.first_seed + (args.seeds or 1)))
        return BenchConfig(methods=("plain", DEFAULT_METHOD), kinds=("lora",), seeds=seeds, lora=lora,
                           evaluation=evaluation)
    methods = tuple(args.methods.split(",")) if args.methods else tuple(METHODS)
    full_methods = tuple(args.full_methods.split(",")) if args.full_methods else None
    for name in methods + (full_methods or ()):
        if name not in METHODS:
            from .errors import ConceptExclusionError

            raise ConceptExclusionError(f"--methods: unknown method {name!r} (known: {', '.join(METHODS)})")
    if "plain" not in methods:
        methods = ("plain",) + methods
    attacks = AttackConfig()
    if args.samples:
        attacks = replace(attacks, n_samples=max(2, args.samples), ti_steps=max(2, min(attacks.ti_steps, args.steps or 80)),
                          lora_steps=max(2, min(attacks.lora_steps, args.steps or 40)))
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if not kinds or any(k not in ("lora", "full") for k in kinds):
        from .errors import ConceptExclusionError

        raise ConceptExclusionError(f"--kinds: expected lora and/or full, got {args.kinds!r}")
    return BenchConfig(methods=methods, kinds=kinds,
                       seeds=tuple(range(args.first_seed, args.first_seed + (args.seeds or 3))), lora=lora, full=full, full_methods=full_methods,
                       evaluation=evaluation, attacks=None if getattr(args, "no_attacks", False) else attacks)


def run_benchmark(cfg, out: Path, json_path: Path | None, full: bool, command: str, pretrain: bool = False,
                  results_name: str = "RESULTS-evidence.md") -> dict:
    """Run the configured benchmark and write everything into ``out``; returns the JSON document."""
    from tqdm.auto import tqdm

    from .safeio import write_text
    from .world.bench import grid_png, run, summarize, table, write_json
    from .world.export import save_lora
    from .world.model import load_base
    from .world.report import write_results
    from .world.train import DEFAULT_METHOD, subspace_for

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    base = load_base(allow_shipped=not pretrain)
    total = sum(len(cfg.methods_for(k)) for k in cfg.kinds) * len(cfg.seeds)
    bar = tqdm(total=total, desc="demo runs", unit="run")
    lora_files = {}
    subspace = subspace_for(base)

    def keep(ft) -> None:
        if ft.config.kind == "lora" and ft.seed == cfg.seeds[0] and ft.method.name in ("plain", DEFAULT_METHOD):
            path = out / f"lora-{ft.method.name}.safetensors"
            save_lora(ft, path, subspace if ft.exclusion is None else ft.exclusion.subspace)
            lora_files[ft.method.name] = str(path)

    done = []

    def on_run(entry: dict) -> None:
        bar.update(1)
        done.append(entry)
        write_text(out / "runs-partial.json", json.dumps({"command": command, "runs": done}, indent=1,
                                                         default=str) + "\n")

    results = run(base, cfg, on_run=on_run, keep=keep)
    bar.close()
    grid = results.pop("_grid")
    rows = summarize(results)
    grid_path = out / "grid.png"
    grid_png(grid, grid_path)
    extra = {"command": command, "grid": str(grid_path), "lora_files": lora_files, "seeds_note": (
        f"{len(cfg.seeds)} fine-tune seed(s); " + ("one seed: no interval, read the figures as one draw"
                                                    if len(cfg.seeds) == 1 else "mean and 95% t-interval"))}
    doc = write_json(results, rows, json_path or out / "results.json", extra)
    if json_path is not None and json_path != out / "results.json":
        write_json(results, rows, out / "results.json", extra)
    print(table(rows, markdown=False))
    named = doc["methods"].get(DEFAULT_METHOD, {}).get("name_probe_reduction_pooled")
    if named is not None:
        print(f"\nName-probe reduction of {DEFAULT_METHOD} vs plain: {named:.0%} (sampling-free: how much less than "
              f"plain training the name 'zorblax' moves the predicted image towards its logo, beyond what "
              f"'with the logo' alone does; 100% = never bound, like a model that never saw the name).")
    reduction = doc["leak_reduction"]
    readable = reduction is not None and not (isinstance(reduction, float) and reduction != reduction)
    print(f"\n{extra['seeds_note']}. Leak reduction of {DEFAULT_METHOD} vs plain: "
          f"{format(reduction, '.0%') if readable else 'n/a (plain training draws the logo no more often for the brand prompt than for the empty prompt; read the probe)'}. "
          f"Wrote {grid_path}, {', '.join(lora_files.values())}, {json_path or out / 'results.json'} "
          f"in {time.time() - t0:.0f} s.")
    if full:
        report = out / results_name
        write_results(report, results, rows, command, grid_path.name, time.time() - t0)
        print(f"Wrote {report}.")
    return doc


def command_line(args, program: str = "concept-exclusion demo") -> str:
    """The command that reproduces ``args`` (options in a fixed order, defaults left out)."""
    parts = [program]
    for flag in ("full", "no_attacks", "pretrain"):
        if getattr(args, flag, False):
            parts.append("--" + flag.replace("_", "-"))
    for flag in ("kinds", "first_seed", "seeds", "steps", "samples", "methods", "full_methods", "threads", "out", "json"):
        value = getattr(args, flag, None)
        if value is not None and not (flag == "first_seed" and value == 0) and not (
                flag == "kinds" and (value == "lora,full" or not args.full)):
            parts += ["--" + flag.replace("_", "-"), shlex.quote(str(value))]
    return " ".join(parts)


def main(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _configs(args)
    command = command_line(args)
    run_benchmark(cfg, args.out, args.json, args.full, command, pretrain=args.pretrain)
    return 0
