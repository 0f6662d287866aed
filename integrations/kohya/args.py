"""``--network_args`` for ``concept_exclusion.integrations.kohya``: ours (``concept_*``, ``base_network``)
split from the base network's own, and checked.

Invariant: every ``concept_*`` value arrives as a string (sd-scripts passes ``key=value`` text) and
leaves typed and validated; an unknown or invalid one fails with one line naming it.
"""

from __future__ import annotations

from typing import Any

from concept_exclusion.errors import ConceptExclusionError
from concept_exclusion.model.roles import target_sets
from concept_exclusion.options import check_mode_strength, parse_bool

DEFAULT_BASE_NETWORK = "networks.lora"
THIS_MODULE = "concept_exclusion.integrations.kohya"
OUR_ARGS = ("concept_preset", "concept_mode", "concept_strength", "concept_targets", "concept_clip_skip",
            "concept_tokenizer", "concept_allow_text_encoder_training", "concept_reencode_every",
            "concept_project_context")


class KohyaArgsError(ConceptExclusionError):
    """A ``--network_args`` value for this module is missing or invalid."""


def _as_bool(key: str, value: Any) -> bool:
    try:
        return parse_bool(value, empty=False)
    except ValueError:
        raise KohyaArgsError(f"network_args {key}={value!r}: expected true or false") from None


def _as_int(key: str, value: Any, lo: int) -> int:
    try:
        v = int(str(value).strip())
    except ValueError:
        raise KohyaArgsError(f"network_args {key}={value!r}: expected an integer") from None
    if v < lo:
        raise KohyaArgsError(f"network_args {key}={value!r}: must be {lo} or more")
    return v


def _as_float(key: str, value: Any) -> float:
    try:
        return float(str(value).strip())
    except ValueError:
        raise KohyaArgsError(f"network_args {key}={value!r}: expected a number") from None


def split_network_args(kwargs: dict[str, Any]) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(our settings, base network module name, the base network's own kwargs). Values may be strings."""
    kwargs = dict(kwargs)
    base_name = str(kwargs.pop("base_network", None) or DEFAULT_BASE_NETWORK).strip()
    ours = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("concept_")}
    unknown = sorted(set(ours) - set(OUR_ARGS))
    if unknown:
        raise KohyaArgsError(f"network_args {unknown[0]}: unknown concept-exclusion argument "
                             f"(known: {', '.join(OUR_ARGS)})")
    if not ours.get("concept_preset"):
        raise KohyaArgsError("network_args concept_preset=PATH is required (a preset .toml or a shipped preset name)")
    settings: dict[str, Any] = {"preset": str(ours["concept_preset"]).strip()}
    if ours.get("concept_mode") not in (None, ""):
        mode = str(ours["concept_mode"]).strip()
        check_mode_strength(mode, None, mode_name="network_args concept_mode", error=KohyaArgsError)
        settings["mode"] = mode
    if ours.get("concept_strength") not in (None, ""):
        settings["strength"] = _as_float("concept_strength", ours["concept_strength"])
    if ours.get("concept_targets") not in (None, ""):
        raw = ours["concept_targets"]
        names = raw if isinstance(raw, (list, tuple)) else str(raw).replace(",", " ").split()
        for n in names:
            if n not in target_sets():
                raise KohyaArgsError(f"network_args concept_targets={raw!r}: {n!r} is not one of "
                                     f"{', '.join(target_sets())}")
        settings["targets"] = tuple(sorted(set(names)))
    if ours.get("concept_clip_skip") not in (None, ""):
        settings["clip_skip"] = _as_int("concept_clip_skip", ours["concept_clip_skip"], 1)
    if ours.get("concept_tokenizer") not in (None, ""):
        settings["tokenizer"] = str(ours["concept_tokenizer"]).strip()
    settings["allow_text_encoder_training"] = _as_bool(
        "concept_allow_text_encoder_training", ours.get("concept_allow_text_encoder_training", False))
    if ours.get("concept_project_context") not in (None, ""):
        settings["project_context"] = _as_bool("concept_project_context", ours["concept_project_context"])
    settings["reencode_every"] = _as_int("concept_reencode_every", ours.get("concept_reencode_every", 100), 1)
    if base_name == THIS_MODULE:
        raise KohyaArgsError(f"network_args base_network={base_name}: must be a LoRA network module such as "
                             f"networks.lora or lycoris.kohya, not this module")
    return settings, base_name, kwargs
