"""diffusers pipelines: build the concept subspace from a pipeline's own text encoders, and save a
PEFT LoRA with our provenance added to what diffusers itself writes.

Invariants: ``save_lora`` keeps every metadata key diffusers' ``save_lora_weights`` writes
(``format``, ``lora_adapter_metadata``) unchanged and only adds ``concept_exclusion.*`` keys; the
file appears complete under its final name or not at all (plugin/safeio); the kohya layout holds
the same effective weight delta as the PEFT adapter (``alpha / rank == lora_alpha / r``, rsLoRA
included).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from concept_exclusion.concept.encoders import TextEncoders
from concept_exclusion.concept.preset import Preset, Projection, load_preset
from concept_exclusion.concept.subspace import ConceptSubspace
from concept_exclusion.errors import ConceptExclusionError, SubspaceError, TargetError
from concept_exclusion.exclusion import ConceptExclusion
from concept_exclusion.lora.sdxl_names import diffusers_to_sai
from concept_exclusion.model.roles import canonical_name
from concept_exclusion.model.scan import scan
from concept_exclusion.options import AttachOptions
from concept_exclusion.loss_changes import REGIONS_REMEDY, warn_unapplied
from concept_exclusion.safeio import read_safetensors, write_safetensors

log = logging.getLogger(__name__)

FORMATS = ("diffusers", "kohya")
# PEFT target regex for the cross-attention projections (attn1 is self-attention and reads no text).
CROSS_ATTENTION_LORA_TARGETS = r".*attn2\.(to_k|to_v|to_q|to_out\.0)$"


def is_sdxl(pipe_or_unet) -> bool:
    """True for SDXL-shaped pipelines/UNets (a second text encoder, or the text_time added embedding)."""
    if getattr(pipe_or_unet, "text_encoder_2", None) is not None:
        return True
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"


def _preset(preset: Preset | str | Path) -> Preset:
    return preset if isinstance(preset, Preset) else load_preset(preset)


def pipeline_encoders(pipe) -> tuple[list, list]:
    """(tokenizers, text encoders) of ``pipe`` in order (``text_encoder``, ``_2``, ``_3``, those present); a
    missing ``tokenizer_N`` falls back to the first tokenizer."""
    toks, encs = [], []
    for suffix in ("", "_2", "_3"):
        enc = getattr(pipe, "text_encoder" + suffix, None)
        if enc is None:
            continue
        tok = getattr(pipe, "tokenizer" + suffix, None) or (toks[0] if toks else None)
        if tok is None:
            break
        toks.append(tok)
        encs.append(enc)
    if not encs or len(toks) != len(encs):
        raise SubspaceError(f"{type(pipe).__name__} has no tokenizer/text_encoder to encode the concept with")
    return toks, encs


def subspace_from_pipeline(preset: Preset | str | Path, pipe, clip_skip: int | None = None,
                           max_sequence_length: int | None = None) -> ConceptSubspace:
    """The concept subspace read by ``pipe``'s denoiser, from the pipeline's own tokenizer(s) and text encoder(s).

    SD1.x/2.x: one encoder; SDXL: both, concatenated penultimate states plus a pooled basis; Flux: T5
    states plus CLIP's pooled basis; SD3: CLIP-L ++ CLIP-G zero-padded to T5's width, then T5, plus the
    pooled CLIP-L ++ CLIP-G basis (``ConceptSubspace.from_encoders``). ``clip_skip`` is kohya's
    (2 = penultimate); diffusers' pipeline argument ``clip_skip=n`` is ours ``n + 1``.
    ``max_sequence_length``: T5's length, as given to the pipeline (default: its tokenizer's).
    """
    toks, encs = pipeline_encoders(pipe)
    return ConceptSubspace.from_encoders(_preset(preset), toks, encs, clip_skip, max_length=max_sequence_length)


def unwrap(module: nn.Module) -> nn.Module:
    """The model under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    for _ in range(8):
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        module = inner
    return module


