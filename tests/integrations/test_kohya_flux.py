"""The kohya wrapper on sd-scripts' Flux layout, driven like ``flux_train_network.py`` (a stand-in:
tests/kohya_flux_standin.py): ``--network_module concept_exclusion.integrations.kohya --network_args
base_network=networks.lora_flux ...``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from helpers import PRESET, WORDS
from fakes.kohya_flux_standin import StandInFlux, encode_captions, flux_strategies, run_flux_training
from helpers.mmdit import move_along, relative_changes
from concept_exclusion.errors import TargetError
from concept_exclusion.metadata import PREFIX
from concept_exclusion.testing.tiny import clip_text_encoder, clip_tokenizer
from concept_exclusion.testing.tiny_mmdit import t5_encoder, t5_tokenizer

OURS = "concept_exclusion.integrations.kohya"
STANDIN = "fakes.kohya_flux_standin"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kohya-flux")
    clip_tok, t5_tok = clip_tokenizer(WORDS, folder / "clip"), t5_tokenizer(WORDS, folder / "t5")
    return SimpleNamespace(folder=folder, clip_tok=clip_tok, t5_tok=t5_tok,
                           clip=clip_text_encoder(len(clip_tok), hidden_size=32, seed=1),
                           t5=t5_encoder(len(t5_tok), d_model=48, seed=2))


@pytest.fixture(scope="module")
def preset_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("preset") / "logo.toml"
    path.write_text(PRESET.replace("{tokens}", "all").replace("{targets}", '["kv"]').replace("{mode}", "exact")
                    .replace("{max_rank}", "16"), encoding="utf-8")
    return path


def _run(parts, tmp_path, module: str, args: list[str], **kwargs):
    flux = StandInFlux(context_in_dim=48, vec_in_dim=32)
    with flux_strategies(parts.clip_tok, parts.t5_tok, 16) as tokenize:
        run = run_flux_training(module, flux=flux, clip_l=parts.clip, t5=parts.t5, tokenize=tokenize,
                                out_file=tmp_path / "lora.safetensors", network_args=args, **kwargs)
    return run, flux, tokenize


def _reader_leakage(file, sub) -> dict[str, float]:
    """Share of each text reader's LoRA delta (up @ down) that acts on the concept basis."""
    out = {}
    with safe_open(str(file), "pt") as f:
        for name, space in (("lora_unet_txt_in", "context"), ("lora_unet_vector_in_in_layer", "pooled")):
            delta = (f.get_tensor(f"{name}.lora_up.weight") @ f.get_tensor(f"{name}.lora_down.weight")).double()
            out[name] = float((delta @ sub.basis(space)).norm() / delta.norm())
    return out


def test_reader_loras_stay_off_the_concept_and_file_keeps_host_metadata(parts, preset_file, tmp_path):
    args = [f"concept_preset={preset_file}", f"base_network={STANDIN}", "in_dims=[0,0,4,0,4]"]
    run, _, _ = _run(parts, tmp_path, OURS, args, steps=4)
    ex = run.network.exclusion
    assert {t.name for t in ex.targets} == {"lora_unet_txt_in", "lora_unet_vector_in_in_layer"}
    assert ex.project_context and ex.max_leakage() < 1e-5
    assert max(_reader_leakage(run.file, ex.subspace).values()) < 1e-5
    with safe_open(str(run.file), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "flux1" and meta[PREFIX + "base_network"] == STANDIN
    assert meta[PREFIX + "project_context"] == "true"
    assert run.calls[:4] == ["create_network", "train_t5xxl", "prepare_network", "apply_to"]
    (tmp_path / "plain").mkdir()
    plain, _, _ = _run(parts, tmp_path / "plain", STANDIN, ["in_dims=[0,0,4,0,4]"], steps=4)
    assert min(_reader_leakage(plain.file, ex.subspace).values()) > 1e-2  # without us the readers learn it


def test_default_network_is_protected_by_context_projection_on_the_flux_model(parts, preset_file, tmp_path):
    run, flux, tokenize = _run(parts, tmp_path, OURS, [f"concept_preset={preset_file}", f"base_network={STANDIN}"])
    ex = run.network.exclusion
    assert ex.targets == [] and ex.project_context
    sub = ex.subspace
    states, pooled = encode_captions(tokenize, parts.clip, parts.t5, ["a photo of the zorblax logo"])
    moved = move_along(states, sub.basis("context")), move_along(pooled, sub.basis("pooled"))
    g = torch.Generator().manual_seed(3)
    img, target = torch.randn(1, 16, 16, generator=g), torch.randn(1, 16, 16, generator=g)

    def grads(txt, y):
        run.network.zero_grad(set_to_none=True)
        out = flux(img=img, img_ids=torch.zeros(16, 3), txt=txt, txt_ids=torch.zeros(txt.shape[1], 3), y=y,
                   timesteps=torch.full((1,), 0.5), guidance=torch.full((1,), 3.5))
        (out - target).pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in run.network.named_parameters() if p.grad is not None}

    with_us = relative_changes(grads(states, pooled), grads(*moved))
    assert len(with_us) == len(list(run.network.base_network.parameters()))
    assert max(with_us.values()) < 1e-4
    ex.uninstall()
    assert max(relative_changes(grads(states, pooled), grads(*moved)).values()) > 1e-2


def test_text_encoder_lora_is_refused_in_one_line_naming_the_layer(parts, preset_file, tmp_path):
    with pytest.raises(TargetError, match="lora_te1") as err:
        _run(parts, tmp_path, OURS, [f"concept_preset={preset_file}", f"base_network={STANDIN}"],
             train_text_encoder=True)
    assert "\n" not in str(err.value)


def test_sd3_strategy_order_and_sd_scripts_reader_names():
    from concept_exclusion.integrations.kohya.mmdit import mmdit_strategy
    from concept_exclusion.model.roles import role_of

    sd3 = SimpleNamespace(clip_l="L", clip_g="G", t5xxl="T", t5xxl_max_length=256)
    got = mmdit_strategy(sd3)
    assert got.tokenizers == ["L", "G", "T"] and got.max_length == 256
    assert mmdit_strategy(SimpleNamespace(tokenizer1="L", tokenizer2="G")) is None  # SDXL: not ours to read
    names = {"lora_unet_txt_in": "joint_context", "lora_unet_context_embedder": "joint_context",
             "lora_unet_vector_in_in_layer": "joint_pooled", "lora_unet_y_embedder_mlp_0": "joint_pooled",
             "lora_unet_vector_in_out_layer": None, "lora_unet_y_embedder_mlp_2": None,
             "lora_unet_double_blocks_0_txt_attn_qkv": None, "lora_unet_joint_blocks_0_x_block_attn2_qkv": None}
    assert {n: role_of(n) for n in names} == names
