"""``concept-exclusion train`` end to end on a tiny pipeline saved to disk and a folder of 8 captioned images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from concept_exclusion.commands.main import main
from concept_exclusion.safeio import read_header, read_safetensors
from helpers import make_preset, WORDS, write_captioned_images
from helpers.models import ldm_clip_keys, ldm_unet_keys, ldm_vae_keys

CAPTIONS = ["a photo of the zorblax logo on a red shirt", "a cat on blue background", "zorblax sign in a scene",
            "a dog", "a tree and a house", "a red car", "the zorblax logo", "a green circle"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny SD and SDXL pipelines, a data folder (8 images of odd sizes with captions) and a preset file."""

    from concept_exclusion.testing.tiny import sd_pipeline, sdxl_pipeline

    root = tmp_path_factory.mktemp("train")
    data = write_captioned_images(root / "data", [c + "\n" for c in CAPTIONS], size=lambda i: (40 + 4 * i, 36),
                                  name=lambda i: f"img{i:02d}")
    preset = root / "logo.toml"
    preset.write_text(make_preset(targets='["attention"]').toml_text)
    sd_pipeline(WORDS, root).save_pretrained(root / "sd")
    sdxl_pipeline(WORDS, root).save_pretrained(root / "sdxl")
    return {"sd": root / "sd", "sdxl": root / "sdxl", "data": data, "preset": preset}


def _argv(world, out: Path, kind: str = "sd", *extra: str) -> list[str]:
    return ["train", "--base", str(world[kind]), "--data", str(world["data"]), "--preset", str(world["preset"]),
            "--output", str(out), "--resolution", "32", "--batch_size", "2", "--rank", "4",
            "--learning_rate", "1e-3", "--sample_steps", "2", "--log_every", "5", *extra]


def test_train_ten_steps_then_diffusers_loads_and_generates(world, tmp_path):
    out = tmp_path / "run"
    assert main(_argv(world, out, "sd", "--max_steps", "10", "--gradient_accumulation_steps", "2",
                      "--project_context", "true")) == 0
    lora = out / "lora.safetensors"
    tensors, meta = read_safetensors(lora)
    assert meta["concept_exclusion.preset_name"] == "test-logo"
    assert meta["concept_exclusion.mode"] == "exact" and meta["concept_exclusion.steps"] == "10"
    assert meta["concept_exclusion.project_context"] == "true"
    assert float(meta["concept_exclusion.leakage_max"]) < 1e-5
    assert meta["format"] == "pt" and meta["ss_network_dim"] == "4"  # default layout: kohya
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert any(float(v.abs().max()) > 0 for k, v in tensors.items() if "lora_up" in k)  # it learned something
    samples = sorted((out / "samples").glob("*.png"))
    assert len(samples) == 2
    log_text = (out / "train.log").read_text()
    assert "step 10 loss" in log_text and "leakage" in log_text

    pipe = DiffusionPipeline.from_pretrained(world["sd"])
    pipe.load_lora_weights(str(lora))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of the zorblax logo", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("kind, target", [("sd", "scrub"), ("sdxl", "base")])
def test_output_preservation_trains_named_captions_through_the_scrubbed_ones(world, tmp_path, kind, target,
                                                                             monkeypatch):
    """--output_preservation: the loss the trainer backpropagates is OutputPreservation's (both targets, SD and SDXL's
    pooled path); the captions that name the concept are the ones it pulls."""
    from concept_exclusion.preservation import OutputPreservation

    seen = []
    original = OutputPreservation.loss

    def spy(self, predict, noisy, timesteps, target_, captions, encode, base_predict=None):
        parts = original(self, predict, noisy, timesteps, target_, captions, encode, base_predict=base_predict)
        seen.append((self.target, parts.named, float(parts.preservation.detach())))
        return parts

    monkeypatch.setattr(OutputPreservation, "loss", spy)
    out = tmp_path / "run"
    assert main(_argv(world, out, kind, "--max_steps", "4", "--output_preservation", target)) == 0
    assert (out / "lora.safetensors").is_file()
    assert len(seen) == 4 and all(t == target for t, _, _ in seen)
    named = [n for _, n, _ in seen]
    assert sum(named) > 0 and all(p >= 0 for _, _, p in seen)


