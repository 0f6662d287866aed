"""``audit`` on Flux and SD3 LoRA files: diffusers/PEFT and ai-toolkit (``transformer.<module>.lora_A``), kohya
(``lora_unet_txt_in``, ``lora_unet_vector_in_in_layer``, ``lora_unet_double_blocks_...``) and BFL
(``diffusion_model.txt_in``) spellings. The text readers (context_embedder / txt_in; the pooled text embedder /
vector_in) are judged against the trusted preset re-encoded with the base pipeline's CLIP and T5 encoders;
what the file changes elsewhere is listed. The behavioural check on these bases: tests/audit/test_behaviour_flow.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from concept_exclusion import ConceptSubspace
from concept_exclusion.commands.main import main as cli_main
from concept_exclusion.metadata import subspace_metadata
from concept_exclusion.safeio import read_safetensors, write_safetensors

from helpers import WORDS, make_preset, message_lines  # noqa: E402

# (module in diffusers' names, in kohya's, in BFL's) for Flux's two text readers
FLUX_READERS = {"context": ("context_embedder", "lora_unet_txt_in", "txt_in"),
                "pooled": ("time_text_embed.text_embedder.linear_1", "lora_unet_vector_in_in_layer",
                           "vector_in.in_layer")}


@pytest.fixture(scope="module", params=["flux", "sd3"])
def model(request, tmp_path_factory):
    from diffusers import DiffusionPipeline

    from concept_exclusion.testing.tiny_mmdit import flux_pipeline, sd3_pipeline

    root = tmp_path_factory.mktemp(request.param)
    build = flux_pipeline if request.param == "flux" else sd3_pipeline
    build(WORDS, root / "src").save_pretrained(root / "base")
    pipe = DiffusionPipeline.from_pretrained(root / "base")
    toks = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None), getattr(pipe, "tokenizer_3", None)) if t]
    encs = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None),
                        getattr(pipe, "text_encoder_3", None)) if e]
    subspace = ConceptSubspace.from_encoders(make_preset(max_rank=8), toks, encs)
    (root / "logo.toml").write_text(make_preset(max_rank=8).toml_text)
    return {"name": request.param, "root": root, "pipe": pipe, "subspace": subspace}


def _factors(model, projected: bool, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(down, up) per text reader, rank 4, off the concept subspace when ``projected``."""
    g = torch.Generator().manual_seed(seed)
    t = model["pipe"].transformer
    out = {}
    for space, (name, _, _) in FLUX_READERS.items():
        layer = t.get_submodule(name)
        down = torch.randn(4, layer.in_features, generator=g)
        if projected:
            u = model["subspace"].bases[space].float()
            down = down - (down @ u) @ u.T
        out[space] = (down, torch.randn(layer.out_features, 4, generator=g) * 0.1)
    return out


def _write(model, name: str, factors, layout: str) -> Path:
    tensors = {}
    for space, (down, up) in factors.items():
        diffusers_name, kohya_name, bfl_name = FLUX_READERS[space]
        if layout == "peft":  # diffusers' and ai-toolkit's layout
            tensors[f"transformer.{diffusers_name}.lora_A.weight"] = down
            tensors[f"transformer.{diffusers_name}.lora_B.weight"] = up
        elif layout == "kohya":
            tensors[f"{kohya_name}.lora_down.weight"] = down
            tensors[f"{kohya_name}.lora_up.weight"] = up
            tensors[f"{kohya_name}.alpha"] = torch.tensor(4.0)
        else:
            tensors[f"diffusion_model.{bfl_name}.lora_A.weight"] = down
            tensors[f"diffusion_model.{bfl_name}.lora_B.weight"] = up
    if layout == "kohya":  # a block that does not read the encoders, under its BFL/SAI name
        block = "lora_unet_double_blocks_0_img_attn_qkv" if model["name"] == "flux" else \
            "lora_unet_joint_blocks_0_x_block_attn_qkv"
        tensors[f"{block}.lora_down.weight"] = torch.randn(4, 32)
        tensors[f"{block}.lora_up.weight"] = torch.randn(96, 4)
    else:
        tensors["transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight"] = torch.randn(4, 32)
        tensors["transformer.transformer_blocks.0.attn.add_k_proj.lora_B.weight"] = torch.randn(32, 4)
    path = model["root"] / f"{name}-{layout}.safetensors"
    write_safetensors(path, tensors, {})
    return path


def _audit(capsys, model, path, *extra: str) -> tuple[int, dict]:
    capsys.readouterr()
    rc = cli_main(["audit", str(path), "--preset", str(model["root"] / "logo.toml"), "--base",
                   str(model["root"] / "base"), "--json", *extra])
    return rc, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("layout", ["peft", "kohya", "bfl"])
def test_text_readers_are_judged_against_the_preset(model, capsys, layout):
    rc, report = _audit(capsys, model, _write(model, "leaky", _factors(model, False, 1), layout))
    readers = {r["role"]: r for r in report["layers"] if r["role"].startswith("joint_")}
    assert rc == 1 and set(readers) == {"joint_context", "joint_pooled"}, report
    assert all(r["over"] and r["concept_change"] is not None for r in readers.values())
    assert report["clip_skips"] == ([None] if model["name"] == "flux" else [2])
    rc, report = _audit(capsys, model, _write(model, "clean", _factors(model, True, 2), layout))
    assert rc == 0, (report["blocking"], report["flagged"])
    assert max(r["share"] for r in report["layers"] if r["role"].startswith("joint_")) < 1e-5
    elsewhere = [r["name"] for r in report["layers"] if r["role"] == "elsewhere"]
    assert len(elsewhere) == 1  # listed, not measured: it does not read the encoders' output


