"""diffusers: subspace from a pipeline (SD and SDXL), prompt encoding, and LoRA files in both layouts that
diffusers' own ``load_lora_weights`` reads back exactly, with diffusers' metadata kept and ours added."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from concept_exclusion import ConceptSubspace
from concept_exclusion.concept.embeddings import TextEncoders
from concept_exclusion.errors import ConceptExclusionError, TargetError
from concept_exclusion.metadata import PREFIX
from concept_exclusion.safeio import read_header, read_safetensors, write_safetensors
from helpers import make_preset
from helpers.models import attention_lora_exclusion, build_pipeline, load_pipeline

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {"sd": build_pipeline(root, "sd"), "sdxl": build_pipeline(root, "sdxl")}


def test_subspace_from_pipeline_equals_core_construction(pipelines, tmp_path):
    from concept_exclusion.integrations.diffusers import subspace_from_pipeline

    preset = make_preset()
    sd = load_pipeline(pipelines["sd"])
    sub = subspace_from_pipeline(preset, sd)
    assert sub.sha256 == ConceptSubspace.from_text_encoder(preset, sd.tokenizer, sd.text_encoder).sha256
    assert set(sub.bases) == {"context"} and sub.dim() == 32
    path = tmp_path / "p.toml"
    path.write_text(preset.toml_text)
    assert subspace_from_pipeline(str(path), sd).sha256 == sub.sha256  # a preset file path works too
    assert subspace_from_pipeline(preset, sd, clip_skip=2).sha256 != sub.sha256

    xl = load_pipeline(pipelines["sdxl"])
    sub_xl = subspace_from_pipeline(preset, xl)
    core = ConceptSubspace.from_text_encoders(preset, [xl.tokenizer, xl.tokenizer_2],
                                              [xl.text_encoder, xl.text_encoder_2])
    assert sub_xl.sha256 == core.sha256
    assert set(sub_xl.bases) == {"context", "pooled"} and sub_xl.dim() == 64 and sub_xl.dim("pooled") == 32


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_encode_prompts_is_what_the_subspace_reads(pipelines, kind):
    from concept_exclusion.integrations.diffusers import encode_prompts

    pipe = load_pipeline(pipelines[kind])
    texts = ["a photo of the zorblax logo", "a cat"]
    encs = [pipe.text_encoder] + ([pipe.text_encoder_2] if kind == "sdxl" else [])
    toks = [pipe.tokenizer] + ([pipe.tokenizer_2] if kind == "sdxl" else [])
    for skip in (None, 2):
        core = TextEncoders(toks, encs, skip).encode(texts)
        with torch.no_grad():
            embeds, pooled = encode_prompts(pipe, texts, skip)
        torch.testing.assert_close(embeds.double(), core.hidden, rtol=0, atol=1e-6)
        if kind == "sdxl":
            torch.testing.assert_close(pooled.double(), core.pooled, rtol=0, atol=1e-6)
        else:
            assert pooled is None


def _trained_lora(pipe, targets: str = '["attention"]'):
    """A PEFT LoRA (alpha != rank) with random factors, then put on the exclusion's constraint."""
    from peft import LoraConfig

    from concept_exclusion.integrations.diffusers import CROSS_ATTENTION_LORA_TARGETS, attach_to_pipeline

    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=6, init_lora_weights="gaussian",
                                     target_modules=CROSS_ATTENTION_LORA_TARGETS))
    exclusion = attach_to_pipeline(pipe, make_preset(targets=targets))
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_()
    exclusion.after_optimizer_step()
    return exclusion


