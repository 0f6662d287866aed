"""A LoRA file as adapters per model layer, and the weight change each adapter makes.

Every tensor is accounted for: it belongs to an ``Adapter`` (factors of one layer in one spelling),
to a layer's auxiliary settings (alpha, DoRA magnitude, ...), or to ``LoraFile.unknown`` (names no
loader convention explains). ``effective_delta`` forms ``W' - W0`` in float64 with the formula the
loaders apply (LoRA with optional Tucker middle, DoRA/PEFT magnitude, LoHa, LoKr, full ``diff``),
or says why it cannot (OFT, GLoRA, Tucker LoHa/LoKr, an incomplete adapter, DoRA without the base
weight). Invariant: files are read with safetensors only; nothing here decides a verdict.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from concept_exclusion.errors import LoraFileError
from concept_exclusion.lora.keys import KeyInfo, is_text_encoder, parse_key
from concept_exclusion.lora.sdxl_names import sai_to_diffusers
from concept_exclusion.safeio import read_safetensors

MAX_DELTA_ELEMENTS = 2 ** 28  # the largest weight change formed (Flux's context_embedder is 3072 x 4096 = 2 ** 23.6)
_LAYOUT_ORDER = ("kohya", "diffusers-old", "diffusers", "peft", "lycoris")
_LAYOUT_NAMES = {"diffusers-old": "diffusers"}
_UNMEASURABLE = {
    "oft_blocks": "OFT rotation", "oft_diag": "OFT rotation", "oft_R": "BOFT rotation",
    "a1": "GLoRA", "a2": "GLoRA", "b1": "GLoRA", "b2": "GLoRA",
    "hada_t1": "Tucker-decomposed LoHa", "hada_t2": "Tucker-decomposed LoHa",
    "lokr_t1": "Tucker-decomposed LoKr", "lokr_t2": "Tucker-decomposed LoKr",
    "w_norm": "a norm-layer change", "b_norm": "a norm-layer change",
}


@dataclass
class Adapter:
    """The factors of one layer in one spelling: part -> tensor (and part -> the file's key)."""

    module: str
    spelling: str
    path: str  # the file's own module path (dotted or kohya), for PEFT's rank/alpha patterns
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)


@dataclass
class Formed:
    """An adapter's effect: ``delta`` [out, in] float64 with scale applied, or None and the ``reason``."""

    delta: torch.Tensor | None
    kind: str
    reason: str = ""
    scale_known: bool = True


@dataclass
class LoraFile:
    path: Path
    layout: str
    adapters: list[Adapter]
    aux: dict[str, dict[str, torch.Tensor]]  # module -> alpha / dora_scale / magnitude / rescale / scalar
    unknown: list[str]  # keys no loader convention explains
    metadata: dict[str, str]
    peft: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def modules(self) -> list[str]:
        return sorted({a.module for a in self.adapters} | set(self.aux))

    @property
    def text_encoder_modules(self) -> list[str]:
        return [m for m in self.modules() if is_text_encoder(m)]


def layout_of(keys: list[str]) -> str:
    """The file's dominant spelling: kohya, diffusers, peft, lycoris, or unknown."""
    found = {info.spelling for k in keys if (info := parse_key(k)) is not None}
    for name in _LAYOUT_ORDER:
        if name in found:
            return _LAYOUT_NAMES.get(name, name)
    return "unknown"