def lora_pipeline_class(denoiser: nn.Module):
    """The diffusers pipeline whose ``save_lora_weights``/``load_lora_weights`` take this MMDiT's transformer LoRA
    (``transformer.*`` keys), or None for a UNet."""
    name = type(denoiser).__name__
    if name.startswith("FluxTransformer2DModel"):
        from diffusers import FluxPipeline

        return FluxPipeline
    if name.startswith("SD3Transformer2DModel"):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline
    if scan(denoiser).is_mmdit:
        raise TargetError(f"{name}: an MMDiT without a known diffusers pipeline; save its LoRA with that "
                          f"pipeline's save_lora_weights and add exclusion.metadata() yourself")
    return None


def _unet_of(pipe_or_unet) -> nn.Module:
    """The denoiser: ``pipe.unet``, ``pipe.transformer`` (SD3/Flux), or the module given."""
    for attr in ("unet", "transformer"):
        inner = getattr(pipe_or_unet, attr, None)
        if isinstance(inner, nn.Module):
            return unwrap(inner)
    return unwrap(pipe_or_unet)


def attach_to_pipeline(pipe, preset: Preset | str | Path, projection: Projection | None = None, *, optimizer=None,
                       clip_skip: int | None = None, options: AttachOptions | None = None) -> ConceptExclusion:
    """Build the subspace from ``pipe`` and attach the exclusion to ``pipe.unet`` (text encoders passed for the check).

    ``projection``: the preset's ``[projection]`` when None (``Projection.overridden`` changes a few settings)."""
    subspace = subspace_from_pipeline(preset, pipe, clip_skip)
    _, encoders = pipeline_encoders(pipe)
    return ConceptExclusion.attach(_unet_of(pipe), subspace, projection, optimizer=optimizer, text_encoder=encoders,
                                   options=options)


def attach_exclusion(unet: nn.Module, preset: Preset | str | Path, tokenizer, text_encoder, *, optimizer=None,
                     clip_skip: int | None = None, max_sequence_length: int | None = None, accelerator=None,
                     projection: Projection | None = None, options: AttachOptions | None = None) -> ConceptExclusion:
    """One line for a stock diffusers loop: subspace from the script's own tokenizer(s)/text encoder(s), attached.

    SDXL scripts pass both as lists (``[tokenizer_one, tokenizer_two]``, ``[text_encoder_one, text_encoder_two]``).
    Call it after the optimizer exists (exact mode's post-step work is registered on it); with ``accelerator``
    (``--checkpointing_steps`` checkpoints get our metadata, ``checkpoint_hooks``), also after the script
    registers its own save hook, which train_text_to_image_lora.py does after ``accelerator.prepare``.
    ``max_sequence_length``: T5's length as the script reads the captions (Flux/SD3 scripts'
    ``args.max_sequence_length``; default: the tokenizer's); the file records it for the audit.
    ``projection``/``options`` go to ``ConceptExclusion.attach``.
    """
    preset = _preset(preset)
    warn_unapplied(preset, "attach_exclusion", {
        "output_preservation": "replace your loss line with OutputPreservation.for_preset(preset).loss(...) "
                               "(docs/how-it-works.md)",
        "regions": REGIONS_REMEDY["loop"]})
    subspace = ConceptSubspace.from_encoders(preset, tokenizer, text_encoder, clip_skip, max_length=max_sequence_length)
    encoders = list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]
    exclusion = ConceptExclusion.attach(unwrap(unet), subspace, projection, optimizer=optimizer, text_encoder=encoders,
                                        options=options)
    if accelerator is not None:
        checkpoint_hooks(accelerator, exclusion)
    return exclusion