def _unet_out(pipe, kind):
    torch.manual_seed(1)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([10])
    ctx = torch.randn(1, 77, 32 if kind == "sd" else 64)
    kwargs = {} if kind == "sd" else {"added_cond_kwargs": {"text_embeds": torch.randn(1, 32),
                                                            "time_ids": torch.zeros(1, 6)}}
    with torch.no_grad():
        return pipe.unet(x, t, ctx, **kwargs).sample


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_save_lora_layouts_keep_diffusers_metadata_add_ours_and_load(pipelines, tmp_path, kind):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from concept_exclusion.integrations.diffusers import save_lora

    pipe = load_pipeline(pipelines[kind])
    exclusion = _trained_lora(pipe)
    assert exclusion.max_leakage() < 1e-5
    expected = _unet_out(pipe, kind)
    # what diffusers itself writes, for comparison
    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    cls.save_lora_weights(tmp_path / "plain", convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
                          unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict())
    plain_tensors, plain_meta = read_safetensors(tmp_path / "plain" / "pytorch_lora_weights.safetensors")
    assert set(plain_meta) == {"format", "lora_adapter_metadata"}

    for layout in ("diffusers", "kohya"):
        path = save_lora(pipe, tmp_path / f"{layout}.safetensors", exclusion, format=layout)
        tensors, meta = read_safetensors(path)
        assert meta["format"] == plain_meta["format"] == "pt"
        assert meta["concept_exclusion.preset_name"] == "test-logo"
        assert meta["concept_exclusion.mode"] == "exact"
        assert float(meta["concept_exclusion.leakage_max"]) < 1e-5
        assert {k: v for k, v in meta.items() if k.startswith("concept_exclusion.")} == \
            {k: v for k, v in exclusion.metadata().items()}
        if layout == "diffusers":
            assert meta["lora_adapter_metadata"] == plain_meta["lora_adapter_metadata"]
            assert json.loads(meta["lora_adapter_metadata"])["unet.lora_alpha"] == 6
            assert set(tensors) == set(plain_tensors)
            assert all(torch.equal(tensors[k], plain_tensors[k]) for k in tensors)
        else:
            assert "lora_adapter_metadata" not in meta  # diffusers refuses kohya alphas together with it
            assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "6"
            assert all(k.startswith("lora_unet_") for k in tensors)
            assert {k.rsplit(".", 2 if k.endswith("weight") else 1)[1] for k in tensors} == \
                {"lora_down", "lora_up", "alpha"}
            alphas = [float(v) for k, v in tensors.items() if k.endswith(".alpha")]
            assert alphas and all(a == pytest.approx(6.0) for a in alphas)
            if kind == "sdxl":
                assert any("_input_blocks_" in k for k in tensors) and any("_output_blocks_" in k for k in tensors)
                assert not any("_down_blocks_" in k or "_up_blocks_" in k for k in tensors)
            else:
                assert any("_down_blocks_" in k for k in tensors)
        fresh = load_pipeline(pipelines[kind])
        baseline = _unet_out(fresh, kind)
        fresh.load_lora_weights(str(path))
        torch.testing.assert_close(_unet_out(fresh, kind), expected, rtol=0, atol=1e-5)
        assert (baseline - expected).abs().max() > 1e-2  # the LoRA does something


def test_save_lora_refuses_bad_input_and_writes_nothing(pipelines, tmp_path):
    from concept_exclusion.integrations.diffusers import save_lora

    pipe = load_pipeline(pipelines["sd"])
    with pytest.raises(TargetError, match="no PEFT LoRA adapter"):
        save_lora(pipe, tmp_path / "none.safetensors", None)
    exclusion = _trained_lora(pipe, targets='["kv"]')
    with pytest.raises(ConceptExclusionError, match="format"):
        save_lora(pipe, tmp_path / "bad.safetensors", exclusion, format="ckpt")
    assert list(tmp_path.iterdir()) == []
    path = save_lora(pipe.unet, tmp_path / "half.safetensors", exclusion, format="diffusers", dtype=torch.float16)
    header, meta = read_header(path)
    assert {e["dtype"] for e in header.values()} == {"F16"} and meta["format"] == "pt"


