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

from concept_exclusion.concept.subspace import ConceptSubspace
from concept_exclusion.errors import SubspaceError, TargetError
from concept_exclusion.model.roles import MMDIT_ROLES, ROLES
from concept_exclusion.model.scan import Scan, trainable_weight
from concept_exclusion.model.targets import lora_factors

log = logging.getLogger(__name__)


def context_alone(model: Scan, forward: Scan, subspace: ConceptSubspace, project_context: bool) -> bool:
    """For an MMDiT: refuse a subspace without a space a reader needs; True when no reader trains (then context
    projection alone is the guarantee, and refused when it is off)."""
    readers = [layer for layer in forward.layers if layer.role in MMDIT_ROLES]
    for layer in readers:
        space = ROLES[layer.role].space
        if space not in subspace.bases:
            raise SubspaceError(f"{layer.name} reads the {space} text embedding but the concept subspace has no "
                                f"{space!r} basis; build it from all of the model's text encoders "
                                f"(subspace_from_pipeline)")
    trains = any(lora_factors(layer.module) or trainable_weight(layer.module) is not None
                 for layer in model.layers if layer.role in MMDIT_ROLES)
    if trains:
        return False
    if not project_context:
        labels = " / ".join(ROLES[r].label for r in MMDIT_ROLES)
        raise TargetError(f"{type(forward.root).__name__} is an MMDiT whose text readers ({labels}) do not train, "
                          f"and project_context is off: nothing would be excluded; leave project_context on")
    log.info("no trainable MMDiT text reader: context projection alone keeps the concept out of every update")
    return True
