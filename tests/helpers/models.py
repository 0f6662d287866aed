"""Tiny models and training steps that tests in several folders build the same way."""

from __future__ import annotations

from pathlib import Path

import diffusers
import torch

from helpers import WORDS


def context_states(sd, n=2):
    """The SD fixture's text encoder states of a concept prompt and a neutral one (``n`` rows)."""
    ids = sd.tokenizer(["a photo of zorblax logo", "a red circle"] * (n // 2), padding="max_length",
                       return_tensors="pt").input_ids
    return sd.text_encoder(ids).last_hidden_state


LYCORIS_PRESET = """
enable_conv = false
unet_target_module = ["Transformer2DModel"]
unet_target_name = []
text_encoder_target_module = ["CLIPAttention"]
text_encoder_target_name = []
"""


def lycoris_network(sd, unet, algo, tmp_path):
    """A real LyCORIS network (kohya network contract) on the UNet's transformer blocks."""
    from lycoris.kohya import create_network

    preset = tmp_path / "lycoris-preset.toml"
    preset.write_text(LYCORIS_PRESET)
    network = create_network(1.0, 4, 8, None, sd.text_encoder, unet, algo=algo, preset=str(preset))
    network.apply_to(sd.text_encoder, unet, apply_text_encoder=False, apply_unet=True)
    return network


def peft_unet(sd, targets=("to_k", "to_v")):
    """The SD fixture's UNet, frozen, with a gaussian-initialised PEFT LoRA on ``targets``."""
    from peft import LoraConfig

    unet = sd.unet()
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=list(targets)))
    return unet


def train_with_text_encoder(sd, unet, te, opt, steps: int) -> None:
    """``steps`` AdamW steps in which the UNet reads the (training) text encoder's states of one prompt."""
    ids = sd.tokenizer(["a photo of zorblax logo"] * 2, padding="max_length", return_tensors="pt").input_ids
    for _ in range(steps):
        x = torch.randn(2, 4, 8, 8)
        unet(x, torch.tensor([10, 10]), encoder_hidden_states=te(ids).last_hidden_state).sample.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def _quiet() -> None:
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def build_pipeline(root: Path, kind: str) -> Path:
    """A tiny SD1-shaped ('sd') or SDXL-shaped ('sdxl') pipeline saved with save_pretrained; returns its folder."""
    from concept_exclusion.testing.tiny import sd_pipeline, sdxl_pipeline

    _quiet()
    root = Path(root)
    pipe = sd_pipeline(WORDS, root) if kind == "sd" else sdxl_pipeline(WORDS, root)
    pipe.save_pretrained(root / kind)
    return root / kind


def load_pipeline(folder: Path):
    """from_pretrained with the text encoders frozen (as every LoRA training script does)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    for enc in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if enc is not None:
            enc.requires_grad_(False)
    return pipe


def ldm_unet_keys(sd, L, n):
    """Test helper: a diffusers UNet2DConditionModel state dict under original LDM names (L layers per block, n blocks)."""
    res = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"), ("out_layers.3", "conv2"),
           ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    prefixes = []
    for i in range(n):
        for j in range(L):
            prefixes.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{i*(L+1)+j+1}.0."))
            prefixes.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{i*(L+1)+j+1}.1."))
        prefixes.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i+1)*(L+1)}.0.op."))
        for j in range(L + 1):
            prefixes.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i*(L+1)+j}.0."))
            prefixes.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i*(L+1)+j}.1."))
    prefixes += [("mid_block.attentions.0.", "middle_block.1."), ("mid_block.resnets.0.", "middle_block.0."),
                 ("mid_block.resnets.1.", "middle_block.2.")]
    has_attn = {i for i in range(n) if any(k.startswith(f"up_blocks.{i}.attentions.") for k in sd)}
    out = {}
    for k, v in sd.items():
        name = k
        for hf, ldm in fixed.items():
            if name.startswith(hf + "."):
                name = ldm + name[len(hf):]
        if name.startswith("up_blocks.") and ".upsamplers.0." in name:
            i = int(name.split(".")[1])
            name = f"output_blocks.{i*(L+1)+L}.{2 if i in has_attn else 1}." + name.split(".upsamplers.0.", 1)[1]
        for hf, ldm in prefixes:
            if name.startswith(hf):
                rest = name[len(hf):]
                if "resnets" in hf:
                    for a, b in res:
                        rest = rest.replace(b, a)
                name = ldm + rest
                break
        out["model.diffusion_model." + name] = v
    return out


def ldm_vae_keys(sd, n, L):
    """Test helper: a diffusers AutoencoderKL state dict under original LDM names (n blocks)."""
    out = {}
    for k, v in sd.items():
        name = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        for i in range(n):
            name = name.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            name = name.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            name = name.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n-1-i}.block.")
            name = name.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n-1-i}.upsample.")
        for j in range(2):
            name = name.replace(f"mid_block.resnets.{j}.", f"mid.block_{j+1}.")
        if "mid_block.attentions.0." in name:
            name = name.replace("mid_block.attentions.0.", "mid.attn_1.")
            for a, b in (("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")):
                name = name.replace(".attn_1." + b, ".attn_1." + a)
            if name.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
                v = v.reshape(*v.shape, 1, 1)
        out["first_stage_model." + name] = v
    return out


def attention_lora_exclusion(sd):
    """(UNet, exclusion): the SD fixture's UNet with a PEFT LoRA on the attention projections, attached with the
    'attention' target set (its to_q/to_out heads are narrower than the basis rank, so they are frozen)."""
    from peft import LoraConfig

    from concept_exclusion import ConceptExclusion, ConceptSubspace
    from helpers import make_preset

    unet = sd.unet().requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    subspace = ConceptSubspace.from_text_encoder(make_preset(targets='["attention"]'), sd.tokenizer, sd.text_encoder)
    return unet, ConceptExclusion.attach(unet, subspace)


def ldm_clip_keys(text_encoder_state: dict) -> dict:
    """A CLIP text encoder's state dict under the SD1 single-file names (``cond_stage_model.transformer.text_model.``),
    whichever transformers named its keys (4.x: ``text_model.*``; 5.x without that prefix)."""
    return {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
            for k, v in text_encoder_state.items()}
