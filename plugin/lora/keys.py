"""Reading a LoRA file's tensor names the way the loaders users run read them.

Each key becomes (module, part): the module as kohya spells it (``lora_unet_<path with _>`` for the
denoiser, ``lora_te[12]_<path>`` for a text encoder) and the part (``down``, ``up``, ``alpha``,
``dora_scale``, ``hada_w1_a``, ...). Spellings: kohya/LyCORIS (``lora_unet_...lora_down.weight``),
A1111/ComfyUI (the same, or SAI paths, or ``diffusion_model.`` prefixes), diffusers old and new
(``unet.<path>.processor.to_k_lora.down.weight``, the same without ``.processor.``,
``<path>.to_k.lora.down.weight``, ``lora_A``/``lora_B``), PEFT (``base_model.model.``, adapter names),
Flux/SD3 (``transformer.``, kohya ``lora_unet_double_blocks_...``, ai-toolkit/BFL ``diffusion_model.``).
Diffusers' own ``convert_unet_state_dict_to_peft`` normalises the old diffusers spellings.

Invariant (default deny): a key this module does not understand yields ``None``; the caller names it
in the report and the verdict cannot be PASS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from concept_exclusion.model.roles import role_of

# the tensor's role within its adapter, by the name's ending (after diffusers' normalisation)
_PART_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), part) for p, part in (
    (r"\.lora_A(?:\.[A-Za-z0-9_-]+)?\.weight$", "down"),
    (r"\.lora_B(?:\.[A-Za-z0-9_-]+)?\.weight$", "up"),
    (r"\.lora_B(?:\.[A-Za-z0-9_-]+)?\.bias$", "up_bias"),
    (r"\.lora_down\.weight$", "down"),
    (r"\.lora_up\.weight$", "up"),
    (r"\.lora_up\.bias$", "up_bias"),
    (r"\.lora_mid\.weight$", "mid"),
    (r"\.lora_magnitude_vector(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?$", "magnitude"),
    (r"\.(alpha|dora_scale|hada_w1_a|hada_w1_b|hada_w2_a|hada_w2_b|hada_t1|hada_t2|lokr_w1|lokr_w1_a|lokr_w1_b"
     r"|lokr_w2|lokr_w2_a|lokr_w2_b|lokr_t1|lokr_t2|diff|diff_b|oft_blocks|oft_diag|oft_R|rescale|w_norm|b_norm"
     r"|scalar)$", None),
    (r"\.(a1|a2|b1|b2)\.weight$", None),  # GLoRA
))
AUXILIARY_PARTS = frozenset({"alpha", "dora_scale", "magnitude", "rescale", "scalar"})

# prefixes naming the denoiser (UNet or transformer) and the text encoders, in every spelling
_DENOISER_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "unet.", "transformer.",
                      "lora_unet_", "lora_transformer_", "lycoris_")
_TE_PREFIXES = (("lora_te1_", "lora_te1_"), ("lora_te2_", "lora_te2_"), ("lora_te3_", "lora_te3_"),
                ("lora_te_", "lora_te_"), ("text_encoder_2.", "lora_te2_"), ("text_encoder_3.", "lora_te3_"),
                ("text_encoder.", "lora_te_"), ("te1.", "lora_te1_"), ("te2.", "lora_te2_"), ("te.", "lora_te_"))
_MODULE_TEXT = re.compile(r"^[A-Za-z0-9_.]+$")

_DIT_MARKERS = re.compile(r"(^|_)(double_blocks|single_blocks|joint_blocks|single_transformer_blocks|"
                          r"context_embedder|txt_in|x_embedder|img_in|time_text_embed)(_|$)")


@dataclass(frozen=True)
class KeyInfo:
    """One understood tensor name: the file's key, its module (kohya spelling), part and spelling family."""

    key: str
    module: str
    part: str
    spelling: str  # kohya (lora_ prefix) | diffusers-old | diffusers | peft | lycoris

    @property
    def auxiliary(self) -> bool:
        """A per-module setting (alpha, DoRA magnitude, OFT rescale) rather than a factor of one adapter."""
        return self.part in AUXILIARY_PARTS


def _normalise(key: str) -> str:
    """diffusers' own conversion of old spellings (``.processor.``, ``to_k_lora.down``, ``lora.down``)."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    return next(iter(convert_unet_state_dict_to_peft({key: None})))


def _spelling(key: str, normalised: str) -> str:
    if key.startswith("lora_"):
        return "kohya"
    if re.search(r"[._]to_(q|k|v|out)_lora\.", key):
        return "diffusers-old"
    if ".lora.down." in key or ".lora.up." in key:
        return "diffusers"
    if ".lora_A" in normalised or ".lora_B" in normalised or ".lora_magnitude_vector" in normalised:
        return "peft"
    return "lycoris"


def module_key(name: str) -> str | None:
    """A module path in any spelling as kohya's key (``lora_unet_...`` / ``lora_te1_...``); None if not a name."""
    for prefix, ours in _TE_PREFIXES:
        if name.startswith(prefix):
            rest = name[len(prefix):]
            return ours + rest.replace(".", "_") if rest and _MODULE_TEXT.fullmatch(rest) else None
    rest = name
    stripped = True
    while stripped:
        stripped = False
        for prefix in _DENOISER_PREFIXES:
            if rest.startswith(prefix):
                rest, stripped = rest[len(prefix):], True
    if not rest or not _MODULE_TEXT.fullmatch(rest):
        return None
    return "lora_unet_" + rest.replace(".", "_")


def parse_key(key: str) -> KeyInfo | None:
    """(module, part) of a tensor name, or None when the name is not understood."""
    if not isinstance(key, str) or not key or len(key) > 1000:
        return None
    normalised = _normalise(key)
    for pattern, part in _PART_PATTERNS:
        m = pattern.search(normalised)
        if m is None:
            continue
        module = module_key(normalised[:m.start()])
        if module is None:
            return None
        return KeyInfo(key, module, part or m.group(1), _spelling(key, normalised))
    return None


def is_text_encoder(module: str) -> bool:
    return module.startswith("lora_te")


def is_dit(modules: list[str]) -> bool:
    """Whether the modules are a Flux/SD3-style transformer's (joint/double/single blocks, context embedder)."""
    return any(_DIT_MARKERS.search(m[len("lora_unet_"):]) for m in modules if m.startswith("lora_unet_"))


def role(module: str) -> str | None:
    """The role registry's row for a denoiser module (``roles.ROLES``), or None (text-encoder layers too)."""
    if is_text_encoder(module):
        return None
    return role_of(module[len("lora_unet_"):] if module.startswith("lora_unet_") else module)
