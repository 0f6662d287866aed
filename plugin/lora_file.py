"""Reading LoRA files in any common layout, as per-layer weight deltas.

Layouts: kohya (``lora_down``/``lora_up``/``alpha``), diffusers (``lora.down``/``lora.up`` or
``unet.*.lora_A``/``lora_B``), PEFT (``lora_A``/``lora_B``, alpha from ``adapter_config.json`` or
diffusers' ``lora_adapter_metadata``), and LyCORIS LoHa/LoKr/full ``diff``. Invariant: files are read
with safetensors only, and each delta is ``scale * up @ down`` in float64 with the file's own scale.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import LoraFileError
from .safeio import read_safetensors
from .sdxl_names import sai_to_diffusers
from .targets import role_of

TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te_", "te1_", "te2_", "lora_te1", "lora_te2")
_DOWN = re.compile(r"^(?P<mod>.+?)\.(?:lora_down|lora\.down|lora_A(?:\.[A-Za-z0-9_-]+)?)\.weight$")
_UP = re.compile(r"^(?P<mod>.+?)\.(?:lora_up|lora\.up|lora_B(?:\.[A-Za-z0-9_-]+)?)\.weight$")
_ATTN_PROC = re.compile(r"^(?P<path>.+)\.processor\.(?P<proj>to_[a-z]+)_lora\.(?P<which>down|up)\.weight$")
_LYCORIS = re.compile(r"^(?P<mod>.+?)\.(?P<part>hada_w[12]_[ab]|lokr_w[12](?:_[ab])?|diff|lokr_t[12]|hada_t[12])$")
_STRIP_PREFIXES = ("base_model.model.", "unet.", "model.diffusion_model.", "diffusion_model.", "transformer.")



@dataclass
class LoraLayer:
    """One adapted layer: its delta in float64, the file's name for it and where that name came from."""

    name: str
    kind: str  # lora | loha | lokr | full
    delta: torch.Tensor  # [out, in], scale applied
    scale: float
    scale_known: bool


@dataclass
class LoraFile:
    path: Path
    layout: str
    layers: list[LoraLayer]
    metadata: dict[str, str]
    notes: list[str] = field(default_factory=list)
    text_encoder_layers: int = 0
    other_layers: int = 0  # adapted layers that do not read the text embeddings (not measured)


def _matrix(t: torch.Tensor, key: str, path: Path) -> torch.Tensor:
    t = t.detach().double()
    if t.ndim == 4 and t.shape[2:] == (1, 1):
        t = t[:, :, 0, 0]
    if t.ndim != 2:
        raise LoraFileError(f"{path}: tensor {key!r} has shape {list(t.shape)}, expected a matrix")
    if not torch.isfinite(t).all():
        raise LoraFileError(f"{path}: tensor {key!r} holds NaN or infinite values")
    return t


