"""A real ``concept-exclusion train`` process killed with SIGKILL between checkpoints, then resumed.

Checked: the kill left no half file and no LoRA; the checkpoint it left equals the uninterrupted run's
checkpoint of the same step (LoRA, AdamW state and the exclusion's stored values); the resumed run uses
the same basis (same sha256) and keeps the invariant; its final LoRA equals the uninterrupted run's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from concept_exclusion.commands.main import main
from concept_exclusion.metadata import PREFIX, read_basis
from concept_exclusion.safeio import read_safetensors

from helpers import make_preset, write_captioned_images

STEPS = 40
EVERY = 4



@pytest.fixture(scope="module")
def setup(tmp_path_factory):

    from helpers.models import build_pipeline

    root = tmp_path_factory.mktemp("resume")
    captions = ["a photo of a cat", "the zorblax logo on a shirt", "a red car", "a dog", "a tree", "zorblax sign"]
    data = write_captioned_images(root / "data", captions, size=lambda i: (36, 32))
    preset = root / "logo.toml"
    preset.write_text(make_preset().toml_text)
    base = build_pipeline(root, "sd")
    argv = ["train", "--base", str(base), "--data", str(data), "--preset", str(preset), "--resolution", "32",
            "--batch_size", "2", "--rank", "2", "--learning_rate", "1e-3", "--sample_steps", "0", "--seed", "5",
            "--max_steps", str(STEPS), "--checkpoint_every", str(EVERY), "--keep_checkpoints", "0",
            "--log_every", "1000"]
    return {"root": root, "argv": argv, "base": base, "preset": preset}


def _checkpoints(output: Path) -> list[Path]:
    folder = output / "checkpoints"
    return sorted(folder.glob("step-*.safetensors")) if folder.is_dir() else []


def _kill_after_first_checkpoint(argv: list[str], output: Path) -> tuple[int, list[Path]]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    child = subprocess.Popen([sys.executable, "-m", "concept_exclusion", *argv, "--output", str(output)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not _checkpoints(output):
            if child.poll() is not None:
                raise AssertionError(f"train ended before its first checkpoint (exit {child.returncode}): "
                                     f"{child.stderr.read().decode()[-2000:]}")
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()
    return child.returncode, _checkpoints(output)


def _step(path: Path) -> int:
    return int(path.stem.split("-")[1])


def _down_basis_leak(tensors: dict[str, torch.Tensor], basis: torch.Tensor) -> float:
    """Largest |A U| over the to_k/to_v LoRA down factors of a kohya-layout file."""
    downs = [v for k, v in tensors.items() if "attn2_to_" in k and k.endswith("lora_down.weight")
             and ("to_k" in k or "to_v" in k)]
    assert downs, sorted(tensors)[:5]
    return max(float((d.double() @ basis).abs().max()) for d in downs)


@pytest.mark.slow
def test_sigkill_between_checkpoints_then_resume(setup, capsys):
    torch.set_num_threads(1)
    root, argv = setup["root"], setup["argv"]

    # the run that is killed (a real process, SIGKILL right after its first checkpoint appears)
    killed = root / "killed"
    code, left = _kill_after_first_checkpoint(argv, killed)
    assert code == -signal.SIGKILL, f"expected death by SIGKILL, got exit {code}"
    assert not (killed / "lora.safetensors").exists(), "the killed run had already finished"
    assert left and _step(left[-1]) < STEPS
    for p in left:  # each checkpoint visible under its name is complete
        read_safetensors(p)
    last = left[-1]
    kill_step = _step(last)

    # the uninterrupted run, same settings, in this process with the same thread count
    reference = root / "reference"
    assert main(argv + ["--output", str(reference)]) == 0
    capsys.readouterr()
    same_step = reference / "checkpoints" / last.name
    assert same_step.is_file()
    k_tensors, k_meta = read_safetensors(last)
    r_tensors, r_meta = read_safetensors(same_step)
    assert k_tensors.keys() == r_tensors.keys()
    exclusion_keys = [k for k in k_tensors if k.startswith("exclusion/")]
    assert exclusion_keys, "the checkpoint carries no exclusion state"
    for k in k_tensors:  # bit-identical here; the tolerance only allows for another BLAS in another process
        a, b = k_tensors[k], r_tensors[k]
        assert a.shape == b.shape and a.dtype == b.dtype, k
        assert torch.allclose(a.double(), b.double(), rtol=0, atol=1e-6), f"checkpoint of step {kill_step} " \
                                                                          f"differs at {k}"

    # resume the killed run from its output folder
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    assert main(argv + ["--output", str(killed), "--resume", str(killed)]) == 0
    capsys.readouterr()
    assert not list((killed / "checkpoints").glob(".*.tmp")), "a temporary of the killed write was left"
    log_text = (killed / "train.log").read_text()
    assert "resumed from" in log_text and last.name in log_text

    resumed_t, resumed_m = read_safetensors(killed / "lora.safetensors")
    ref_t, ref_m = read_safetensors(reference / "lora.safetensors")

    # same basis: the embedded bases agree, and so do their sha256 (of the decoded float64 matrices)
    import hashlib

    bases = [read_basis(m, "context") for m in (resumed_m, ref_m)]
    assert resumed_m[PREFIX + "basis.context"] == ref_m[PREFIX + "basis.context"]
    digests = [hashlib.sha256(b.numpy().tobytes()).hexdigest() for b in bases]
    assert digests[0] == digests[1]
    from concept_exclusion import load_preset
    from concept_exclusion.integrations.diffusers import subspace_from_pipeline
    from helpers.models import load_pipeline

    sub = subspace_from_pipeline(load_preset(setup["preset"]), load_pipeline(setup["base"]), None)
    outside = bases[0] - sub.basis() @ (sub.basis().T @ bases[0])
    assert float(outside.abs().max()) < 5e-3, "the file's basis is not the pipeline's (beyond fp16 storage)"
    assert k_meta["basis_sha256"] == sub.sha256, "the checkpoint must record the basis it was trained against"

    # the invariant carried on through the kill and the resume: A U = 0 for the key/value down factors
    assert resumed_m[PREFIX + "steps"] == str(STEPS)
    assert float(resumed_m[PREFIX + "leakage_max"]) <= 1e-5
    assert _down_basis_leak(resumed_t, sub.basis()) <= 1e-6
    stored = {k: v for k, v in k_tensors.items() if k.startswith("exclusion/")}
    assert all(torch.isfinite(v).all() for v in stored.values())

    # the final LoRA equals the uninterrupted run's
    assert resumed_t.keys() == ref_t.keys()
    worst = max(float((resumed_t[k].double() - ref_t[k].double()).abs().max()) for k in ref_t)
    assert worst <= 1e-6, f"resumed LoRA differs from the uninterrupted run by {worst:.3e}"
    print(f"killed after checkpoint {kill_step} of {STEPS} steps; resumed LoRA vs uninterrupted: max diff {worst:.3e}"
          f", |A U| {_down_basis_leak(resumed_t, sub.basis()):.2e}")
    assert any(float(v.abs().max()) > 0 for k, v in ref_t.items() if "lora_up" in k), "nothing was learned"
