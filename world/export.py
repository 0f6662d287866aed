"""Writing a fine-tuned world LoRA as a safetensors file with the exclusion's provenance metadata."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from .files import atomic_path


def save_lora(ft, path: Path) -> Path:
    """The LoRA factors (PEFT keys) of ``ft.model``; metadata: the exclusion's ``concept_exclusion.*`` keys when the
    method used one, and the method's name. Written to a temporary file and moved into place."""
    from peft import get_peft_model_state_dict

    tensors = {k: v.detach().float().contiguous() for k, v in get_peft_model_state_dict(ft.model).items()}
    metadata = dict(ft.exclusion.metadata()) if ft.exclusion is not None else {}
    metadata["concept_exclusion_world.method"] = ft.method.name
    metadata["concept_exclusion_world.seed"] = str(ft.seed)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata)
    return path
