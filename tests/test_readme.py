"""The README as a user reads it: the Python example runs as printed and keeps the exact-mode invariant, the
printed signature of ``attach`` is the code's, and the first screen's figures are the result files'."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README has no python example"
    code = blocks[0].replace("/tmp/ce-tiny", str(tmp_path / "tiny"))
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # our own README, not user input
    leak = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert leak <= 1e-5
    assert namespace["metadata"]["concept_exclusion.preset_name"] == "example-logo"
    assert all(isinstance(v, str) for v in namespace["metadata"].values())


def test_readme_prints_the_signature_of_attach():
    """The README's one-line signature of ``ConceptExclusion.attach`` is the code's, name for name and default
    for default."""
    import inspect

    from concept_exclusion import ConceptExclusion

    printed = re.search(r"`ConceptExclusion\.attach(\(.*?\))`", README.read_text(encoding="utf-8"))
    assert printed, "README does not print attach's signature"
    params = inspect.signature(ConceptExclusion.attach).parameters.values()
    parts, star = [], False
    for p in params:  # names and defaults, as the README shows them (no annotations)
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        parts.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    assert printed.group(1) == "(" + ", ".join(parts) + ")"


def test_first_screen_figures_are_the_result_files():
    """Every figure of the first screen is what benchmarks/evidence_report.py generates from benchmarks/results/."""
    from concept_exclusion_world.demo import DEFAULT_METHOD
    from concept_exclusion_world.first_screen import with_first_screen
    from concept_exclusion_world.report import load_results

    text = README.read_text(encoding="utf-8")
    files = sorted((README.parent / "benchmarks" / "results").glob("evidence-*.json"))
    assert files, "no evidence results to generate the first screen from"
    doc = load_results(files, DEFAULT_METHOD)
    assert with_first_screen(text, doc) == text
    screen = text.split("## Quick start")[0]
    assert "provably" not in screen and "Methods that meet the bar:" in screen
    assert doc["calibration"]["ok"] and len(doc["seeds"]) >= 5  # the instrument held, on enough seeds
