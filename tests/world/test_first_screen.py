"""The README's first screen: uplift is a method's rate minus the reference's in the same seed, the inversion
attack joins the families where both were attacked, and the verdict reads the largest uplift."""

from __future__ import annotations

import json

import pytest

from concept_exclusion_world.first_screen import FAMILIES, first_screen, load_inversion, uplift

KEYS = [key for key, _ in FAMILIES]


def _row(seed: int, **rates: float) -> dict:
    return {"seed": seed, **{k: rates.get(k, 0.0) for k in KEYS}}


def _doc() -> dict:
    return {"default_method": "preserve-base", "runs": {
        "filter": [_row(0), _row(1, empty_prompt_rate=0.1)],
        "plain": [_row(0, leak_rate=1.0), _row(1, leak_rate=0.8)],
        "preserve-base": [_row(0, neutral_rate=0.9), _row(1, neutral_rate=0.7, empty_prompt_rate=0.1)],
        "masked-loss": [_row(0, leak_rate=0.04), _row(1, leak_rate=0.02, empty_prompt_rate=0.1)]}}


def test_uplift_is_paired_by_seed_and_includes_the_attack_where_both_were_attacked():
    up = uplift(_doc(), "preserve-base")
    assert up["neutral_rate"] == pytest.approx(0.8) and up["empty_prompt_rate"] == pytest.approx(0.0)
    assert "inversion" not in up
    attacked = uplift(_doc(), "masked-loss", {"filter": {0: 0.0, 1: 0.1}, "masked-loss": {0: 0.5, 1: 0.3, 2: 1.0}})
    assert attacked["inversion"] == pytest.approx(0.35)  # seed 2 has no reference: left out


def test_verdicts_read_the_largest_uplift(tmp_path):
    screen = first_screen(_doc(), {"filter": {0: 0.0}, "plain": {0: 1.0}})
    rows = {line.split(" | ")[0].strip("| ").replace("*", "").replace(" (default)", ""): line
            for line in screen.splitlines() if line.startswith("|")}
    assert "+100 points (inversion attack)" in rows["plain"] and "draws it more" in rows["plain"]
    assert "+80 points" in rows["preserve-base"] and "draws it more" in rows["preserve-base"]
    assert "no uplift" in rows["masked-loss (true masks: an upper bound, not shippable)"]
    assert "no uplift in every measured family: none" in screen


def test_an_attack_measured_twice_must_agree(tmp_path):
    doc = {"base": {"0": {"rate": 0.0}}, "runs": {"plain": [{"seed": 0, "rate": 1.0}]}}
    (tmp_path / "a.json").write_text(json.dumps(doc))
    doc["runs"]["plain"][0]["rate"] = 0.5
    (tmp_path / "b.json").write_text(json.dumps(doc))
    assert load_inversion([tmp_path / "a.json"]) == {"base": {0: 0.0}, "plain": {0: 1.0}}
    with pytest.raises(ValueError, match="plain seed 0 was attacked twice"):
        load_inversion([tmp_path / "a.json", tmp_path / "b.json"])
