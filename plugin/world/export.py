"""Writing a fine-tuned world LoRA as a diffusers-format safetensors file with our provenance metadata."""

from __future__ import annotations

from pathlib import Path

from ..metadata import PREFIX, subspace_metadata
from ..safeio import write_safetensors
from ..subspace import ConceptSubspace
from .train import Finetuned


def save_lora(run: Finetuned, path: str | Path, subspace: ConceptSubspace) -> dict[str, str]:
    """Write the run's LoRA (``unet.<module>.lora.down/up.weight``); returns the metadata written.

    Excluded runs carry ``exclusion.metadata()`` (mode, targets, measured leakage, basis); a plain
    run carries the same subspace keys with ``mode = "none"``, so an audit can check it too.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    if run.config.kind != "lora":
        raise ValueError("only LoRA runs are written as LoRA files")
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(run.unet))
    tensors = {f"unet.{k}": v for k, v in state.items()}
    if run.exclusion is not None:
        meta = run.exclusion.metadata()
    else:
        meta = subspace_metadata(subspace)
        meta[PREFIX + "mode"] = "none"
    meta[PREFIX + "world_method"] = run.method.name
    meta[PREFIX + "world_seed"] = str(run.seed)
    meta[PREFIX + "world_steps"] = str(run.config.steps)
    meta["format"] = "pt"
    write_safetensors(path, tensors, meta)
    return meta