def _peft_alpha(path: Path, metadata: dict[str, str]) -> dict[str, Any] | None:
    """LoRA alpha/rank settings from a PEFT adapter_config.json beside the file or diffusers' metadata."""
    config = None
    beside = path.parent / "adapter_config.json"
    if beside.is_file():
        try:
            config = json.loads(beside.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = None
    if config is None and "lora_adapter_metadata" in metadata:
        try:
            config = json.loads(metadata["lora_adapter_metadata"])
        except ValueError:
            config = None
    if not isinstance(config, dict) or "lora_alpha" not in config:
        return None
    return config


def _pattern_value(patterns: dict, name: str, default):
    for pattern, value in (patterns or {}).items():
        if re.search(rf"(^|\.){re.escape(pattern)}$", name) or re.fullmatch(pattern, name):
            return value
    return default


def layout_of(keys: list[str]) -> str:
    if any(k.startswith("lora_") and ".lora_down." in k for k in keys):
        return "kohya"
    if any(_LYCORIS.match(k) for k in keys):
        return "lycoris"
    if any(".lora.down." in k or ".processor." in k for k in keys) or any(k.startswith("unet.") for k in keys):
        return "diffusers"
    if any(".lora_A." in k for k in keys):
        return "peft"
    return "unknown"


def read_lora(path: str | Path) -> LoraFile:
    """Every adapted layer of a LoRA file, with its delta. Raises ``SafetensorsFileError``/``LoraFileError``."""
    path = Path(path)
    tensors, metadata = read_safetensors(path)
    keys = sorted(tensors)
    layout = layout_of(keys)
    downs, ups, alphas, lyco = {}, {}, {}, {}
    for k in keys:
        m = _ATTN_PROC.match(k)
        if m:
            proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
            (downs if m["which"] == "down" else ups)[f"{m['path']}.{proj}"] = k
            continue
        if (m := _DOWN.match(k)):
            downs[m["mod"]] = k
        elif (m := _UP.match(k)):
            ups[m["mod"]] = k
        elif k.endswith(".alpha"):
            alphas[k[:-len(".alpha")]] = k
        elif (m := _LYCORIS.match(k)):
            lyco.setdefault(m["mod"], {})[m["part"]] = k
    notes: list[str] = []
    peft = _peft_alpha(path, metadata) if layout in ("peft", "diffusers") else None
    layers: list[LoraLayer] = []
    te_layers = other_layers = 0
    names = sorted(set(downs) | set(ups) | set(lyco))
    if not names:
        raise LoraFileError(f"{path}: no LoRA layers found (expected lora_down/lora_up, lora_A/lora_B or "
                         f"LyCORIS keys among {len(keys)} tensors)")
    wanted = set()
    for mod in names:  # only layers that read the text embeddings are formed; the rest are counted
        if mod.startswith(TEXT_ENCODER_PREFIXES):
            te_layers += 1
        elif role_of(layer_key(mod)) is None:
            other_layers += 1
        else:
            wanted.add(mod)
    for mod in sorted(wanted & (set(downs) | set(ups))):
        if mod not in downs or mod not in ups:
            raise LoraFileError(f"{path}: layer {mod!r} has a LoRA {'down' if mod in downs else 'up'} "
                             f"factor but no {'up' if mod in downs else 'down'} factor")
        down, up = _matrix(tensors[downs[mod]], downs[mod], path), _matrix(tensors[ups[mod]], ups[mod], path)
        if up.shape[1] != down.shape[0]:
            raise LoraFileError(f"{path}: layer {mod!r}: up {list(up.shape)} and down {list(down.shape)} do not chain")
        rank = down.shape[0]
        scale, known = 1.0, False
        if mod in alphas:
            alpha = _alpha(tensors[alphas[mod]], alphas[mod], path)
            scale, known = (alpha / rank if alpha != 0 else 1.0), True
        elif peft is not None:
            name = _strip(mod)
            r = int(_pattern_value(peft.get("rank_pattern"), name, peft.get("r", rank)))
            alpha = float(_pattern_value(peft.get("alpha_pattern"), name, peft["lora_alpha"]))
            scale = alpha / (math.sqrt(r) if peft.get("use_rslora") else r)
            known = True
        if f"{mod}.dora_scale" in tensors or f"{mod}.lora_magnitude_vector" in tensors:
            notes.append(f"{mod}: DoRA magnitude rescaling is not included in its delta")
        layers.append(LoraLayer(mod, "lora", scale * (up @ down), scale, known))
    for mod, parts in sorted(lyco.items()):
        if mod in wanted:
            layers.append(_lycoris_layer(path, mod, parts, tensors, alphas))
    if any(not layer.scale_known for layer in layers):
        notes.append("alpha not recorded for some layers: their scale is taken as 1 (shares are unaffected)")
    return LoraFile(path, layout, layers, metadata, notes, te_layers, other_layers)


def _alpha(t: torch.Tensor, key: str, path: Path) -> float:
    if t.numel() != 1 or not torch.isfinite(t.double()).all():
        raise LoraFileError(f"{path}: tensor {key!r} must hold one finite alpha value, got shape {list(t.shape)}")
    return float(t.double().reshape(-1)[0])


def _lycoris_layer(path: Path, mod: str, parts: dict[str, str], tensors: dict, alphas: dict) -> LoraLayer:
    get = lambda p: _matrix(tensors[parts[p]], parts[p], path)  # noqa: E731
    alpha = _alpha(tensors[alphas[mod]], alphas[mod], path) if mod in alphas else None
    if "diff" in parts:
        return LoraLayer(mod, "full", get("diff"), 1.0, True)
    if any(p.endswith(("_t1", "_t2")) for p in parts):
        raise LoraFileError(f"{path}: layer {mod!r} is a Tucker-decomposed LyCORIS layer, which this audit cannot read")
    if "hada_w1_a" in parts:
        if not {"hada_w1_b", "hada_w2_a", "hada_w2_b"} <= set(parts):
            raise LoraFileError(f"{path}: LoHa layer {mod!r} lacks some of hada_w1_a/b, hada_w2_a/b")
        rank = get("hada_w1_b").shape[0]
        scale = alpha / rank if alpha else 1.0
        delta = (get("hada_w1_a") @ get("hada_w1_b")) * (get("hada_w2_a") @ get("hada_w2_b")) * scale
        return LoraLayer(mod, "loha", delta, scale, alpha is not None)
    w1 = get("lokr_w1") if "lokr_w1" in parts else (get("lokr_w1_a") @ get("lokr_w1_b")
                                                      if {"lokr_w1_a", "lokr_w1_b"} <= set(parts) else None)
    w2 = get("lokr_w2") if "lokr_w2" in parts else (get("lokr_w2_a") @ get("lokr_w2_b")
                                                      if {"lokr_w2_a", "lokr_w2_b"} <= set(parts) else None)
    if w1 is None or w2 is None:
        raise LoraFileError(f"{path}: LoKr layer {mod!r} lacks its w1 or w2 factor")
    rank = get("lokr_w2_b").shape[0] if "lokr_w2_b" in parts else (
        get("lokr_w1_b").shape[0] if "lokr_w1_b" in parts else None)
    scale = alpha / rank if (alpha and rank) else 1.0
    return LoraLayer(mod, "lokr", torch.kron(w1, w2) * scale, scale, alpha is not None or rank is None)


def _strip(name: str) -> str:
    for p in _STRIP_PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def layer_key(name: str) -> str:
    """A file's layer name as kohya spells it (``lora_unet_`` + path with '_')."""
    if name.startswith("lora_"):
        return name
    return "lora_unet_" + _strip(name).replace(".", "_")


def sgm_to_diffusers(key: str, layers_per_block: int) -> str:
    """A kohya SDXL (SAI/SGM) layer name (``lora_unet_input_blocks_4_1_...``) as diffusers' (``lora_unet_down_blocks_1_
    attentions_0_...``); other names unchanged (see ``sdxl_names``)."""
    if not key.startswith("lora_unet_"):
        return key
    return "lora_unet_" + sai_to_diffusers(key[len("lora_unet_"):], layers_per_block, sep="_")
