"""The concept for ``concept_exclusion.integrations.kohya``: the preset encoded with the model's own
tokenizer(s) (sd-scripts' TokenizeStrategy, or ``concept_tokenizer``) and text encoder(s).

Invariant: the subspace is built before the network is, so a preset, tokenizer or width problem
fails with one line before training starts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from concept_exclusion.concept.preset import Preset, load_preset
from concept_exclusion.concept.subspace import ConceptSubspace
from concept_exclusion.errors import SubspaceError
from concept_exclusion.model.roles import role_of
from concept_exclusion.options import check_mode_strength
from concept_exclusion.loss_changes import warn_unapplied

from concept_exclusion.integrations.kohya.args import KohyaArgsError
from concept_exclusion.integrations.kohya.mmdit import mmdit_strategy

log = logging.getLogger(__name__)


def _strategy_objects() -> tuple[list | None, int | None, bool]:
    """(tokenizers, clip_skip, found) from sd-scripts' strategy objects, when sd-scripts is loaded."""
    try:
        from library import strategy_base  # sd-scripts
    except Exception:  # noqa: BLE001 - sd-scripts absent (or an unrelated 'library' package)
        return None, None, False
    tokenize = getattr(getattr(strategy_base, "TokenizeStrategy", None), "get_strategy", lambda: None)()
    encode = getattr(getattr(strategy_base, "TextEncodingStrategy", None), "get_strategy", lambda: None)()
    tokenizers = None
    if tokenize is not None:
        if getattr(tokenize, "tokenizer1", None) is not None:
            tokenizers = [tokenize.tokenizer1] + ([tokenize.tokenizer2] if getattr(tokenize, "tokenizer2", None)
                                                   is not None else [])
        elif getattr(tokenize, "tokenizer", None) is not None:
            tokenizers = [tokenize.tokenizer]
    clip_skip = getattr(encode, "clip_skip", None) if encode is not None else None
    return tokenizers, clip_skip, tokenize is not None or encode is not None


def _tokenize_strategy():
    """sd-scripts' current TokenizeStrategy object, or None when sd-scripts is not loaded."""
    try:
        from library import strategy_base  # sd-scripts
    except Exception:  # noqa: BLE001 - sd-scripts absent (or an unrelated 'library' package)
        return None
    return getattr(getattr(strategy_base, "TokenizeStrategy", None), "get_strategy", lambda: None)()


def _load_tokenizers(path: str, count: int) -> list:
    """``count`` CLIP tokenizers from a folder: a diffusers model folder (tokenizer/, tokenizer_2/),
    a tokenizer folder, or comma-separated tokenizer folders."""
    from transformers import CLIPTokenizer

    root = Path(path)
    if root.is_dir() and (root / "tokenizer").is_dir():
        folders = [root / "tokenizer"] + ([root / "tokenizer_2"] if count == 2 else [])
    else:
        folders = [Path(p.strip()) for p in path.split(",") if p.strip()]
    if len(folders) != count:
        raise KohyaArgsError(f"network_args concept_tokenizer={path}: the model has {count} text encoder(s); give "
                             f"a diffusers model folder or {count} comma-separated tokenizer folders")
    out = []
    for folder in folders:
        if not folder.is_dir():
            raise KohyaArgsError(f"network_args concept_tokenizer={path}: {folder} is not a folder")
        try:
            out.append(CLIPTokenizer.from_pretrained(str(folder), local_files_only=True))
        except (OSError, ValueError) as exc:
            raise KohyaArgsError(f"network_args concept_tokenizer={path}: {folder}: not a CLIP tokenizer "
                                 f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return out


def _encoders_list(text_encoder) -> list[nn.Module]:
    if text_encoder is None:
        return []
    return [t for t in (text_encoder if isinstance(text_encoder, (list, tuple)) else [text_encoder]) if t is not None]


def build_subspace(preset: Preset, text_encoder, settings: dict[str, Any]) -> ConceptSubspace:
    """Encode the preset's concepts with the model's encoders (SDXL: a list of two), through
    ``ConceptSubspace.from_encoders`` -> the concept subspace."""
    encoders = _encoders_list(text_encoder)
    if not encoders:
        raise SubspaceError("sd-scripts passed no text encoder to encode the concept with")
    tokenizers, strategy_skip, found = _strategy_objects()
    mmdit = mmdit_strategy(_tokenize_strategy())  # sd-scripts Flux/SD3: clip_l [clip_g] t5xxl, T5's length
    if mmdit is not None:
        tokenizers = mmdit.tokenizers
    source = "sd-scripts' TokenizeStrategy"
    if "tokenizer" in settings:
        tokenizers, source = _load_tokenizers(settings["tokenizer"], len(encoders)), "concept_tokenizer"
    if tokenizers is None:
        raise KohyaArgsError("cannot encode the concept: no tokenizer (sd-scripts' TokenizeStrategy is not set and "
                             "network_args concept_tokenizer=PATH was not given)")
    if len(tokenizers) != len(encoders):
        raise KohyaArgsError(f"cannot encode the concept: {len(tokenizers)} tokenizer(s) from {source} for "
                             f"{len(encoders)} text encoder(s)")
    clip_skip = settings.get("clip_skip", strategy_skip)
    if found and "clip_skip" in settings and strategy_skip is not None and settings["clip_skip"] != strategy_skip:
        log.warning("concept_clip_skip=%s differs from the training's --clip_skip %s: the concept is encoded "
                    "differently from the prompts the UNet reads", settings["clip_skip"], strategy_skip)
    return ConceptSubspace.from_encoders(preset, tokenizers, encoders, clip_skip,
                                         max_length=mmdit.max_length if mmdit else None)


def _check_unet_width(unet: nn.Module | None, subspace: ConceptSubspace) -> None:
    """Fail early when the UNet's cross-attention reads embeddings of another width than the basis."""
    if unet is None:
        return
    dim = subspace.dim("context")
    for name, m in unet.named_modules():
        if role_of(name) == "key" and isinstance(m, nn.Linear):
            if m.in_features != dim:
                raise SubspaceError(f"{name} reads {m.in_features}-d text embeddings but the concept was encoded "
                                    f"as {dim}-d: the text encoders given do not belong to this UNet")
            return


def encode_concept(text_encoder, unet, settings: dict[str, Any]) -> ConceptSubspace:
    """Load the preset and encode it with the model's own encoder(s); every failure is one line, before training."""
    preset = load_preset(settings["preset"])
    mode = settings.get("mode") or preset.projection.mode
    check_mode_strength(mode, settings.get("strength"), mode_name="network_args concept_mode",
                        strength_name="network_args concept_strength", error=KohyaArgsError)
    if mode == "gradient":
        log.warning("concept_mode=gradient projects gradients only: a LoRA's down factors keep their initial "
                    "concept components and Adam drifts, so the saved file will usually fail `concept-exclusion "
                    "audit`; use concept_mode=exact for a guarantee")
    warn_unapplied(preset, "an sd-scripts network module", {"output_preservation": "see docs/kohya.md"})
    subspace = build_subspace(preset, text_encoder, settings)
    _check_unet_width(unet, subspace)
    log.info("concept %s encoded: ranks %s (clip_skip %s)", preset.name,
             {s: subspace.rank(s) for s in subspace.bases}, subspace.clip_skip)
    return subspace
