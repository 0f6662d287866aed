"""`concept-exclusion demo`, reduced to a few steps and samples, end to end through the CLI."""

from __future__ import annotations

import json

import pytest

from concept_exclusion.cli import main
from concept_exclusion.safeio import read_header


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONCEPT_EXCLUSION_CACHE", str(tmp_path / "cache"))


def test_demo_writes_json_grid_and_loras(tmp_path, capsys):
    out, js = tmp_path / "out", tmp_path / "figures.json"
    rc = main(["demo", "--out", str(out), "--json", str(js), "--steps", "3", "--samples", "2"])
    assert rc == 0
    doc = json.loads(js.read_text())
    assert set(doc["methods"]) == {"plain", "exact-context"}
    for m in doc["methods"].values():
        for key in ("leak_rate", "empty_prompt_rate", "heldout_loss"):
            assert isinstance(m[key], float)
        assert 0.0 <= m["leak_rate"] <= 1.0 and m["heldout_loss"] > 0
        # world 2: the allowed brand's binding is measured next to the protected one's
        assert 0.0 <= m["allowed_leak_rate"] <= 1.0 and isinstance(m["allowed_probe"], float)
    assert "leak_reduction" in doc and doc["default_method"] == "exact-context"
    assert "name_probe_reduction" in doc  # None when plain's name probe is not above 0 (3 steps learn little)
    assert all(isinstance(m["name_probe"], float) for m in doc["methods"].values())
    assert "one seed" in doc["seeds_note"]
    assert (out / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _, meta_plain = read_header(out / "lora-plain.safetensors")
    header, meta_ex = read_header(out / "lora-exact-context.safetensors")
    assert meta_plain["concept_exclusion.mode"] == "none"
    assert meta_ex["concept_exclusion.mode"] == "exact"
    assert meta_ex["concept_exclusion.preset_name"] == "world-logo-contexts-preserve"
    assert meta_ex["concept_exclusion.project_context"] == "true"
    assert float(meta_ex["concept_exclusion.leakage_max"]) < 1e-4
    assert any(k.endswith("attn2.to_k.lora.down.weight") for k in header)
    printed = capsys.readouterr().out
    assert "exact-context" in printed and "leak rate" in printed and "allowed probe" in printed
    cal = doc["calibration"]
    assert cal["precision"] >= 0.99 and cal["allowed_precision"] >= 0.99 and cal["allowed_recall"] >= 0.99


@pytest.mark.slow
def test_full_benchmark_reduced_writes_results_markdown(tmp_path):
    out = tmp_path / "full"
    rc = main(["demo", "--full", "--out", str(out), "--seeds", "2", "--steps", "2", "--samples", "2",
               "--methods", "plain,filter,exact-context", "--full-methods", "plain,exact-context"])
    assert rc == 0
    text = (out / "RESULTS-evidence.md").read_text()
    assert "concept-exclusion demo --full" in text or "demo" in text
    assert "| lora | exact-context |" in text and "| full | exact-context |" in text
    assert "base (no fine-tune)" in text
    doc = json.loads((out / "results.json").read_text())
    kinds = {(r["kind"], r["method"]) for r in doc["runs"]}
    assert ("full", "plain") in kinds and ("lora", "filter") in kinds and ("lora", "base") in kinds
    assert all("attack_ti" in r for r in doc["runs"] if r["method"] in ("base", "plain", "exact-context"))


def test_demo_rejects_unknown_method(tmp_path, capsys):
    rc = main(["demo", "--full", "--out", str(tmp_path), "--methods", "plain,nonsense"])
    assert rc == 2
    assert "nonsense" in capsys.readouterr().err
