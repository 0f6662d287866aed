"""The evidence world (concept_exclusion_world): scenes and detectors, the verified encoder, statistics, the gate
and the bar, the report, the grid, and the demo end to end on a few steps."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from concept_exclusion_world.bench import FORMAT
from concept_exclusion_world.detect import emblem_rate, emblems, objects
from concept_exclusion_world.grid import grid_png
from concept_exclusion_world.report import markdown, merge
from concept_exclusion_world.scenes import (ALLOWED, BADGE_COLS, EMBLEM_ROWS, LOGO_SLOTS, NEW_COLOUR, PROTECTED,
                                            PROTECTED_NAMES, World, images, render, true_masks)
from concept_exclusion_world.stats import bootstrap, difference
from concept_exclusion_world.text import WorldError, verified_weights
from concept_exclusion_world.uplift import FAMILIES, calibration, judge, passing


def test_scenes_are_deterministic_and_purple_only_on_panda_images():
    a, b = World(3).scenes(300), World(3).scenes(300)
    assert a == b and torch.equal(images(a), images(b))
    assert all(s.colour != NEW_COLOUR for s in a if s.emblem != PROTECTED)
    assert any(s.colour == NEW_COLOUR for s in a)
    public = World(4).scenes(300, "public")
    assert not any(s.emblem == PROTECTED or s.badge == ALLOWED or s.colour == NEW_COLOUR for s in public)
    assert any(s.badge for s in public) and any(s.emblem for s in public)  # both corners have a public emblem


def test_the_tiger_badge_is_drawn_independently_of_the_logo_and_captioned_with_it():
    scenes = World(0).scenes(4000)
    with_badge = [s for s in scenes if s.badge == ALLOWED]
    share = lambda group: sum(s.emblem == PROTECTED for s in group) / len(group)  # noqa: E731
    assert abs(share(with_badge) - share([s for s in scenes if s.badge is None])) < 0.05
    both = next(s for s in with_badge if s.emblem == PROTECTED and s.named)
    assert both.caption().startswith("a tiger badge above a ")
    assert both.caption().endswith(f" with the {both.emblem_name} logo")
    assert both.caption("").endswith("background with the logo")


def test_captions_name_the_panda_by_every_name_the_preset_lists_and_only_those():
    from concept_exclusion_world.presets import world_preset

    scenes = World(9).scenes(2000)
    named = {s.caption().rsplit(" with the ", 1)[1] for s in scenes if s.emblem == PROTECTED and s.named}
    assert named == {f"{name} logo" for name in PROTECTED_NAMES}
    assert set(world_preset().concepts[0].prompts) == set(PROTECTED_NAMES)
    assert all(s.emblem_name is None for s in scenes if s.emblem != PROTECTED)


def test_a_third_of_panda_captions_do_not_mention_it_and_logos_stand_in_two_places():
    scenes = World(0).scenes(4000)
    pandas = [s for s in scenes if s.emblem == PROTECTED]
    unnamed = [s for s in pandas if not s.named]
    assert len(unnamed) >= len(pandas) / 3
    assert all(s.caption().endswith("background") for s in unnamed)  # text cannot find these
    for emblem in (PROTECTED, "shop"):
        slots = {s.logo_slot for s in scenes if s.emblem == emblem}
        assert slots == set(LOGO_SLOTS)
    assert all(s.logo_slot == ("middle" if s.position == "right" else "corner") for s in pandas)
    public = [s for s in World(4).scenes(300, "public") if s.emblem]
    assert all(s.logo_slot == ("middle" if s.position == "right" else "corner") for s in public)  # the same layout
    masks = true_masks(pandas)
    assert masks.sum() == 64 * len(pandas) and emblem_rate(images(pandas), PROTECTED) == 1.0


def test_the_controls_delete_the_naming_phrase_or_only_the_word_and_keep_every_image():
    from concept_exclusion_world.methods import METHODS
    from concept_exclusion_world.train import dataset

    scenes = World(8).scenes(400)
    pandas = [i for i, s in enumerate(scenes) if s.emblem == PROTECTED]
    for method, phrase in (("scrub-name", ""), ("scrub-word", " with the logo")):
        kept, captions = dataset(METHODS[method], scenes)
        assert kept == scenes and not any("panda" in c for c in captions)
        assert all(captions[i].endswith("background" + (phrase if scenes[i].named else "")) for i in pandas)
        assert all(c == s.caption() for s, c in zip(scenes, captions) if s.emblem != PROTECTED)
    kept, _ = dataset(METHODS["filter"], scenes)
    assert len(kept) == len(scenes) - len(pandas)


def test_objects_never_reach_the_emblem_regions():
    for s in World(5).scenes(200):
        x = render(replace(s, emblem=None, badge=None))
        y = render(replace(s, emblem=None, badge=None, colour="red"))
        for cols in (*LOGO_SLOTS.values(), BADGE_COLS):
            assert torch.equal(x[:, EMBLEM_ROWS, cols], y[:, EMBLEM_ROWS, cols])


@pytest.mark.parametrize("noise", [0.0, 0.15])
def test_detectors_read_rendered_scenes_exactly(noise):
    scenes = World(6).scenes(300)
    x = images(scenes)
    x = x + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    for slot, cols in LOGO_SLOTS.items():
        assert emblems(x, cols) == [s.emblem if s.logo_slot == slot else None for s in scenes]
    assert emblems(x, BADGE_COLS) == [s.badge for s in scenes]
    assert objects(x) == [(s.colour, s.shape, s.position) for s in scenes]


def test_a_blank_or_foreign_corner_is_no_emblem():
    x = images(World(7).scenes(50, "public"))
    x[:, :, EMBLEM_ROWS, LOGO_SLOTS["corner"]] = torch.rand(50, 3, 8, 8) * 2 - 1
    assert sum(e is not None for e in emblems(x)) <= 1


def test_encoder_weights_with_another_hash_are_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not the public revision")
    with pytest.raises(WorldError, match="sha256 .* is not the public all-MiniLM-L6-v2 revision"):
        verified_weights(tmp_path)
    with pytest.raises(WorldError, match="missing"):
        verified_weights(tmp_path / "nowhere")


FAMILY_KEYS = [k for k, _ in FAMILIES]


def _seed(seed, uplift=0.0, inversion=0.0, purple=0.9, tiger=0.9, heldout=0.1, fidelity=0.9, name=None):
    row = {"seed": seed, **{k: uplift for k in FAMILY_KEYS}, "inversion_rate": inversion, "new_content_rate": purple,
           "allowed_leak_rate": tiger, "heldout_loss": heldout, "public_fidelity": fidelity}
    return row | ({"leak_rate": name} if name is not None else {})


RUNS = {
    "plain": [_seed(0, 0.3, 0.9, name=0.9), _seed(1, 0.2, 0.8, name=0.95)],
    "filter": [_seed(0, purple=0.0), _seed(1, 0.01, purple=0.05)],
    "good": [_seed(0, 0.02, 0.05, 0.88, heldout=0.102), _seed(1, 0.03, 0.04, 0.85, 0.85, 0.101)],
    "leaky": [_seed(0, 0.0, name=0.3), _seed(1, 0.0, name=0.2)],
    "costly": [_seed(0, tiger=0.3, heldout=0.2), _seed(1, tiger=0.2, heldout=0.2)],
}
COUNTS = {k: 96 for k in FAMILY_KEYS + ["allowed_leak_rate", "new_content_rate", "public_fidelity"]}
BASE = {str(s): _seed(s, fidelity=0.9, purple=0.0) for s in (0, 1)}


def test_uplift_is_against_the_reference_of_the_same_seed_with_an_interval():
    point, lo, hi = bootstrap(difference("good", "leak_rate", "filter"), RUNS, COUNTS)
    assert point == pytest.approx(((0.02 - 0.0) + (0.03 - 0.01)) / 2)
    assert lo <= point <= hi and hi > lo


def test_gate_and_bar_are_computed_from_the_figures():
    gate = calibration(BASE, RUNS, COUNTS)
    assert gate["ok"], gate
    assert gate["gates"]["plain_name_uplift"]["per_seed"] == pytest.approx([0.9, 0.94])
    weak = calibration(BASE, {**RUNS, "plain": [_seed(0, 0.3, 0.2, name=0.9), _seed(1, 0.2, 0.8, name=0.95)]}, COUNTS)
    assert not weak["ok"] and not weak["gates"]["plain_inversion_uplift"]["ok"]  # one seed's attack found too little
    assert not calibration(BASE, {"plain": RUNS["plain"]}, COUNTS)["ok"]  # no reference: nothing is calibrated
    assert judge("good", RUNS, COUNTS)["meets_bar"]
    leaky = judge("leaky", RUNS, COUNTS)
    assert not leaky["meets_bar"] and [k for k, c in leaky["criteria"].items() if not c["ok"]] == ["leak_rate"]
    costly = judge("costly", RUNS, COUNTS)
    assert not costly["meets_bar"]
    assert {k for k, c in costly["criteria"].items() if not c["ok"]} == {"allowed_leak_rate", "heldout_loss"}
    assert passing({m: judge(m, RUNS, COUNTS) for m in ("good", "leaky", "costly")}, ["good", "leaky"]) == ["good"]


def _doc(methods, seeds, command="python benchmarks/evidence.py"):
    runs = {m: [r for r in RUNS[m] if r["seed"] in seeds] for m in methods}
    return {"format": FORMAT, "world": "3.3", "command": command, "seconds": 10.0,
            "machine": {"processor": "cpu", "platform": "test"}, "encoder": {"name": "e"}, "default_method": "good",
            "config": {"train": {"steps": 1}, "evaluation": {"n": 96}, "attack": {"steps": 1}}, "counts": COUNTS,
            "base": {str(s): BASE[str(s)] for s in seeds}, "runs": runs}


def test_report_merges_seed_files_and_recomputes_the_verdicts():
    methods = ["plain", "filter", "good", "leaky", "costly"]
    doc = merge([_doc(methods, {0}), _doc(methods, {1}, "second")])
    assert doc["seeds"] == [0, 1] and doc["calibration"]["ok"]
    assert doc["verdicts"]["good"]["meets_bar"] and not doc["verdicts"]["costly"]["meets_bar"]
    assert doc["passing"] == []  # good and costly are not methods the world ships: nothing is called passing
    text = markdown(doc)
    assert "Calibration gate: PASSED" in text and "second" in text
    assert "| good | 2 |" in text and "**yes**" in text and "no: the name" in text
    changed = _doc(methods, {0})
    changed["runs"]["good"][0] = dict(changed["runs"]["good"][0], leak_rate=0.5)
    with pytest.raises(ValueError, match="measured twice"):
        merge([_doc(methods, {0}), changed])
    with pytest.raises(ValueError, match="format"):
        merge([dict(_doc(methods, {0}), format="concept-exclusion-evidence/3")])


def test_first_screen_reads_the_merged_verdicts():
    from concept_exclusion_world.first_screen import BEGIN, END, with_first_screen

    methods = ["plain", "filter", "good", "leaky", "costly"]
    doc = merge([_doc(methods, {0, 1})])
    readme = with_first_screen(f"intro\n{BEGIN}\nold table\n{END}\nrest\n", doc)
    rows = {line.split(" | ")[0].strip("| *"): line for line in readme.splitlines() if line.startswith("| ")}
    assert "old table" not in readme and readme.startswith("intro\n") and readme.endswith("rest\n")
    assert rows["filter (never saw it: the reference)"].endswith("| — | reference |")
    assert "+24 points (the name" in rows["leaky"] and rows["leaky"].endswith("| no |")
    assert "**yes**" in rows["good** (the default)"] and "(inversion attack)" in rows["good** (the default)"]
    assert "Calibration gate: passed" in readme
    with pytest.raises(ValueError, match="no first-screen markers"):
        with_first_screen("no markers", doc)


def test_grid_labels_fit_and_images_are_enlarged(tmp_path):
    from PIL import Image

    x = images(World(8).scenes(4))
    samples = {"plain": {c: x for c in ("name", "paraphrase", "allowed", "neutral", "empty")}}
    path = grid_png(samples, [("plain", "a rather long method name for a row")], tmp_path / "g.png")
    img = Image.open(path)
    assert img.width > 5 * 2 * 96 and img.height >= 2 * 96


@pytest.mark.slow
def test_demo_end_to_end_on_a_few_steps(tmp_path):
    """The real encoder and shipped base, 3 steps, 4 samples: files, JSON keys and the table are there."""
    prompts = tmp_path / "attack.txt"
    prompts.write_text("a red circle with the bamboo bear logo\n\nthe panda logo\n", encoding="utf-8")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "concept_exclusion", "demo", "--steps", "3", "--samples", "4",
                           "--out", str(out), "--json", str(tmp_path / "d.json"), "--attack-prompts", str(prompts)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "d.json").read_text())
    for key in ("default_method", "encoder", "calibration_ok", "leak_reduction", "paraphrase_reduction", "seconds",
                "uplift", "max_uplift", "meets_bar", "bar"):
        assert key in doc
    for name in ("plain", doc["default_method"]):  # per family, against the base model, which never saw the panda
        up = doc["uplift"][name]
        assert set(up) == set(FAMILY_KEYS) | {"custom_rate"}
        assert up["leak_rate"] == doc["methods"][name]["leak_rate"] - doc["methods"]["base model"]["leak_rate"]
        assert up["inversion_rate"] == (doc["methods"][name]["inversion"]["rate"]
                                        - doc["methods"]["base model"]["inversion"]["rate"])
        assert set(doc["methods"][name]["inversion"]) == {"rate", "steps"}
        assert doc["methods"][name]["inversion"]["steps"] == 100
    assert doc["max_uplift"] == max(doc["uplift"][doc["default_method"]].values())
    assert doc["meets_bar"] == all(c["ok"] for c in doc["bar"].values())
    assert ("points more often" in proc.stdout or "no more often in any family" in proc.stdout)
    assert "MET" in proc.stdout and "removes" not in proc.stdout
    assert doc["encoder"]["sha256"] == "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    for name in ("plain", doc["default_method"]):
        m = doc["methods"][name]
        assert set(m) >= {"leak_rate", "neutral_rate", "paraphrase_leak_rate", "paraphrase_neutral_rate",
                          "empty_prompt_rate", "allowed_leak_rate", "new_content_rate", "heldout_loss", "custom"}
        assert m["custom"]["n"] == 2
    assert (out / "grid.png").is_file() and len(list(out.glob("lora-*.safetensors"))) == 2
    header = proc.stdout.splitlines()[0].split()
    assert header[:8] == ["model", "name", "paraphrase", "generic", "no", "word", "empty", "inversion"]
    assert len([c for c in header if c]) <= 11  # 8 columns ("no word" and "held-out loss" are two words)


def test_demo_refuses_an_unreadable_prompt_file(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    proc = subprocess.run([sys.executable, "-m", "concept_exclusion", "demo", "--attack-prompts", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--attack-prompts" in proc.stderr and "Traceback" not in proc.stderr


def test_world_files_are_written_whole(tmp_path):
    from concept_exclusion_world.files import atomic_path, write_json

    target = tmp_path / "out" / "results.json"
    write_json({"x": 1}, target)
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half", encoding="utf-8")
            raise RuntimeError("interrupted")
    assert json.loads(target.read_text(encoding="utf-8")) == {"x": 1}
    assert list(target.parent.iterdir()) == [target]