def read_lora(path: str | Path) -> LoraFile:
    """Every tensor of a LoRA file, grouped by layer. Raises ``SafetensorsFileError``/``LoraFileError``."""
    path = Path(path)
    tensors, metadata = read_safetensors(path)
    adapters: dict[tuple[str, str], Adapter] = {}
    aux: dict[str, dict[str, torch.Tensor]] = {}
    aux_keys: dict[tuple[str, str], str] = {}
    unknown: list[str] = []
    infos: list[KeyInfo] = []
    for key in sorted(tensors):
        info = parse_key(key)
        if info is None:
            unknown.append(key)
            continue
        infos.append(info)
        if info.auxiliary:
            seen = aux_keys.setdefault((info.module, info.part), key)
            if seen != key:  # two spellings of one setting: which one a loader takes is not knowable
                unknown.append(key)
                continue
            aux.setdefault(info.module, {})[info.part] = tensors[key]
            continue
        adapter = adapters.setdefault((info.module, info.spelling),
                                      Adapter(info.module, info.spelling, _own_path(key)))
        if info.part in adapter.parts:
            unknown.append(key)
            continue
        adapter.parts[info.part] = tensors[key]
        adapter.keys[info.part] = key
    if not adapters and not aux:
        raise LoraFileError(f"{path}: no LoRA layers found (expected lora_down/lora_up, lora_A/lora_B or LyCORIS "
                            f"keys among {len(tensors)} tensors)")
    layout = layout_of([i.key for i in infos])
    peft = _peft_config(path, metadata) if layout in ("peft", "diffusers") else None
    return LoraFile(path, layout, sorted(adapters.values(), key=lambda a: (a.module, a.spelling)), aux, unknown,
                    metadata, peft)


def _own_path(key: str) -> str:
    for marker in (".lora_A", ".lora_B", ".lora_down", ".lora_up", ".lora.", ".processor.", "_lora."):
        if marker in key:
            return key.split(marker)[0]
    return key.rsplit(".", 1)[0]


def _peft_config(path: Path, metadata: dict[str, str]) -> dict[str, Any] | None:
    """LoRA alpha/rank settings from a PEFT adapter_config.json beside the file or diffusers' metadata."""
    texts = []
    beside = path.parent / "adapter_config.json"
    if beside.is_file():
        with contextlib.suppress(OSError, UnicodeDecodeError):  # unreadable side file: as if absent
            texts.append(beside.read_text(encoding="utf-8")[:1_000_000])
    if "lora_adapter_metadata" in metadata:
        texts.append(metadata["lora_adapter_metadata"][:1_000_000])
    for text in texts:
        try:
            config = json.loads(text)
        except (ValueError, RecursionError):
            continue
        if isinstance(config, dict) and _positive(config.get("lora_alpha")) is not None:
            return config
    return None