def test_config_file_with_flag_override_sdxl_diffusers_layout(world, tmp_path):
    out = tmp_path / "xl"
    config = tmp_path / "train.toml"
    config.write_text(f'''
base = "{world["sdxl"]}"
data = "{world["data"]}"
preset = "{world["preset"]}"
output = "{tmp_path / "ignored"}"
format = "diffusers"
max_steps = 50
resolution = 32
batch_size = 2
rank = 4
sample_prompts = ["a red car"]
sample_steps = 1
project_context = true
''')
    argv = ["train", "--config", str(config), "--output", str(out), "--max_steps", "2", "--mode", "gradient",
            "--strength", "1.0", "--targets", "kv"]
    assert main(argv) == 0
    assert not (tmp_path / "ignored").exists()  # the flag won over the file
    tensors, meta = read_safetensors(out / "lora.safetensors")
    assert meta["concept_exclusion.steps"] == "2" and meta["concept_exclusion.mode"] == "gradient"
    assert meta["concept_exclusion.preset_name"] == "test-logo" and "pooled" in meta["concept_exclusion.ranks"]
    assert meta["concept_exclusion.project_context"] == "true"  # a TOML boolean in the config file
    assert "lora_adapter_metadata" in meta and all(k.startswith("unet.") for k in tensors)
    assert [p.name for p in sorted((out / "samples").glob("*.png"))] == ["00.png"]
    assert (out / "samples" / "00.txt").read_text().strip() == "a red car"
    pipe = DiffusionPipeline.from_pretrained(world["sdxl"])
    pipe.load_lora_weights(str(out / "lora.safetensors"))


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(world, tmp_path):
    common = ("--max_steps", "6", "--gradient_accumulation_steps", "2", "--sample_steps", "0",
              "--checkpoint_every", "2", "--keep_checkpoints", "0", "--seed", "7")
    whole = tmp_path / "whole"
    assert main(_argv(world, whole, "sd", *common)) == 0
    checkpoints = sorted((whole / "checkpoints").glob("step-*.safetensors"))
    assert [p.name for p in checkpoints] == ["step-00000002.safetensors", "step-00000004.safetensors"]
    header, meta = read_header(checkpoints[0])
    assert meta["format"] == "concept-exclusion-train-checkpoint/1" and meta["step"] == "2"
    assert any(k.startswith("optim/") for k in header) and any(k.startswith("exclusion/") for k in header)
    assert any(k.startswith("lora/") for k in header)

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoints[1], resumed / "checkpoints")  # as if killed after step 4's checkpoint ...
    (resumed / "checkpoints" / ".step-00000006.safetensors.x1y2.tmp").write_bytes(b"half")  # ... while writing 6
    assert main(_argv(world, resumed, "sd", *common, "--resume", str(resumed))) == 0
    a, meta_a = read_safetensors(whole / "lora.safetensors")
    b, meta_b = read_safetensors(resumed / "lora.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert meta_a["concept_exclusion.steps"] == meta_b["concept_exclusion.steps"] == "6"
    assert "resumed from" in (resumed / "train.log").read_text()
    assert not list((resumed / "checkpoints").glob(".*.tmp"))

    # killed before its first checkpoint: --resume on the (existing) output folder starts afresh, same result
    early = tmp_path / "early"
    early.mkdir()
    assert main(_argv(world, early, "sd", *common, "--resume", str(early))) == 0
    c, _ = read_safetensors(early / "lora.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)

    # a checkpoint refuses to resume a run with a different trajectory, naming the setting
    other = tmp_path / "other"
    assert main(_argv(world, other, "sd", *common, "--learning_rate", "5e-4", "--resume", str(checkpoints[0]))) == 2


def test_bf16_mixed_precision_keeps_the_invariant(world, tmp_path):
    out = tmp_path / "bf16"
    assert main(_argv(world, out, "sd", "--max_steps", "3", "--mixed_precision", "bf16", "--sample_steps", "1",
                      "--save_dtype", "bfloat16")) == 0
    header, meta = read_header(out / "lora.safetensors")
    assert {e["dtype"] for e in header.values()} == {"BF16"}
    assert float(meta["concept_exclusion.leakage_max"]) < 1e-5  # measured on the float32 master LoRA


def test_single_file_base_checkpoint(world, tmp_path):
    """A single .safetensors checkpoint in the original layout, loaded with from_single_file + --base_config."""
    from safetensors.torch import save_file

    pipe = DiffusionPipeline.from_pretrained(world["sd"])
    checkpoint = {**ldm_unet_keys(pipe.unet.state_dict(), 1, 2), **ldm_vae_keys(pipe.vae.state_dict(), 3, 1),
                  **ldm_clip_keys(pipe.text_encoder.state_dict())}
    single = tmp_path / "tiny-sd.safetensors"
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, single)
    out = tmp_path / "single"
    argv = _argv(world, out, "sd", "--max_steps", "2", "--sample_steps", "0", "--format", "diffusers")
    argv[argv.index("--base") + 1] = str(single)
    assert main(argv + ["--base_config", str(world["sd"]), "--local_files_only"]) == 0
    pipe.load_lora_weights(str(out / "lora.safetensors"))
    assert (out / "lora.safetensors").is_file() and not (out / "samples").exists()


def test_v_prediction_base_as_sd2(world, tmp_path):
    """SD2-768-style bases predict velocity: the target follows the scheduler's prediction_type."""
    import json

    base = tmp_path / "sd2v"
    shutil.copytree(world["sd"], base)
    config_file = base / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["prediction_type"] = "v_prediction"
    config_file.write_text(json.dumps(config))
    out = tmp_path / "v"
    argv = _argv(world, out, "sd", "--max_steps", "2", "--sample_steps", "1")
    argv[argv.index("--base") + 1] = str(base)
    assert main(argv) == 0
    _, meta = read_safetensors(out / "lora.safetensors")
    assert float(meta["concept_exclusion.leakage_max"]) < 1e-5


@pytest.mark.slow
def test_two_processes_with_torchrun_gloo(world, tmp_path):
    """`torchrun --nproc_per_node 2` on CPU: gloo DDP, each rank its slice, only the main process writes."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    argv = _argv(world, out, "sd", "--max_steps", "4", "--sample_steps", "1", "--checkpoint_every", "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "concept_exclusion", *argv]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("LoRA: ") == 1  # printed by the main process only
    log_text = (out / "train.log").read_text()
    assert "2 process(es)" in log_text and "step 4 loss" in log_text
    _, meta = read_safetensors(out / "lora.safetensors")
    assert float(meta["concept_exclusion.leakage_max"]) < 1e-5 and meta["concept_exclusion.steps"] == "4"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002.safetensors"]


def test_bad_input_exits_2_with_a_message(world, tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text('max_stepz = 3\n')
    assert main(["train", "--config", str(config)]) == 2
    assert "max_stepz: unknown key" in capsys.readouterr().err
    assert main(["train", "--data", str(world["data"]), "--preset", str(world["preset"])]) == 2
    assert "--base is required" in capsys.readouterr().err
    assert main(_argv(world, tmp_path / "x", "sd", "--data", str(tmp_path))) == 2
    assert "no images" in capsys.readouterr().err
    assert main(_argv(world, tmp_path / "x", "sd", "--resume", str(tmp_path / "nothing"))) == 2
    assert "no checkpoint file or folder" in capsys.readouterr().err
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"not opened")
    argv = _argv(world, tmp_path / "x", "sd")
    argv[argv.index("--base") + 1] = str(pickled)
    assert main(argv) == 2
    assert "never loaded" in capsys.readouterr().err


def test_data_order_is_a_seeded_permutation_per_epoch():
    from concept_exclusion.integrations.train.data import batch_indices

    n, b = 8, 3  # 2 micro-batches per epoch; 2 images per epoch are skipped
    first = [batch_indices(m, n, b, seed=1) for m in range(6)]
    assert first == [batch_indices(m, n, b, seed=1) for m in range(6)]
    assert first != [batch_indices(m, n, b, seed=2) for m in range(6)]
    for epoch in range(3):
        seen = first[2 * epoch] + first[2 * epoch + 1]
        assert len(set(seen)) == 6
    two_ranks = [batch_indices(0, n, 2, seed=1, rank=r, world=2) for r in (0, 1)]
    assert not set(two_ranks[0]) & set(two_ranks[1])


@pytest.mark.parametrize("region", ["ignore", "base"])
def test_regions_learn_nothing_where_the_concept_is(world, tmp_path, region):
    """Every image of this data set is one of the preset's exemplars, so the concept covers every pixel: with
    --regions the LoRA learns nothing at all (its up-projections stay exactly zero); with --regions off the same
    run learns."""
    import hashlib

    data = write_captioned_images(tmp_path / "data", CAPTIONS[:4])
    files = ", ".join(f'{{ path = "data/{p.name}", sha256 = "{hashlib.sha256(p.read_bytes()).hexdigest()}" }}'
                      for p in sorted(data.glob("*.png")))
    preset = tmp_path / "logo.toml"
    preset.write_text(make_preset(targets='["attention"]').toml_text + f"\n[exemplars]\nfiles = [{files}]\n"
                      f"dilate = 0\nregion = \"{region}\"\n")
    for choice, learns in (("preset", False), ("off", True)):
        out = tmp_path / choice
        argv = _argv(world, out, "sd", "--max_steps", "3", "--regions", choice)
        argv[argv.index("--data") + 1], argv[argv.index("--preset") + 1] = str(data), str(preset)
        assert main(argv) == 0
        tensors, meta = read_safetensors(out / "lora.safetensors")
        ups = [v for k, v in tensors.items() if "lora_up" in k]
        assert any(float(v.abs().max()) > 0 for v in ups) == learns
        record = json.loads(meta["concept_exclusion.regions"])  # what inspect shows: the loss side, recorded
        assert record == ({"region": "off"} if choice == "off" else
                          {"region": region, "locator": "template", "found_in": 4, "images": 4})


def test_a_segmenter_finds_the_regions_from_the_presets_names(world, tmp_path):
    """--segmenter: a local CLIPSeg (tiny, random) prompted with the preset's names, on a preset without exemplars;
    at threshold 1e-9 every pixel is the concept's, so nothing is learned; at 1.0 nothing is, so the run learns."""
    from concept_exclusion.testing.tiny import clipseg_folder

    segmenter = clipseg_folder(WORDS, tmp_path / "seg")
    for threshold, learns in (("1e-9", False), ("1.0", True)):
        out = tmp_path / threshold
        assert main(_argv(world, out, "sd", "--max_steps", "2", "--segmenter", str(segmenter),
                          "--segmenter_threshold", threshold)) == 0
        tensors, _ = read_safetensors(out / "lora.safetensors")
        assert any(float(v.abs().max()) > 0 for k, v in tensors.items() if "lora_up" in k) == learns


def test_regions_need_exemplars_and_exclude_output_preservation(world, tmp_path, capsys):
    assert main(_argv(world, tmp_path / "a", "sd", "--max_steps", "1", "--regions", "ignore")) == 2
    assert "lists no exemplars" in capsys.readouterr().err
    argv = _argv(world, tmp_path / "b", "sd", "--max_steps", "1", "--output_preservation", "scrub")
    argv[argv.index("--preset") + 1] = "world-panda"
    assert main(argv) == 2
    assert "both change the loss" in capsys.readouterr().err and not (tmp_path / "b" / "lora.safetensors").exists()
