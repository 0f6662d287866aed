"""SDXL's two names for one UNet layer: diffusers' module path and the Stability (SAI/sgm) path kohya uses.

Blocks are numbered as diffusers' ``_maybe_map_sgm_blocks_to_diffusers`` numbers them, with L layers per
block (up blocks hold L + 1): down block i, layer j <-> input block i(L+1)+j+1; the mid attention <->
middle block 1; up block i, layer j <-> output block i(L+1)+j. ``sep`` is the separator of the path's
parts: "." for module paths, "_" for kohya key names (``lora_unet_`` stripped).

Invariant: ``sai_to_diffusers(diffusers_to_sai(p, L, sep), L, sep) == p`` for every attention-block path;
other paths are returned unchanged, except that ``sai_to_diffusers`` also maps SDXL's pooled projection
(``label_emb.0.0`` -> ``add_embedding.linear_1``) so that a kohya file's pooled layer is found.
"""

from __future__ import annotations

import re


def _patterns(sep: str) -> tuple[re.Pattern, ...]:
    s = re.escape(sep)
    return (re.compile(rf"^down_blocks{s}(\d+){s}attentions{s}(\d+){s}(.*)$"),
            re.compile(rf"^mid_block{s}attentions{s}0{s}(.*)$"),
            re.compile(rf"^up_blocks{s}(\d+){s}attentions{s}(\d+){s}(.*)$"),
            re.compile(rf"^input_blocks{s}(\d+){s}1{s}(.*)$"),
            re.compile(rf"^middle_block{s}1{s}(.*)$"),
            re.compile(rf"^output_blocks{s}(\d+){s}1{s}(.*)$"))


_PATTERNS = {sep: _patterns(sep) for sep in (".", "_")}


def diffusers_to_sai(path: str, layers_per_block: int, sep: str = ".") -> str:
    """The Stability path of a diffusers attention-block path (other paths unchanged)."""
    down, mid, up, _, _, _ = _PATTERNS[sep]
    step = layers_per_block + 1
    if m := down.match(path):
        return sep.join(("input_blocks", str(int(m[1]) * step + int(m[2]) + 1), "1", m[3]))
    if m := mid.match(path):
        return sep.join(("middle_block", "1", m[1]))
    if m := up.match(path):
        return sep.join(("output_blocks", str(int(m[1]) * step + int(m[2])), "1", m[3]))
    return path


def sai_to_diffusers(path: str, layers_per_block: int, sep: str = ".") -> str:
    """The diffusers path of a Stability attention-block path or of the pooled projection (others unchanged)."""
    _, _, _, inp, middle, out = _PATTERNS[sep]
    step = layers_per_block + 1
    if m := inp.match(path):
        n = int(m[1])
        return sep.join(("down_blocks", str((n - 1) // step), "attentions", str((n - 1) % step), m[2]))
    if m := middle.match(path):
        return sep.join(("mid_block", "attentions", "0", m[1]))
    if m := out.match(path):
        n = int(m[1])
        return sep.join(("up_blocks", str(n // step), "attentions", str(n % step), m[2]))
    if path == sep.join(("label_emb", "0", "0")):
        return sep.join(("add_embedding", "linear_1"))
    return path