def test_the_t5_length_is_the_users_to_state_and_the_files_claim_is_compared(model, capsys):
    """T5 reads the concept differently at another sequence length (its padding positions are rows), so a file kept
    off the concept read at 16 tokens is judged against the base read at 16 tokens when the user says so; audited
    at the tokenizer's length instead, the file's own record of 16 is named in a note."""
    toks = [t for t in (model["pipe"].tokenizer, getattr(model["pipe"], "tokenizer_2", None),
                        getattr(model["pipe"], "tokenizer_3", None)) if t]
    encs = [e for e in (model["pipe"].text_encoder, getattr(model["pipe"], "text_encoder_2", None),
                        getattr(model["pipe"], "text_encoder_3", None)) if e]
    short = ConceptSubspace.from_encoders(make_preset(max_rank=8), toks, encs, max_length=16)
    assert short.sequence_length == 16 and model["subspace"].sequence_length == toks[-1].model_max_length
    factors = _factors({**model, "subspace": short}, True, 4)
    path = _write(model, "short", factors, "peft")
    tensors, _ = read_safetensors(path)
    write_safetensors(path, tensors, subspace_metadata(short))
    rc, report = _audit(capsys, model, path, "--max-sequence-length", "16")
    assert rc == 0 and report["sequence_length"] == 16 and report["claims"]["sequence_length"] == "16"
    assert max(r["share"] for r in report["layers"] if r["checked"]) < 1e-5
    assert not any("T5 length" in n for n in report["notes"])
    rc, report = _audit(capsys, model, path)
    assert report["sequence_length"] == toks[-1].model_max_length != 16
    assert any("read at T5 length 16" in n and "--max-sequence-length 16" in n for n in report["notes"])


def test_the_weight_check_reads_only_the_layers_it_measures(model):
    """The transformer is built from its config without weights; a measured layer's weights are read from the
    folder's safetensors when asked for (FLUX.1-dev's transformer is 24 GB; its text readers are megabytes)."""
    from concept_exclusion.audit.base import load_base

    base = load_base(model["root"] / "base")
    assert all(p.device.type == "meta" for p in base.denoiser.parameters())
    layer = base.module("lora_unet_txt_in" if model["name"] == "flux" else "lora_unet_context_embedder")
    weight = base.load(layer).weight
    assert torch.equal(weight, model["pipe"].transformer.context_embedder.weight)
    read = [n for n, p in base.denoiser.named_parameters() if p.device.type != "meta"]
    assert read == ["context_embedder.weight", "context_embedder.bias"]  # that layer only


def test_a_checkpoint_without_a_measured_layer_is_one_line_and_exit_2(model, capsys, tmp_path):
    import shutil

    from concept_exclusion.safeio import read_safetensors as read

    damaged = tmp_path / "base"
    shutil.copytree(model["root"] / "base", damaged)
    weights = damaged / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors, meta = read(weights)
    del tensors["context_embedder.weight"]
    write_safetensors(weights, tensors, meta)
    capsys.readouterr()
    rc = cli_main(["audit", str(_write(model, "damaged", _factors(model, True, 5), "peft")), "--preset",
                   str(model["root"] / "logo.toml"), "--base", str(damaged), "--no-behaviour"])
    lines = message_lines(capsys.readouterr().err)
    assert rc == 2 and len(lines) == 1 and "context_embedder.weight" in lines[0], lines


def test_without_base_a_flux_file_is_listed_and_unverified(model, capsys):
    path = _write(model, "nobase", _factors(model, True, 3), "kohya")
    capsys.readouterr()
    rc = cli_main(["audit", str(path)])
    out = capsys.readouterr().out
    assert rc == 3 and "joint_context" in out and "joint_pooled" in out and "changes elsewhere" in out


@pytest.mark.parametrize("layout", ["peft", "kohya", "bfl"])
def test_a_file_on_the_joint_blocks_only_is_not_a_pass(model, capsys, layout):
    """The diffusers dreambooth scripts' default layers: no text reader changes, so the weight check measures
    nothing. That is UNVERIFIED (exit 3) and says so, never a PASS with 0 layers checked."""
    rc, report = _audit(capsys, model, _write(model, "blocks-only", {}, layout))
    assert rc == 3 and report["verdict"] == "UNVERIFIED" and not report["blocking"], report
    assert [r["role"] for r in report["layers"]] == ["elsewhere"] and not any(r["checked"] for r in report["layers"])
    capsys.readouterr()
    rc = cli_main(["audit", str(_write(model, "blocks-only", {}, layout)), "--preset",
                   str(model["root"] / "logo.toml"), "--base", str(model["root"] / "base")])
    out = capsys.readouterr().out
    assert rc == 3 and "UNVERIFIED: 0 layers checked" in out and "this is not a pass" in out
    images = model["root"] / "exemplars"
    images.mkdir(exist_ok=True)
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 10, 10)).save(images / "0.png")
    rc = cli_main(["audit", str(_write(model, "blocks-only", {}, layout)), "--preset",
                   str(model["root"] / "logo.toml"), "--base", str(model["root"] / "base"), "--exemplars", str(images),
                   "--controls", str(images), "--resolution", "32", "--max-images", "1", "--inversion-steps", "2",
                   "--json"])
    behaviour = json.loads(capsys.readouterr().out)["behaviour"]
    # the behavioural check runs on Flux and SD3 too, with the file's block layers applied (BFL/SAI names split)
    assert rc == (6 if behaviour["verdict"] == "LEARNED" else 3)
    assert behaviour["applied_layers"] == 1 and not behaviour["skipped_layers"]