def test_stock_example_loop_with_three_added_lines(pipelines, tmp_path):
    """train_text_to_image_lora.py's loop, shortened, exhausted `filter` included; the lines marked +/~ are ours."""
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    from concept_exclusion.integrations.diffusers import attach_exclusion, save_lora  # + line 1

    folder = pipelines["sd"]
    preset_path = tmp_path / "logo.toml"
    preset_path.write_text(make_preset().toml_text)
    accelerator = Accelerator(gradient_accumulation_steps=2)
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    cast_training_params(unet, dtype=torch.float32)
    lora_layers = filter(lambda p: p.requires_grad, unet.parameters())
    optimizer = torch.optim.AdamW(lora_layers, lr=1e-2)
    exclusion = attach_exclusion(unet, preset_path, tokenizer, text_encoder, optimizer=optimizer)  # + line 2
    unet, optimizer = accelerator.prepare(unet, optimizer)
    ids = tokenizer(["a photo of the zorblax logo", "zorblax sign"], padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    torch.manual_seed(0)
    for _ in range(8):
        with accelerator.accumulate(unet):
            latents = vae.encode(torch.rand(2, 3, 32, 32) * 2 - 1).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (2,))
            pred = unet(noise_scheduler.add_noise(latents, noise, t), t, text_encoder(ids)[0]).sample
            accelerator.backward(F.mse_loss(pred, noise))
            if accelerator.sync_gradients:
                params_to_clip = lora_layers  # an exhausted filter: this clips nothing
                accelerator.clip_grad_norm_(params_to_clip, 1.0)
            optimizer.step()
            optimizer.zero_grad()
    assert exclusion.steps == 4 and exclusion.max_leakage() < 1e-5
    moved = [t for t in exclusion.targets if t.kind == "lora" and float(t.other.detach().abs().max()) > 0]
    assert moved  # the LoRA trained
    # ~ line 3, instead of StableDiffusionPipeline.save_lora_weights(save_directory=..., unet_lora_layers=...):
    save_lora(accelerator.unwrap_model(unet), tmp_path / "out" / "pytorch_lora_weights.safetensors", exclusion)
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.load_lora_weights(str(tmp_path / "out"))
    _, meta = read_header(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert meta["concept_exclusion.preset_name"] == "test-logo" and "lora_adapter_metadata" in meta


def test_diffusers_checkpoints_carry_metadata_and_resume_the_step_count(sd, tmp_path):
    from accelerate import Accelerator

    from concept_exclusion.integrations.diffusers import checkpoint_hooks

    unet, exclusion = attention_lora_exclusion(sd)
    accelerator = Accelerator(cpu=True)

    def script_hook(models, weights, output_dir):  # what train_text_to_image_lora.py's save_model_hook does
        write_safetensors(Path(output_dir) / "pytorch_lora_weights.safetensors", {"w": torch.zeros(1)},
                          {"format": "pt"})

    accelerator.register_save_state_pre_hook(script_hook)
    checkpoint_hooks(accelerator, exclusion)
    exclusion.steps = 12
    accelerator.save_state(str(tmp_path / "checkpoint-12"))
    meta = read_header(tmp_path / "checkpoint-12" / "pytorch_lora_weights.safetensors")[1]
    assert meta["format"] == "pt" and meta[PREFIX + "steps"] == "12" and PREFIX + "basis.context" in meta
    exclusion.steps = 0
    accelerator.load_state(str(tmp_path / "checkpoint-12"))
    assert exclusion.steps == 12


def test_files_record_the_layer_the_concept_was_read_at(sd):
    """SD1/2 with clip_skip left unset reads the last CLIP layer: the provenance says 1 (inspect shows it), so an
    audit can be run at the clip_skip the file was trained with."""
    from peft import LoraConfig

    from concept_exclusion.integrations.diffusers import attach_exclusion

    for clip_skip, recorded in ((None, "1"), (2, "2")):
        unet = sd.unet().requires_grad_(False)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_v"]))
        exclusion = attach_exclusion(unet, make_preset(), sd.tokenizer, sd.text_encoder, clip_skip=clip_skip)
        assert exclusion.metadata()[PREFIX + "clip_skip"] == recorded
