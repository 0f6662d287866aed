"""The README's Python example runs as printed and keeps the exact-mode invariant."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README has no python example"
    code = blocks[0].replace("/tmp/ce-tokenizer", str(tmp_path / "tokenizer"))
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # our own README, not user input
    leak = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert leak <= 1e-5
    assert namespace["metadata"]["concept_exclusion.preset_name"] == "example-logo"
    assert all(isinstance(v, str) for v in namespace["metadata"].values())
