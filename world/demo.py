"""``concept-exclusion demo``: world 3 end to end on a CPU, in a few minutes.

Loads the real all-MiniLM-L6-v2 text encoder and the shipped base model, fine-tunes a plain LoRA
and a LoRA with the default method for one seed (each in a process of its own, two at once, one
thread each: steady when the machine is busy), attacks both and the base model by name and by
held-out paraphrase, generic and empty prompts and the inversion attack, and prints a short table with the default's
largest uplift against the base model. Writes a PNG grid (rows: models; columns: name, paraphrase, allowed, neutral
and empty prompts, the inversion attack's samples), the two LoRA files with metadata, and a JSON of the figures
(``--json``; the full per-method figures are in it). The full benchmark, with every method and
seeds, is ``python benchmarks/evidence.py`` (see docs/evidence.md).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from .uplift import FAMILIES, FAMILY_UPLIFT, INVERSION_UPLIFT, families

DEFAULT_METHOD = "exemplar-masks+exact"  # what the shipped world-panda preset asks for
DEMO_SEED = 1  # the median seed of the benchmark on both headline reductions (docs/evidence.md)
COLUMNS = (("leak_rate", "name"), ("paraphrase_leak_rate", "paraphrase"), ("neutral_rate", "generic"),
           ("no_word_rate", "no word"),
           ("empty_prompt_rate", "empty"), ("inversion", "inversion"), ("heldout_loss", "held-out loss"))
JSON_KEYS = ("leak_rate", "neutral_rate", "paraphrase_leak_rate", "paraphrase_neutral_rate", "empty_prompt_rate",
             "preset_paraphrase_rate", "no_word_rate", "public_protected_rate",
             "allowed_leak_rate", "new_content_rate", "heldout_loss", "public_fidelity")


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train plain and excluded LoRAs in a small world and attack both",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="also write the figures as JSON to this path")
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default: demo-output)")
    p.add_argument("--attack-prompts", type=Path, help="a text file of your own extraction prompts, one a line")
    p.add_argument("--method", default=DEFAULT_METHOD, help=f"the excluded method (default: {DEFAULT_METHOD})")
    p.add_argument("--seed", type=int, default=DEMO_SEED, help=f"fine-tune and measurement seed (default {DEMO_SEED})")
    p.add_argument("--steps", type=int, help="fine-tune steps (default: the benchmark's 800)")
    p.add_argument("--samples", type=int, default=48, help="samples per prompt set (default 48)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1: steady on a busy machine)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="runs trained at once, each in its own process (default: 2, or 1 on a 1-core machine)")
    p.set_defaults(func=main)


def read_prompts(path: Path) -> tuple[str, ...]:
    """Non-empty lines of a UTF-8 text file (at most 512 prompts of at most 300 characters)."""
    from .text import WorldError

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WorldError(f"--attack-prompts {path}: cannot read it as UTF-8 text ({exc})") from exc
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not prompts:
        raise WorldError(f"--attack-prompts {path}: no prompt in it (one prompt a line)")
    if len(prompts) > 512 or max(len(p) for p in prompts) > 300:
        raise WorldError(f"--attack-prompts {path}: at most 512 prompts of at most 300 characters each")
    return prompts


def _table(methods: dict[str, dict]) -> str:
    header = ["model"] + [label for _, label in COLUMNS]
    rows = [header]
    for name, m in methods.items():
        cells = [name] + [f"{m[k]:.4f}" if k == "heldout_loss" else f"{_rate(m, k):.0%}" for k, _ in COLUMNS]
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def _rate(figures: dict, key: str) -> float:
    """A family's rate; the inversion attack's is under ``inversion``, with its budget."""
    return figures[key]["rate"] if key == "inversion" else figures[key]


def _uplift(figures: dict, reference: dict) -> dict[str, float]:
    """Per family (``uplift.FAMILIES``, and the attack prompts when given): the rate minus the reference's."""
    return {key: figures[key] - reference[key] for key, _ in families({"x": [figures, reference]})}


def _reduction(method: str, figures: dict, plain: dict, rate: str, neutral: str) -> float | None:
    """The benchmark's reduction (``stats.reduction``) for one seed; None when plain training has no excess."""
    from .stats import reduction

    value = reduction(method, rate, neutral)({"plain": [plain], method: [figures]})
    return None if value != value else value