def checkpoint_hooks(accelerator, exclusion: ConceptExclusion,
                     filename: str = "pytorch_lora_weights.safetensors") -> None:
    """``accelerator.save_state`` checkpoints carry our metadata, and ``load_state`` restores the step count.

    Registered after the script's own save hook (which writes ``filename`` into the checkpoint folder), ours
    adds ``exclusion.metadata()`` to that file atomically; on load it reads ``concept_exclusion.steps`` back.
    """
    from concept_exclusion.metadata import PREFIX
    from concept_exclusion.safeio import read_header

    def save(models, weights, output_dir) -> None:
        path = Path(output_dir) / filename
        if not accelerator.is_main_process:
            return
        if not path.is_file():
            log.warning("%s was not written before our checkpoint hook ran: call attach_exclusion(accelerator=...) "
                        "after the script registers its save hook", path)
            return
        tensors, metadata = read_safetensors(path)
        write_safetensors(path, tensors, {**metadata, **exclusion.metadata()})

    def load(models, input_dir) -> None:
        path = Path(input_dir) / filename
        steps = read_header(path)[1].get(PREFIX + "steps", "") if path.is_file() else ""
        if steps.isascii() and steps.isdigit():
            exclusion.steps = int(steps)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


# text conditioning -------------------------------------------------------------------------------
def encode_prompts(pipe, texts: Sequence[str], clip_skip: int | None = None, device=None, dtype=None,
                   max_sequence_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt embeddings [n, L, d], pooled [n, p] or None): the conditioning the denoiser is trained on.

    It is the subspace's own encoding path (``concept_exclusion.concept.encoders.TextEncoders.conditioning``), so
    the two read the same layers: SD1.x/2.x the last layer, or layer ``-clip_skip`` through the final layer
    norm; SDXL layer ``-clip_skip`` (default 2) of both encoders, concatenated, and the second's pooled
    projection; Flux and SD3 as in ``subspace_from_pipeline``.
    """
    toks, encs = pipeline_encoders(pipe)
    embeds, pooled = TextEncoders(toks, encs, clip_skip, max_length=max_sequence_length).conditioning(texts, device)
    if dtype is not None:
        embeds = embeds.to(dtype)
        pooled = pooled.to(dtype) if pooled is not None else None
    return embeds, pooled


# LoRA files ---------------------------------------------------------------------------------------
def _lora_layers(unet: nn.Module, adapter: str) -> list[tuple[str, nn.Module]]:
    """(canonical module path, PEFT LoRA layer) for every layer carrying ``adapter``."""
    out = []
    for name, m in unet.named_modules():
        if hasattr(m, "lora_A") and isinstance(m.lora_A, nn.ModuleDict) and adapter in m.lora_A:
            out.append((canonical_name(name), m))
    if not out:
        raise TargetError(f"{type(unet).__name__} carries no PEFT LoRA adapter {adapter!r} "
                          f"(add one with unet.add_adapter(LoraConfig(...)))")
    return out


def kohya_state_dict(unet: nn.Module, adapter: str = "default", sdxl_names: bool | None = None,
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The adapter as kohya LoRA tensors: ``lora_unet_<path>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.

    SD1.x/2.x keep diffusers' module paths; SDXL uses the Stability paths (``sdxl_names``, default: detected).
    ``alpha`` is ``scaling * rank`` so that kohya's ``alpha / rank`` equals PEFT's scaling exactly.
    """
    unet = unwrap(unet)
    sdxl_names = is_sdxl(unet) if sdxl_names is None else sdxl_names
    layers_per_block = getattr(getattr(unet, "config", None), "layers_per_block", 2)
    if isinstance(layers_per_block, (list, tuple)):
        raise TargetError("kohya SDXL names need one layers_per_block for every block")
    out: dict[str, torch.Tensor] = {}
    for path, m in _lora_layers(unet, adapter):
        if path.startswith("text_"):
            continue
        down, up = m.lora_A[adapter].weight.detach(), m.lora_B[adapter].weight.detach()
        if down.ndim != 2:
            raise TargetError(f"{path}: only Linear LoRA layers are written in kohya layout, got {down.ndim}-d")
        rank = down.shape[0]
        scaling = float(m.scaling[adapter])
        kohya_path = diffusers_to_sai(path, layers_per_block) if sdxl_names else path
        name = "lora_unet_" + kohya_path.replace(".", "_")
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        out[f"{name}.lora_down.weight"] = cast(down).contiguous().cpu()
        out[f"{name}.lora_up.weight"] = cast(up).contiguous().cpu()
        out[f"{name}.alpha"] = torch.tensor(scaling * rank, dtype=dtype or torch.float32)
    return out