def _positive(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        v = float(value)
    except OverflowError:
        return None
    return v if math.isfinite(v) and v > 0 else None


def _pattern_value(patterns: Any, name: str, default: Any) -> Any:
    if not isinstance(patterns, dict):
        return default
    for pattern, value in patterns.items():
        if isinstance(pattern, str) and (name.endswith("." + pattern) or name == pattern):
            return value
    return default


def _matrix(t: torch.Tensor, key: str, path: Path) -> torch.Tensor:
    t = t.detach().double()
    if t.ndim == 4 and t.shape[2:] == (1, 1):
        t = t[:, :, 0, 0]
    if t.ndim != 2:
        raise LoraFileError(f"{path}: tensor {key!r} has shape {list(t.shape)}, expected a matrix")
    if not torch.isfinite(t).all():
        raise LoraFileError(f"{path}: tensor {key!r} holds NaN or infinite values")
    return t


def _fits(path: Path, module: str, rows: int, cols: int) -> None:
    """Refuse, in one line, a change whose factors multiply out to more than ``MAX_DELTA_ELEMENTS``."""
    if rows * cols > MAX_DELTA_ELEMENTS:
        raise LoraFileError(f"{path}: layer {module!r} would form a {rows} x {cols} change, larger than any model "
                            f"layer this audit reads")


def _scalar(t: torch.Tensor, key: str, path: Path) -> float:
    if t.numel() != 1 or not torch.isfinite(t.double()).all():
        raise LoraFileError(f"{path}: tensor {key!r} must hold one finite value, got shape {list(t.shape)}")
    return float(t.double().reshape(-1)[0])


def _scale(lora: LoraFile, adapter: Adapter, rank: int) -> tuple[float, bool]:
    """alpha / rank from the layer's alpha tensor, else PEFT's config (rslora: / sqrt(rank)), else 1."""
    alpha_t = lora.aux.get(adapter.module, {}).get("alpha")
    if alpha_t is not None:
        alpha = _scalar(alpha_t, f"{adapter.module}.alpha", lora.path)
        return (alpha / rank if alpha != 0 else 1.0), True
    if lora.peft is not None and adapter.spelling in ("peft", "diffusers", "diffusers-old"):
        name = _strip_prefixes(adapter.path)
        r = _positive(_pattern_value(lora.peft.get("rank_pattern"), name, lora.peft.get("r", rank))) or rank
        alpha = _positive(_pattern_value(lora.peft.get("alpha_pattern"), name, lora.peft["lora_alpha"]))
        if alpha is not None:
            return alpha / (math.sqrt(r) if lora.peft.get("use_rslora") is True else r), True
    return 1.0, False


def _strip_prefixes(name: str) -> str:
    for p in ("base_model.model.", "unet.", "transformer."):
        if name.startswith(p):
            name = name[len(p):]
    return name


def effective_delta(lora: LoraFile, adapter: Adapter, w0: torch.Tensor | None) -> Formed:
    """``W' - W0`` of one adapter, the way kohya/LyCORIS/ComfyUI/PEFT apply it (multiplier 1)."""
    parts, path = adapter.parts, lora.path
    get = lambda p: _matrix(parts[p], adapter.keys[p], path)  # noqa: E731
    blocked = sorted({why for p, why in _UNMEASURABLE.items() if p in parts})
    if blocked:
        return Formed(None, blocked[0].split()[0].lower(), f"{', '.join(blocked)}: formula not implemented")
    names = set(parts)
    if {"down", "up"} <= names:
        down, up = get("down"), get("up")
        if "mid" in names:
            mid = get("mid")
            if mid.shape != (up.shape[1], down.shape[0]):
                raise LoraFileError(f"{path}: layer {adapter.module!r}: lora_mid {list(mid.shape)} does not chain")
            down = mid @ down
        if up.shape[1] != down.shape[0]:
            raise LoraFileError(f"{path}: layer {adapter.module!r}: up {list(up.shape)} and down "
                                f"{list(down.shape)} do not chain")
        _fits(path, adapter.module, up.shape[0], down.shape[1])
        scale, known = _scale(lora, adapter, int(parts["down"].shape[0]))
        delta, kind = scale * (up @ down), "lora"
    elif {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= names:
        scale, known = _scale(lora, adapter, int(parts["hada_w1_b"].shape[0]))
        _fits(path, adapter.module, int(parts["hada_w1_a"].shape[0]), int(parts["hada_w1_b"].shape[-1]))
        w1, w2 = get("hada_w1_a") @ get("hada_w1_b"), get("hada_w2_a") @ get("hada_w2_b")
        if w1.shape != w2.shape:
            raise LoraFileError(f"{path}: LoHa layer {adapter.module!r}: factors {list(w1.shape)} and "
                                f"{list(w2.shape)} differ")
        delta, kind = w1 * w2 * scale, "loha"
    elif names & {"lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"}:
        delta, kind, scale, known = _lokr(lora, adapter, get)
        if delta is None:
            return Formed(None, "lokr", "LoKr layer lacks its w1 or w2 factor")
    elif "diff" in names:
        delta, kind, known = get("diff"), "full", True
    elif names <= {"diff_b", "up_bias"}:
        return Formed(None, "bias", "changes only the bias, which does not read the text states")
    else:
        return Formed(None, "incomplete", f"incomplete adapter (only {', '.join(sorted(names))})")
    extra = lora.aux.get(adapter.module, {})
    if "rescale" in extra:  # OFT's output rescaling: which loaders apply it to other adapters is not settled
        return Formed(None, kind, "an OFT rescale tensor: formula not implemented")
    if "scalar" in extra:
        delta = delta * _scalar(extra["scalar"], f"{adapter.module}.scalar", path)
    if "dora_scale" in extra or "magnitude" in extra:
        return _dora(lora, adapter, delta, w0, kind, known)
    return Formed(delta, kind, scale_known=known)


def _lokr(lora: LoraFile, adapter: Adapter, get) -> tuple[torch.Tensor | None, str, float, bool]:
    names = set(adapter.parts)
    w1 = get("lokr_w1") if "lokr_w1" in names else (
        get("lokr_w1_a") @ get("lokr_w1_b") if {"lokr_w1_a", "lokr_w1_b"} <= names else None)
    w2 = get("lokr_w2") if "lokr_w2" in names else (
        get("lokr_w2_a") @ get("lokr_w2_b") if {"lokr_w2_a", "lokr_w2_b"} <= names else None)
    if w1 is None or w2 is None:
        return None, "lokr", 1.0, False
    _fits(lora.path, adapter.module, w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1])
    rank_part = "lokr_w2_b" if "lokr_w2_b" in names else ("lokr_w1_b" if "lokr_w1_b" in names else None)
    if rank_part is None:  # full factors: LyCORIS applies alpha only to decomposed ones
        return torch.kron(w1, w2), "lokr", 1.0, True
    scale, known = _scale(lora, adapter, int(adapter.parts[rank_part].shape[0]))
    return torch.kron(w1, w2) * scale, "lokr", scale, known


def _dora(lora: LoraFile, adapter: Adapter, delta: torch.Tensor, w0: torch.Tensor | None, kind: str,
          known: bool) -> Formed:
    """DoRA: ``W' = m * (W0 + dW) / ||W0 + dW||`` (norm per output row, or per input column for LyCORIS's
    ``dora_scale`` of shape [1, in]); the change is ``W' - W0``, which moves ``W0 c`` itself."""
    if w0 is None:
        return Formed(None, "dora", "DoRA rescales the base weight: measurable only with --base")
    if w0.shape != delta.shape:
        return Formed(None, "dora", f"delta {list(delta.shape)} does not match the base weight {list(w0.shape)}")
    extra = lora.aux[adapter.module]
    merged = w0 + delta
    if "magnitude" in extra:
        m = extra["magnitude"].detach().double().reshape(-1)
        if m.numel() != merged.shape[0]:
            return Formed(None, "dora", f"magnitude vector of {m.numel()} values for {merged.shape[0]} rows")
        scaled = m[:, None] * merged / merged.norm(dim=1, keepdim=True).clamp_min(1e-12)
    else:
        m = extra["dora_scale"].detach().double()
        if m.numel() == merged.shape[0] and (m.ndim < 2 or m.shape[0] == merged.shape[0]):
            scaled = m.reshape(-1, 1) * merged / merged.norm(dim=1, keepdim=True).clamp_min(1e-12)
        elif m.numel() == merged.shape[1]:
            scaled = m.reshape(1, -1) * merged / merged.norm(dim=0, keepdim=True).clamp_min(1e-12)
        else:
            return Formed(None, "dora", f"dora_scale {list(m.shape)} fits neither side of {list(merged.shape)}")
    if not torch.isfinite(scaled).all():
        return Formed(None, "dora", "DoRA magnitude holds NaN or infinite values")
    return Formed(scaled - w0, f"dora-{kind}", scale_known=known)


def layer_key(name: str) -> str:
    """A file's layer name as kohya spells it (``lora_unet_`` + path with '_')."""
    from concept_exclusion.lora.keys import module_key

    if name.startswith("lora_"):
        return name
    return module_key(name) or name


def sgm_to_diffusers(key: str, layers_per_block: int) -> str:
    """A kohya SDXL (SAI/SGM) layer name (``lora_unet_input_blocks_4_1_...``) as diffusers' (``lora_unet_down_blocks_1_
    attentions_0_...``); other names unchanged (see ``sdxl_names``)."""
    if not key.startswith("lora_unet_"):
        return key
    return "lora_unet_" + sai_to_diffusers(key[len("lora_unet_"):], layers_per_block, sep="_")

