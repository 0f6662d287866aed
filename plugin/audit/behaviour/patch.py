"""A LoRA file's change put into a trusted base model for as long as a block runs, and taken out exactly after.

Every adapter of a layer is applied (their sum, multiplier 1, as a loader that reads the file applies it), on the
denoiser and on the text encoders. Invariant: on leaving the block every weight holds, bit for bit, what it held
before (the originals are kept and copied back, never subtracted).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch

from concept_exclusion.audit.base_model import BaseModel
from concept_exclusion.lora.file import LoraFile, effective_delta
from concept_exclusion.lora.keys import is_text_encoder


@dataclass
class Applied:
    """Which layers carry the file's change, and which could not (layer -> why)."""

    layers: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _delta(lora: LoraFile, adapters: list, weight: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    w0 = weight.detach().double().reshape(weight.shape[0], -1).cpu()
    total = None
    for adapter in adapters:
        formed = effective_delta(lora, adapter, w0)
        if formed.delta is None:
            return None, formed.reason
        total = formed.delta if total is None else total + formed.delta
    if total is None:
        return None, "holds settings but no factors"
    if total.numel() != weight.numel():
        return None, f"change of shape {list(total.shape)} does not fit the layer's weight {list(weight.shape)}"
    return total.reshape(weight.shape), ""


@contextlib.contextmanager
def applied(lora: LoraFile, base: BaseModel, text_modules: dict[str, torch.nn.Module]) -> Iterator[Applied]:
    """``lora`` merged into ``base`` (denoiser and text encoders) inside the block; every weight restored after."""
    by_module: dict[str, list] = {}
    for adapter in lora.adapters:
        by_module.setdefault(adapter.module, []).append(adapter)
    result, originals = Applied(), []
    try:
        with torch.no_grad():
            for name in lora.modules():
                module = text_modules.get(name) if is_text_encoder(name) else base.module(name)
                weight = getattr(module, "weight", None)
                if module is None or not isinstance(weight, torch.Tensor):
                    result.skipped[name] = "no such layer in the base model"
                    continue
                if name not in by_module:
                    continue  # settings only (alpha without factors): nothing to apply
                delta, why = _delta(lora, by_module[name], weight)
                if delta is None:
                    result.skipped[name] = why
                    continue
                originals.append((weight, weight.detach().clone()))
                weight.add_(delta.to(weight.dtype).to(weight.device))
                result.layers.append(name)
        yield result
    finally:
        with torch.no_grad():
            for weight, original in originals:
                weight.copy_(original)
