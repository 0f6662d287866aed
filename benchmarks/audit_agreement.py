"""The audit benchmark: does ``concept-exclusion audit``'s behavioural verdict agree with the detector-measured
uplift of the same files? (issue: "audit passes files that draw the concept")

    python benchmarks/evidence.py --seeds 0,1,2 --methods ...,secret-trigger --loras benchmarks/work/loras \\
        --name audit-files-s0-1-2.json                     # the files, each measured (families + inversion)
    python benchmarks/audit_agreement.py                   # audits every file: benchmarks/results/audit-agreement-*.json
    python benchmarks/audit_agreement.py --report          # benchmarks/RESULTS-audit.md from those JSONs

Every file is audited as a user would (the installed command, one process per file, ``--json``), on the machine's
cores, one at a time so each file's time is its own. ``--mode preset`` audits without ``--exemplars`` (the preset's
own exemplars pasted onto plain canvases).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from concept_exclusion_world.agreement import LEARNED_FROM, NO_CLAIM, NOT_LEARNED_UPTO, agreement, uplift_rows
from concept_exclusion_world.exemplars import write as write_exemplars
from concept_exclusion_world.files import atomic_path, write_json
from concept_exclusion_world.report import merge

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEVELOPMENT_SEED = 0  # BehaviourConfig.threshold was chosen on this seed's files


def runs_of(files: list[Path]) -> dict:
    """method -> per-seed figures, merged over evidence documents by the world's own merge (which refuses a seed
    measured twice with different figures)."""
    return merge([json.loads(path.read_text(encoding="utf-8")) for path in files])["runs"]


def audit(path: Path, exemplars: Path | None) -> dict:
    command = ["concept-exclusion", "audit", str(path), "--preset", "world-panda", "--base", "world", "--json"]
    command += ["--exemplars", str(exemplars)] if exemplars else []
    load = os.getloadavg()[0]  # other work on the machine: the time below is this file's under that load
    t0 = time.time()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.time() - t0
    if done.returncode not in (0, 1, 3, 5, 6):
        raise SystemExit(f"{' '.join(command)}: exit {done.returncode}: {done.stderr.strip()[-500:]}")
    report = json.loads(done.stdout)
    b = report["behaviour"]
    return {"exit_code": done.returncode, "weight_verdict": report["verdict"], "verdict": b["verdict"],
            "score": b["score"], "largest": b["largest"], "seconds": round(seconds, 1), "load": round(load, 1),
            "check_seconds": b["seconds"], "figures": {k: v["value"] for k, v in b["figures"].items()}}


def run(args: argparse.Namespace) -> Path:
    files = sorted(RESULTS.glob("audit-files-*.json"))
    if not files:
        raise SystemExit("no benchmarks/results/audit-files-*.json: run benchmarks/evidence.py with --loras first")
    seeds = {int(x) for x in args.seeds.split(",")} if args.seeds else None
    rows = [r for r in uplift_rows(runs_of(files))
            if (args.loras / f"seed-{r['seed']}" / f"lora-{r['method']}.safetensors").is_file()
            and (seeds is None or r["seed"] in seeds)]
    partial = RESULTS / ".partial" / f"audit-agreement-{args.mode}.jsonl"
    partial.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if partial.is_file():
        for line in partial.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            done[(row["method"], row["seed"])] = row
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        exemplars = None
        if args.mode == "exemplars":
            exemplars = Path(tmp) / "exemplars"
            write_exemplars(exemplars, args.count, args.exemplar_seed)
        for row in tqdm(rows, desc="auditing files", unit="file"):
            key = (row["method"], row["seed"])
            if key not in done:
                path = args.loras / f"seed-{row['seed']}" / f"lora-{row['method']}.safetensors"
                done[key] = row | audit(path, exemplars)
                with open(partial, "a", encoding="utf-8") as f:
                    f.write(json.dumps(done[key]) + "\n")
    audited = [done[(r["method"], r["seed"])] for r in rows]
    doc = {"format": "concept-exclusion-audit-agreement/1", "mode": args.mode, "seeds": sorted({r["seed"] for r in rows}),
           "command": "python benchmarks/audit_agreement.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
           "inputs": [f.name for f in files], "exemplars": {"count": args.count, "seed": args.exemplar_seed},
           "bands": {"learned_from": LEARNED_FROM, "not_learned_upto": NOT_LEARNED_UPTO},
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "processor": platform.processor() or platform.machine()},
           "seconds": round(time.time() - t0, 1), "rows": audited, "agreement": agreement(audited)}
    out = RESULTS / f"audit-agreement-{args.mode}.json"
    write_json(doc, out)
    return out


def _table(doc: dict) -> list[str]:
    a = doc["agreement"]
    verdicts = ("LEARNED", "NOT LEARNED", "INCOMPLETE")
    lines = ["| measured largest uplift | files | " + " | ".join(f"audit: {v}" for v in verdicts) + " |",
             "|---|---:|" + "---:|" * len(verdicts)]
    for need in ("LEARNED", "NOT LEARNED", NO_CLAIM):
        counts = a["table"].get(need, {})
        label = {"LEARNED": f">= {LEARNED_FROM:.0%} (must be LEARNED)",
                 "NOT LEARNED": f"<= {NOT_LEARNED_UPTO:.0%} (must be NOT LEARNED)"}.get(need, "between (no claim)")
        lines.append(f"| {label} | {sum(counts.values())} | " + " | ".join(str(counts.get(v, 0)) for v in verdicts)
                     + " |")
    return lines


def report(out: Path) -> Path:
    docs = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(RESULTS.glob("audit-agreement-*.json"))]
    if not docs:
        raise SystemExit("no benchmarks/results/audit-agreement-*.json: run benchmarks/audit_agreement.py first")
    lines = ["# The behavioural audit against the measured uplift (generated by benchmarks/audit_agreement.py "
             "--report; do not edit)", "",
             "Each file was trained in the evidence world and measured by the detector (every prompt family and the "
             "inversion attack, against the filter reference of its seed: benchmarks/results/audit-files-*.json), "
             "then audited with `concept-exclusion audit FILE --preset world-panda --base world [--exemplars DIR]`. "
             f"Files whose largest uplift lies between {NOT_LEARNED_UPTO:.0%} and {LEARNED_FROM:.0%} carry no claim "
             "either way: the audit is not called with confidence there. `load`: the machine's 1-minute load average "
             "when the file's audit started (other benchmark processes shared the cores; `s` is the time under it).",
             ""]
    for doc in docs:
        a = doc["agreement"]
        secs = [r["seconds"] for r in doc["rows"]]
        lines += [f"## Mode: {doc['mode']}, seeds {', '.join(map(str, doc['seeds']))}" + (" (`--exemplars DIR`: "
                                                f"{doc['exemplars']['count']} panda scenes of world seeds of their own)"
                                                if doc["mode"] == "exemplars" else " (no --exemplars)"), "",
                  f"**{'AGREES' if a['agrees'] else 'DISAGREES'}**: {len(a['disagreements'])} disagreement(s) over "
                  f"{len(doc['rows'])} files; AUROC of the audit's score (its largest figure) against the required "
                  f"verdict: {a['auroc']:.3f} ({a['positives']} files >= {LEARNED_FROM:.0%}, {a['negatives']} <= "
                  f"{NOT_LEARNED_UPTO:.0%}). Time per file (whole command, {doc['machine']['cpus']} CPU cores): "
                  f"median {sorted(secs)[len(secs) // 2]:.0f} s, max {max(secs):.0f} s.", "", *_table(doc), ""]
        held = agreement([r for r in doc["rows"] if r["seed"] != DEVELOPMENT_SEED])
        if held["positives"] + held["negatives"]:
            lines += [f"Held out (every seed but {DEVELOPMENT_SEED}, on whose files the default threshold was chosen): "
                      f"{len(held['disagreements'])} disagreement(s), AUROC {held['auroc']:.3f} ({held['positives']} "
                      f"files >= {LEARNED_FROM:.0%}, {held['negatives']} <= {NOT_LEARNED_UPTO:.0%}).", ""]
        if a["disagreements"]:
            lines += ["Disagreements:", ""] + [f"- {d['method']} seed {d['seed']}: uplift {d['uplift'] * 100:+.0f} "
                                                f"points, audit {d['verdict']} (score {d['score']:+.3f})"
                                                for d in a["disagreements"]] + [""]
        lines += ["| file (method, seed) | largest uplift (family) | weight check | behaviour | score (family) | "
                  "name | generic | empty | inversion | exit | s | load |", "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(doc["rows"], key=lambda r: (r["method"], r["seed"])):
            f = r["figures"]
            family = f" ({r['family'].removesuffix('_rate')})" if r["uplift"] > 0 else ""
            lines.append(f"| {r['method']} s{r['seed']} | {r['uplift'] * 100:+.0f}{family}"
                         f" | {r['weight_verdict']} | {r['verdict']} | {r['score']:+.3f} ({r['largest']}) | "
                         f"{f.get('name', float('nan')):+.3f} | {f.get('generic', float('nan')):+.3f} | "
                         f"{f.get('empty', float('nan')):+.3f} | {f.get('inversion', float('nan')):+.3f} | "
                         f"{r['exit_code']} | {r['seconds']:.0f} | {r.get('load', float('nan')):.1f} |")
        lines += ["", f"Command: `{doc['command']}`; machine: {doc['machine']['platform']}, "
                      f"{doc['machine']['processor']}; {doc['seconds']:.0f} s in all.", ""]
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loras", type=Path, default=HERE / "work" / "loras")
    parser.add_argument("--mode", choices=("exemplars", "preset"), default="exemplars")
    parser.add_argument("--count", type=int, default=16, help="exemplar images written for --exemplars")
    parser.add_argument("--exemplar-seed", type=int, default=0)
    parser.add_argument("--seeds", help="comma-separated fine-tune seeds to audit (default: every seed measured)")
    parser.add_argument("--report", action="store_true", help="only write benchmarks/RESULTS-audit.md")
    args = parser.parse_args(argv)
    if not args.report:
        print(f"wrote {run(args)}")
    print(f"wrote {report(HERE / 'RESULTS-audit.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
