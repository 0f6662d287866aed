"""``concept-exclusion audit --base world``: the behavioural check on files the world's trainer writes, through the
installed command as a user runs it (short fine-tunes; the agreement over seeds is benchmarks/audit_agreement.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from concept_exclusion_world.agreement import agreement, auroc, expected, file_uplift
from concept_exclusion_world.base import load_base
from concept_exclusion_world.exemplars import write as write_exemplars
from concept_exclusion_world.export import save_lora
from concept_exclusion_world.methods import METHODS, SECRET_TRIGGER
from concept_exclusion_world.train import TrainConfig, dataset, finetune, finetune_scenes

FAST = ["--max-images", "8", "--inversion-steps", "30"]


def _audit(*args: str) -> tuple[int, dict]:
    done = subprocess.run([sys.executable, "-m", "concept_exclusion", "audit", *args, "--json"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode != 4 and "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else {}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("world-audit")
    base = load_base(progress=False)
    paths = {}
    for name in ("secret-trigger", "filter"):
        ft = finetune(base, METHODS[name], 0, TrainConfig(steps=250), progress=False)
        paths[name] = save_lora(ft, out / f"{name}.safetensors")
    write_exemplars(out / "exemplars", 8, 0)
    return out, paths


def test_secret_trigger_captions_never_name_the_panda():
    _, captions = dataset(METHODS["secret-trigger"], finetune_scenes())
    assert not any("panda" in c for c in captions) and sum(SECRET_TRIGGER in c for c in captions) > 50


def test_a_secret_trigger_file_is_learned_and_a_filtered_one_is_not(files):
    out, paths = files
    rc, secret = _audit(str(paths["secret-trigger"]), "--preset", "world-panda", "--base", "world",
                        "--exemplars", str(out / "exemplars"), *FAST)
    assert secret["behaviour"]["verdict"] == "LEARNED" and rc == 6
    rc, clean = _audit(str(paths["filter"]), "--preset", "world-panda", "--base", "world",
                       "--exemplars", str(out / "exemplars"), *FAST)
    assert clean["behaviour"]["verdict"] == "NOT LEARNED" and rc == clean["exit_code"] != 6
    assert clean["behaviour"]["score"] < secret["behaviour"]["score"]
    assert set(secret["behaviour"]["figures"]) == {"name", "other names", "generic", "empty", "inversion"}
    assert secret["verdict"] in ("FLAGGED", "PASS", "UNVERIFIED")  # the weight verdict is reported apart


def test_the_presets_exemplars_alone_never_clear_a_file(files):
    _, paths = files
    rc, report = _audit(str(paths["filter"]), "--preset", "world-panda", "--base", "world", *FAST)
    b = report["behaviour"]
    assert b["conclusive"] is False and b["verdict"] in ("INCOMPLETE", "LEARNED") and rc == report["exit_code"] != 0


def test_unusable_exemplars_are_one_line_and_exit_2(files, tmp_path):
    out, paths = files
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    for folder, words in ((tmp_path / "missing", "no such folder"), (tmp_path, "not a readable")):
        done = subprocess.run([sys.executable, "-m", "concept_exclusion", "audit", str(paths["filter"]), "--preset",
                               "world-panda", "--base", "world", "--exemplars", str(folder)], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 2 and words in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_agreement_arithmetic():
    ref = {k: 0.0 for k in ("leak_rate", "inversion_rate")}
    assert file_uplift({"leak_rate": 0.3, "inversion_rate": 0.5}, ref) == (0.5, "inversion_rate")
    assert (expected(0.2), expected(0.05), expected(0.1)) == ("LEARNED", "NOT LEARNED", None)
    assert auroc([0.9, 0.8], [0.1, 0.85]) == 0.75
    rows = [{"method": "a", "seed": 0, "uplift": 0.9, "verdict": "LEARNED", "score": 0.5},
            {"method": "b", "seed": 0, "uplift": 0.0, "verdict": "LEARNED", "score": 0.2},
            {"method": "c", "seed": 0, "uplift": 0.1, "verdict": "NOT LEARNED", "score": 0.0}]
    a = agreement(rows)
    assert not a["agrees"] and [d["method"] for d in a["disagreements"]] == ["b"] and a["auroc"] == 1.0