def _diffusers_file(unet: nn.Module, adapter: str, sdxl: bool, dtype: torch.dtype | None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata exactly as diffusers' own ``save_lora_weights`` writes them (train_text_to_image_lora)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=adapter))
    if dtype is not None:
        layers = {k: v.to(dtype) for k, v in layers.items()}
    config = unet.peft_config[adapter].to_dict()
    pipeline_cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    mmdit_cls = lora_pipeline_class(unet)  # Flux / SD3: transformer.* keys
    with tempfile.TemporaryDirectory(prefix="concept-exclusion-lora-") as tmp:
        if mmdit_cls is not None:  # the Flux/SD3 dreambooth scripts save PEFT keys as they are (no conversion)
            layers = get_peft_model_state_dict(unet, adapter_name=adapter)
            if dtype is not None:
                layers = {k: v.to(dtype) for k, v in layers.items()}
            mmdit_cls.save_lora_weights(tmp, transformer_lora_layers=layers, weight_name="lora.safetensors",
                                        safe_serialization=True, transformer_lora_adapter_metadata=config)
            return read_safetensors(Path(tmp) / "lora.safetensors")
        pipeline_cls.save_lora_weights(tmp, unet_lora_layers=layers, weight_name="lora.safetensors",
                                       safe_serialization=True, unet_lora_adapter_metadata=config)
        return read_safetensors(Path(tmp) / "lora.safetensors")


def save_lora(pipe_or_unet, path: str | Path, exclusion: ConceptExclusion | None, format: str = "diffusers",
              adapter: str = "default", dtype: torch.dtype | None = None,
              extra_metadata: dict[str, str] | None = None) -> Path:
    """Write the UNet's PEFT LoRA ``adapter`` to ``path`` (atomically) with ``exclusion.metadata()`` added.

    format 'diffusers': diffusers' own file (keys ``unet.*.lora_A/B``, metadata ``format`` and
    ``lora_adapter_metadata``); 'kohya': ``lora_unet_*.lora_down/lora_up/alpha`` with diffusers' ``format`` key
    and kohya's ``ss_network_*`` keys. ``lora_adapter_metadata`` is left out of the kohya layout on purpose:
    with it, diffusers' loader refuses the file ("Both `network_alphas` and `metadata` cannot be specified"),
    and the alpha tensors already carry the scaling. Both load with ``pipe.load_lora_weights``.
    """
    if format not in FORMATS:
        raise ConceptExclusionError(f"LoRA format must be one of {', '.join(FORMATS)}, got {format!r}")
    unet = _unet_of(pipe_or_unet)
    _lora_layers(unet, adapter)  # refuses a UNet without the adapter, naming it
    sdxl = is_sdxl(pipe_or_unet)
    tensors, metadata = _diffusers_file(unet, adapter, sdxl, dtype)
    if format == "kohya":
        if lora_pipeline_class(unet) is not None:
            raise ConceptExclusionError(f"{path}: format='kohya' writes UNet LoRAs; save a Flux/SD3 LoRA as "
                                        f"'diffusers'")
        tensors = kohya_state_dict(unet, adapter, sdxl_names=sdxl, dtype=dtype)
        config = unet.peft_config[adapter]
        metadata.pop("lora_adapter_metadata", None)
        metadata.update({
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(config.r),
            "ss_network_alpha": str(config.lora_alpha),
            "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1",
        })
    if exclusion is not None:
        ours = exclusion.metadata()
        clash = sorted(set(ours) & set(metadata))
        if clash:
            raise ConceptExclusionError(f"{path}: our metadata key {clash[0]!r} would overwrite the host's")
        metadata.update(ours)
    if extra_metadata:
        metadata.update({k: v for k, v in extra_metadata.items() if k not in metadata})
    path = Path(path)
    write_safetensors(path, tensors, metadata)
    log.info("saved %s LoRA (%d tensors) to %s", format, len(tensors), path)
    return path

