"""Generate benchmarks/RESULTS-evidence.md, and the README's first-screen table, from the evidence JSON files in
benchmarks/results/.

    python benchmarks/evidence_report.py                       # every evidence-*.json there
    python benchmarks/evidence_report.py FILE.json ... --out report.md --readme /tmp/README.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from concept_exclusion_world.demo import DEFAULT_METHOD
from concept_exclusion_world.files import atomic_path
from concept_exclusion_world.first_screen import with_first_screen
from concept_exclusion_world.report import write_report

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, help="result JSON files (default: benchmarks/results/evidence-*.json)")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-evidence.md")
    parser.add_argument("--readme", type=Path, default=HERE.parent / "README.md",
                        help="the README whose first-screen table is regenerated")
    args = parser.parse_args(argv)
    files = args.files or sorted((HERE / "results").glob("evidence-*.json"))
    if not files:
        parser.error("no evidence-*.json in benchmarks/results/; run benchmarks/evidence.py first")
    doc = write_report(files, args.out, DEFAULT_METHOD)
    readme = with_first_screen(args.readme.read_text(encoding="utf-8"), doc)
    with atomic_path(args.readme) as tmp:
        tmp.write_text(readme, encoding="utf-8")
    print(f"wrote {args.out} and the first screen of {args.readme}: calibration "
          f"{'passed' if doc['calibration']['ok'] else 'FAILED'}; meets the bar: {', '.join(doc['passing']) or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