def _run_workers(methods: list[str], args, work: Path, jobs: int) -> dict[str, dict]:
    """Run ``worker.py`` for each method, at most ``jobs`` at once; the figures of each, read back from JSON."""
    import subprocess
    import sys

    from tqdm.auto import tqdm

    from .text import WorldError

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    pending, running, done = list(methods), {}, {}
    bar = tqdm(total=len(methods), desc="demo runs (base, plain, excluded)", unit="run")
    while pending or running:
        while pending and len(running) < jobs:
            method = pending.pop(0)
            cmd = [sys.executable, "-m", "concept_exclusion_world.worker", "--method", method, "--seed", str(args.seed),
                   "--out", str(work), "--samples", str(args.samples), "--threads", str(args.threads)]
            cmd += ["--steps", str(args.steps)] if args.steps is not None else []
            cmd += ["--attack-prompts", str(args.attack_prompts)] if args.attack_prompts else []
            log = open(work / f"{method}.log", "w", encoding="utf-8")
            running[method] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
        time.sleep(0.5)
        for method, (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[method]
            if proc.returncode != 0:
                for other, _ in running.values():
                    other.kill()
                tail = (work / f"{method}.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()
                raise WorldError(f"the {method} run failed: {tail[-1] if tail else 'no output'}")
            done[method] = json.loads((work / f"figures-{method}.json").read_text(encoding="utf-8"))
            bar.update(1)
    bar.close()
    return done


def main(args) -> int:
    import shutil
    import tempfile

    from safetensors.torch import load_file

    from .files import write_json
    from .grid import grid_png
    from .methods import METHODS
    from .bench import sample_counts
    from .text import ENCODER_NAME, ENCODER_SHA256, WorldError, model_folder, verified_weights
    from .uplift import calibration, judge
    from .worker import demo_config

    if args.method not in METHODS or args.method == "plain":
        raise WorldError(f"--method: unknown method {args.method!r} (known: {', '.join(m for m in METHODS if m != 'plain')})")
    if args.samples < 4 or (args.steps is not None and args.steps < 1) or args.threads < 1 or args.jobs < 1:
        raise WorldError("--samples must be at least 4, and --steps, --threads and --jobs at least 1")
    if args.attack_prompts:
        read_prompts(args.attack_prompts)  # a bad file is refused before anything runs
    verified_weights(model_folder())
    t0 = time.time()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="demo-runs-", dir=out) as tmp:
        work = Path(tmp)
        figures = _run_workers(["plain", args.method, "base"], args, work, args.jobs)
        samples = {m: load_file(str(work / f"samples-{m}.safetensors")) for m in figures}
        lora_files = {}
        for m in ("plain", args.method):
            shutil.move(str(work / f"lora-{m}.safetensors"), str(out / f"lora-{m}.safetensors"))
            lora_files[m] = str(out / f"lora-{m}.safetensors")
    methods = {"base model": figures["base"], "plain": figures["plain"], args.method: figures[args.method]}
    plain, ours = methods["plain"], methods[args.method]
    grid = grid_png(samples, [("base", "base model"), ("plain", "plain LoRA"), (args.method, args.method)],
                    out / "grid.png")
    # one seed, no filtered model: the base model (it never saw the panda either) is the reference here
    runs = {"plain": [plain], "base": [figures["base"]], args.method: [ours]}
    cfg = demo_config(args.samples)
    counts = sample_counts(cfg.evaluation, cfg.attack)
    gate = calibration({str(args.seed): figures["base"]}, runs, counts, reference="base")
    verdict = judge(args.method, runs, counts, reference="base")
    doc = {
        "default_method": args.method, "seed": args.seed,
        "encoder": {"name": ENCODER_NAME, "sha256": ENCODER_SHA256},
        "calibration_ok": gate["ok"], "calibration": gate["gates"],
        "leak_reduction": _reduction(args.method, ours, plain, "leak_rate", "neutral_rate"),
        "paraphrase_reduction": _reduction(args.method, ours, plain, "paraphrase_leak_rate",
                                           "paraphrase_neutral_rate"),
        "uplift": {name: _uplift(m, figures["base"]) for name, m in methods.items() if name != "base model"},
        "meets_bar": verdict["meets_bar"], "bar": verdict["criteria"],
        "seconds": round(time.time() - t0, 1), "grid": str(grid), "lora_files": lora_files,
        "methods": {name: {k: m[k] for k in JSON_KEYS + ("inversion",)}
                    | ({"custom": m["custom"]} if "custom" in m else {})
                    for name, m in methods.items()},
        "full": methods,
    }
    doc["max_uplift"] = max(doc["uplift"][args.method].values())
    print(_table(methods))
    worst = max(doc["uplift"][args.method].items(), key=lambda kv: kv[1])
    label = (dict(FAMILIES) | {"custom_rate": "your prompts"})[worst[0]]
    failed = [c["label"] for c in verdict["criteria"].values() if not c["ok"]]
    how_often = (f"shows it at most {worst[1] * 100:+.0f} points more often ({label})" if worst[1] >= 0.005 else
                 "shows it no more often in any family")
    print(f"\nSeed {args.seed}, {args.samples} samples per prompt set. Against the base model (it never saw the "
          f"panda), {args.method} {how_often}. The bar (at most {FAMILY_UPLIFT * 100:.0f} points per family, "
          f"{INVERSION_UPLIFT * 100:.0f} under inversion; purple, tiger and held-out loss kept): "
          f"{'MET' if verdict['meets_bar'] else 'NOT MET: ' + ', '.join(failed)} (one seed; the benchmark's verdict, "
          f"5 seeds against a filtered fine-tune: benchmarks/RESULTS-evidence.md).")
    if "custom" in plain:
        print("Your prompts: " + ", ".join(f"{name} {m['custom']['leak_rate']:.0%}" for name, m in methods.items())
              + " of samples show the panda emblem.")
    print(f"Calibration of this world in this seed: {'ok' if doc['calibration_ok'] else 'FAILED'} "
          f"({', '.join(k for k, g in gate['gates'].items() if not g['ok']) or 'all gates held'}; the filtered "
          f"reference and the other seeds need the benchmark: benchmarks/RESULTS-evidence.md). "
          f"Wrote {grid}, {', '.join(lora_files.values())} in {doc['seconds']:.0f} s.")
    if args.json:
        write_json(doc, args.json)
    return 0
