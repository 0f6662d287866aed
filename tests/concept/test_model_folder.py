"""Reading the text side of a diffusers model folder: SD (one encoder), SDXL (two), and one-line refusals."""

from __future__ import annotations

import pytest

from concept_exclusion.concept.model_folder import load_text_encoders
from concept_exclusion.errors import ModelFolderError
from concept_exclusion.testing.tiny import sd_pipeline, sdxl_pipeline

from helpers import WORDS


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    sd_pipeline(WORDS, root).save_pretrained(root / "sd")
    sdxl_pipeline(WORDS, root).save_pretrained(root / "sdxl")
    return root


def test_one_or_two_frozen_encoders(folders):
    toks, encs = load_text_encoders(folders / "sd")
    assert len(toks) == len(encs) == 1 and not any(p.requires_grad for p in encs[0].parameters())
    toks, encs = load_text_encoders(folders / "sdxl")
    assert len(toks) == len(encs) == 2 and not encs[1].training
    assert type(encs[1]).__name__ == "CLIPTextModelWithProjection"


def test_refusals_name_the_source_in_one_line(folders, tmp_path):
    with pytest.raises(ModelFolderError, match=r"^some-org/some-model: not a diffusers model folder$"):
        load_text_encoders("some-org/some-model", local_files_only=True)
    broken = tmp_path / "broken"
    (broken / "tokenizer").mkdir(parents=True)
    with pytest.raises(ModelFolderError) as info:
        load_text_encoders(broken)
    assert str(info.value).startswith(f"{broken}: cannot load tokenizer/text_encoder (") and "\n" not in str(info.value)


def test_pickled_weights_are_never_loaded(folders, tmp_path):
    """A text encoder stored only as pytorch_model.bin (a pickle) is refused, not unpickled."""
    import shutil

    import torch

    from concept_exclusion.audit.base import load_base
    from concept_exclusion.errors import AuditError

    pickled = tmp_path / "pickled"
    shutil.copytree(folders / "sd", pickled)
    weights = next((pickled / "text_encoder").glob("*.safetensors"))
    from safetensors.torch import load_file

    torch.save(load_file(weights), pickled / "text_encoder" / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelFolderError) as info:
        load_text_encoders(pickled)
    assert "\n" not in str(info.value)
    with pytest.raises(AuditError, match=r"^--base .*cannot load tokenizer/text_encoder"):
        load_base(pickled)


def test_audit_base_accepts_a_single_file_checkpoint(folders, tmp_path):
    """A kohya/A1111-style single .safetensors checkpoint, offline with --base-config; a .ckpt is refused."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from concept_exclusion.audit.base import load_base
    from concept_exclusion.errors import AuditError
    from helpers.models import ldm_clip_keys, ldm_unet_keys, ldm_vae_keys

    pipe = StableDiffusionPipeline.from_pretrained(folders / "sd")
    checkpoint = {**ldm_unet_keys(pipe.unet.state_dict(), 1, 2), **ldm_vae_keys(pipe.vae.state_dict(), 3, 1),
                  **ldm_clip_keys(pipe.text_encoder.state_dict())}
    single = tmp_path / "tiny-sd.safetensors"
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, single)
    base = load_base(single, folders / "sd")
    assert base.kind == "single file" and base.family == "single" and base.layers_per_block == 1
    key = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    assert torch_equal(base.module(key).weight, pipe.unet.get_submodule(
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k").weight)
    with pytest.raises(AuditError, match="--base-config"):
        load_base(single)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not read")
    with pytest.raises(AuditError, match="must be .safetensors"):
        load_base(ckpt, folders / "sd")


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a.detach(), b.detach()))
