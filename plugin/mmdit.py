"""MMDiT models (Flux, SD3/3.5): what the exclusion does differently from a UNet.

In an MMDiT only the entrance reads the text encoders (roles ``joint_context``: diffusers
``context_embedder``, sd-scripts Flux ``txt_in``; ``joint_pooled``: ``time_text_embed.text_embedder.linear_1``,
Flux ``vector_in.in_layer``, SD3 ``y_embedder.mlp.0``). Every joint block then mixes text and
image tokens, so no weight constraint inside the blocks means what ``attn2.to_k`` means in a UNet.
Hence, for these models:

- context projection is on unless the caller turns it off explicitly: every training pass reads
  T5/CLIP states and the pooled vector without the concept's component, so no gradient anywhere in
  the transformer depends on it;
- exact mode holds ``(W - W0) U = 0`` on the readers that train (full weights or LoRA); a LoRA that
  does not train them (diffusers' and sd-scripts' defaults) has no weight target, and context
  projection alone carries the guarantee;
- a subspace that lacks the basis a reader needs is refused (one line, the layer named), since that
  reader would pass the concept on unprojected.
"""

from __future__ import annotations

import logging

from torch import nn

from .errors import SubspaceError, TargetError
from .roles import ROLES, canonical_name, role_of
from .subspace import ConceptSubspace
from .targets import Target, find_targets, lora_factors

log = logging.getLogger(__name__)

MMDIT_ROLES = ("joint_context", "joint_pooled")


def mmdit_readers(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(name, role, module) of every MMDiT text reader in ``model`` (kohya LoRA modules by their ``lora_name``)."""
    out = []
    for raw, module in model.named_modules():
        name = canonical_name(str(getattr(module, "lora_name", None) or raw))
        role = role_of(name)
        if role in MMDIT_ROLES:
            out.append((name, role, module))
    return out


def is_mmdit(model: nn.Module | None) -> bool:
    """Whether ``model`` (the transformer that runs the forward pass) has an MMDiT text reader."""
    return model is not None and bool(mmdit_readers(model))


def default_project_context(model: nn.Module, preset_value: bool) -> bool:
    """The preset's choice, or True for an MMDiT (the only way to keep the joint blocks from reading the concept)."""
    if preset_value or not is_mmdit(model):
        return preset_value
    log.info("%s is an MMDiT: context projection is on (pass project_context=False to turn it off)",
             type(model).__name__)
    return True


def check_mmdit_subspace(model: nn.Module, subspace: ConceptSubspace) -> None:
    """Refuse a subspace without the space an MMDiT reader needs (a T5-only basis for Flux's pooled CLIP path)."""
    for name, role, _ in mmdit_readers(model):
        space = ROLES[role].space
        if space not in subspace.bases:
            raise SubspaceError(f"{name} reads the {space} text embedding but the concept subspace has no {space!r} "
                                f"basis; build it from all of the model's text encoders (subspace_from_pipeline)")


def _trains(module: nn.Module) -> bool:
    holder = getattr(module, "base_layer", module)
    weight = getattr(holder, "weight", None)
    return bool(lora_factors(module)) or (isinstance(weight, nn.Parameter) and weight.requires_grad)


def find_mmdit_targets(model: nn.Module, subspace: ConceptSubspace, sets: tuple[str, ...],
                       base_model: nn.Module | None, project_context: bool) -> list[Target]:
    """``find_targets``; for an MMDiT with context projection whose text readers do not train, no target (and no
    error): the projected states are then the whole guarantee. Without context projection such a model is refused."""
    forward_model = base_model if base_model is not None else model
    if not is_mmdit(forward_model):
        return find_targets(model, subspace, sets, base_model=base_model)
    check_mmdit_subspace(forward_model, subspace)
    if any(_trains(m) for _, _, m in mmdit_readers(model)):
        return find_targets(model, subspace, sets, base_model=base_model)
    if not project_context:
        labels = " / ".join(ROLES[r].label for r in MMDIT_ROLES)
        raise TargetError(f"{type(forward_model).__name__} is an MMDiT whose text readers ({labels}) do not train, "
                          f"and project_context is off: nothing would be excluded; leave project_context on")
    log.info("no trainable MMDiT text reader: context projection alone keeps the concept out of every update")
    return []


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
    if is_mmdit(denoiser):
        raise TargetError(f"{name}: an MMDiT without a known diffusers pipeline; save its LoRA with that "
                          f"pipeline's save_lora_weights and add exclusion.metadata() yourself")
    return None
