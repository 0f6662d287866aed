"""A LoRA file's change put into a trusted base model for as long as a block runs, and taken out exactly after.

Every adapter of a layer is applied (their sum, multiplier 1, as a loader that reads the file applies it), on the
denoiser and on the text encoders; a BFL/SAI fused layer (Flux/SD3 ``qkv``, ``linear1``) is split over the
diffusers layers that hold its rows (``BaseModel.parts``). Invariant: on leaving the block every weight holds, bit
for bit, what it held before (the originals are kept and copied back, never subtracted).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch

from concept_exclusion.audit.base_model import BaseModel, Part
from concept_exclusion.lora.file import LoraFile, effective_delta
from concept_exclusion.lora.keys import is_text_encoder


@dataclass
class Applied:
    """Which layers carry the file's change, and which could not (layer -> why)."""

    layers: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _fused_weight(parts: list[Part]) -> torch.Tensor:
    """The named layer's weight [out, in] (float64, CPU) as its file's layout stacks it from ``parts``."""
    rows = []
    for part in parts:
        w = part.module.weight.detach().double().reshape(part.module.weight.shape[0], -1).cpu()
        rows.append(torch.cat(w.chunk(2)[::-1]) if part.swapped else w)
    return torch.cat(rows)


def _delta(lora: LoraFile, adapters: list, parts: list[Part]) -> tuple[list[torch.Tensor] | None, str]:
    """The file's change split into one delta per part (each of its part's weight shape), or None and why."""
    w0 = _fused_weight(parts)
    total = None
    for adapter in adapters:
        formed = effective_delta(lora, adapter, w0)
        if formed.delta is None:
            return None, formed.reason
        total = formed.delta if total is None else total + formed.delta
    if total is None:
        return None, "holds settings but no factors"
    if total.numel() != w0.numel():
        shape = list(parts[0].module.weight.shape) if len(parts) == 1 else list(w0.shape)
        return None, f"change of shape {list(total.shape)} does not fit the layer's weight {shape}"
    deltas = []
    for part, rows in zip(parts, total.reshape(w0.shape).split([p.module.weight.shape[0] for p in parts])):
        rows = torch.cat(rows.chunk(2)[::-1]) if part.swapped else rows
        deltas.append(rows.reshape(part.module.weight.shape))
    return deltas, ""


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
                parts = _parts(name, base, text_modules)
                if parts is None:
                    result.skipped[name] = "no such layer in the base model"
                    continue
                if name not in by_module:
                    continue  # settings only (alpha without factors): nothing to apply
                deltas, why = _delta(lora, by_module[name], parts)
                if deltas is None:
                    result.skipped[name] = why
                    continue
                for part, delta in zip(parts, deltas):
                    weight = part.module.weight
                    originals.append((weight, weight.detach().clone()))
                    weight.add_(delta.to(weight.dtype).to(weight.device))
                result.layers.append(name)
        yield result
    finally:
        with torch.no_grad():
            for weight, original in originals:
                weight.copy_(original)


def _parts(name: str, base: BaseModel, text_modules: dict[str, torch.nn.Module]) -> list[Part] | None:
    """The layers a file's module name changes (None: not in the base, or one without a weight tensor)."""
    if is_text_encoder(name):
        parts = [Part(text_modules[name])] if name in text_modules else None
    else:
        parts = base.parts(name)
        for part in parts or ():
            base.load(part.module)  # a denoiser built without weights: this layer's are read now
    if parts is None or not all(isinstance(getattr(p.module, "weight", None), torch.Tensor) for p in parts):
        return None
    return parts
