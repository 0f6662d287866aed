"""Flux and SD3 layers under the names sd-scripts, BFL and SAI give them, as diffusers module paths.

kohya's ``networks.lora_flux`` / ``lora_sd3`` (and BFL/ComfyUI files) name the original models' layers; diffusers
splits some of them: a fused ``qkv`` is ``to_q``, ``to_k``, ``to_v`` (the text stream's ``add_*_proj``), Flux's
single-block ``linear1`` is ``to_q``, ``to_k``, ``to_v`` and ``proj_mlp``. ``diffusers_paths`` gives, for a
kohya-spelled name, the diffusers paths whose weights stack (rows, in this order) into the named layer's weight.

Invariant: the rows of a named layer are its diffusers layers' rows stacked in the order given, except in a layer of
an ``AdaLayerNormContinuous`` (Flux's final norm, SD3's last context-block norm), which reads ``(scale, shift)``
where BFL/SAI write ``(shift, scale)``: ``SWAPPED_HALVES`` (diffusers' own converters swap them too).
"""

from __future__ import annotations

import re

SWAPPED_HALVES = ("AdaLayerNormContinuous",)  # diffusers classes whose linear's two halves BFL/SAI write swapped
_QKV = ("to_q", "to_k", "to_v")
_ADD_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")

# single layers (kohya spelling without ``lora_unet_``) -> diffusers path
_SINGLE = {"txt_in": "context_embedder", "img_in": "x_embedder", "final_layer_linear": "proj_out",
           "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
           "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
           "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
           "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
           "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
           "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
           "final_layer_adaLN_modulation_1": "norm_out.linear",
           # SD3 (SAI)
           "x_embedder_proj": "pos_embed.proj", "y_embedder_mlp_0": "time_text_embed.text_embedder.linear_1",
           "y_embedder_mlp_2": "time_text_embed.text_embedder.linear_2",
           "t_embedder_mlp_0": "time_text_embed.timestep_embedder.linear_1",
           "t_embedder_mlp_2": "time_text_embed.timestep_embedder.linear_2"}

# block layers: (pattern over the kohya name, diffusers block, {layer: diffusers paths inside the block})
_BLOCKS = (
    (re.compile(r"^double_blocks_(\d+)_(.+)$"), "transformer_blocks", {
        "img_attn_qkv": tuple(f"attn.{p}" for p in _QKV), "txt_attn_qkv": tuple(f"attn.{p}" for p in _ADD_QKV),
        "img_attn_proj": ("attn.to_out.0",), "txt_attn_proj": ("attn.to_add_out",),
        "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",),
        "txt_mlp_0": ("ff_context.net.0.proj",), "txt_mlp_2": ("ff_context.net.2",),
        "img_mod_lin": ("norm1.linear",), "txt_mod_lin": ("norm1_context.linear",)}),
    (re.compile(r"^single_blocks_(\d+)_(.+)$"), "single_transformer_blocks", {
        "linear1": (*(f"attn.{p}" for p in _QKV), "proj_mlp"), "linear2": ("proj_out",),
        "modulation_lin": ("norm.linear",)}),
    (re.compile(r"^joint_blocks_(\d+)_(.+)$"), "transformer_blocks", {
        "x_block_attn_qkv": tuple(f"attn.{p}" for p in _QKV), "x_block_attn_proj": ("attn.to_out.0",),
        "x_block_attn2_qkv": tuple(f"attn2.{p}" for p in _QKV), "x_block_attn2_proj": ("attn2.to_out.0",),
        "x_block_mlp_fc1": ("ff.net.0.proj",), "x_block_mlp_fc2": ("ff.net.2",),
        "x_block_adaLN_modulation_1": ("norm1.linear",),
        "context_block_attn_qkv": tuple(f"attn.{p}" for p in _ADD_QKV),
        "context_block_attn_proj": ("attn.to_add_out",),
        "context_block_mlp_fc1": ("ff_context.net.0.proj",), "context_block_mlp_fc2": ("ff_context.net.2",),
        "context_block_adaLN_modulation_1": ("norm1_context.linear",)}),
)


def diffusers_paths(module: str) -> tuple[str, ...] | None:
    """The diffusers paths of a kohya-spelled BFL/SAI layer (``lora_unet_double_blocks_0_img_attn_qkv`` ->
    ``transformer_blocks.0.attn.to_q``, ``.to_k``, ``.to_v``), or None for any other name."""
    if not module.startswith("lora_unet_"):
        return None
    name = module[len("lora_unet_"):]
    if name in _SINGLE:
        return (_SINGLE[name],)
    for pattern, block, layers in _BLOCKS:
        found = pattern.match(name)
        if found and found.group(2) in layers:
            return tuple(f"{block}.{found.group(1)}.{p}" for p in layers[found.group(2)])
    return None
