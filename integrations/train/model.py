"""``concept-exclusion train`` model: the base pipeline (diffusers folder, single file or hub id) and its LoRA.

Invariant: only SD1.x/2.x and SDXL pipelines are returned, and a single-file base is read as
safetensors only (pickled ``.ckpt`` files are never loaded).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from concept_exclusion.errors import ConceptExclusionError

LORA_TARGETS = {
    "cross_attention": r".*attn2\.(to_k|to_v|to_q|to_out\.0)$",
    "cross_attention_kv": r".*attn2\.(to_k|to_v)$",
    "attention": r".*attn[12]\.(to_k|to_v|to_q|to_out\.0)$",
}


def load_pipeline(base: str, base_config: str | None = None, local_files_only: bool = False):
    """StableDiffusion(XL)Pipeline from a diffusers folder, a single-file checkpoint or a hub id."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(base)
    try:
        if path.is_file():
            if path.suffix != ".safetensors":
                raise ConceptExclusionError(f"--base {base}: single-file checkpoints must be .safetensors "
                                            f"(pickled .ckpt files are never loaded)")
            from concept_exclusion.safeio import read_header

            names, _ = read_header(path)
            xl = any(k.startswith("conditioner.embedders.1") for k in names)
            cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
            kwargs = {"config": base_config} if base_config else {}
            return cls.from_single_file(str(path), local_files_only=local_files_only, **kwargs)
        pipe = DiffusionPipeline.from_pretrained(base, local_files_only=local_files_only, safety_checker=None) \
            if _has_safety_checker(path) else DiffusionPipeline.from_pretrained(base, local_files_only=local_files_only)
    except ConceptExclusionError:
        raise
    except (OSError, ValueError) as exc:
        raise ConceptExclusionError(f"--base {base}: cannot load ({str(exc).splitlines()[0] if str(exc) else exc})") \
            from None
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        raise ConceptExclusionError(f"--base {base}: is a {type(pipe).__name__}; train supports SD1.x/2.x and SDXL")
    return pipe


def _has_safety_checker(path: Path) -> bool:
    index = path / "model_index.json"
    if not index.is_file():
        return True  # a hub id: pass safety_checker=None, harmless for SDXL
    try:
        return "safety_checker" in json.loads(index.read_text())
    except ValueError:
        return False


def lora_config(args: argparse.Namespace):
    """The PEFT LoRA of ``--rank``/``--alpha`` on ``--lora_targets`` (a named set or a regex), Gaussian init."""
    from peft import LoraConfig

    target = LORA_TARGETS.get(args.lora_targets, args.lora_targets)
    return LoraConfig(r=args.rank, lora_alpha=args.alpha if args.alpha is not None else args.rank,
                      init_lora_weights="gaussian", target_modules=target, lora_dropout=0.0)
