"""The registry of layer roles: which layers read the text encoder's output, and what each is held against.

One ``Role`` row per kind of layer. A row says which module names it matches (diffusers module
paths, kohya ``lora_unet_`` names with ``_`` for ``.``, SAI/SDXL paths), which basis space it takes
(``context`` or ``pooled``), on which side its constraint sits, how that basis is shaped for the
layer, whether its input *is* the text states (context projection hooks exactly those), and
which target sets include it. Target finding (``targets``), context projection (``context``),
re-encoding (``exclusion``) and the audit all read this table, so adding an architecture is
adding rows to ``ROLES`` (or calling ``add_role``).

Invariants: a name matches at most one row; ``basis_for`` returns a float64 basis with
orthonormal columns whose row count is the layer's constrained dimension (``in_features`` for
input side, ``out_features`` for output side).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from concept_exclusion.concept.encoders import CONTEXT, POOLED
from concept_exclusion.errors import SubspaceError, TargetError

SIDES = ("input", "output")
# how a row's basis is shaped for one layer:
#   exact   the space's basis as it is; the layer's input width must equal the basis width
#   padded  the space's basis on the first input columns, zeros after (SDXL: the time-id columns)
#   heads   per attention head, the span of the sibling projection's base weight times the context basis
SHAPES = ("exact", "padded", "heads")


@dataclass(frozen=True)
class Role:
    """One row of the registry.

    ``pattern`` is searched in a canonical module name (``canonical_name``); for ``heads`` rows it
    must match only the layer's own suffix (``(?<=attn2)[._]to_q$``), because removing the match
    gives the attention module's path. ``heads_of`` names the sibling projection (``to_k``) whose
    per-head span of the context basis is the basis. ``reads_text``: the layer's input is the text
    states (or the pooled text embedding) themselves.
    """

    name: str
    pattern: re.Pattern[str]
    space: str
    side: str
    shape: str
    reads_text: bool
    sets: tuple[str, ...]
    label: str
    heads_of: str | None = None

    def __post_init__(self) -> None:
        if self.side not in SIDES or self.shape not in SHAPES or self.space not in (CONTEXT, POOLED):
            raise TargetError(f"role {self.name!r}: side/shape/space must be in {SIDES}/{SHAPES}/"
                              f"{(CONTEXT, POOLED)}, got {self.side!r}/{self.shape!r}/{self.space!r}")
        if (self.shape == "heads") != (self.heads_of is not None):
            raise TargetError(f"role {self.name!r}: heads_of is needed exactly when shape is 'heads'")


def _p(regex: str) -> re.Pattern[str]:
    return re.compile(regex)


# SD3.5's ``transformer_blocks.N.attn2`` (dual attention) is image self-attention at the transformer's root, not a
# text reader: the UNet rows skip it (a look-ahead for key/value, fixed-width look-behinds for the ``heads`` rows,
# whose pattern must match only the layer's own suffix)
_NOT_SD3 = r"^(?!transformer_blocks[._])"
_SD3_ATTN2_BEHIND = r"(?<!^transformer_blocks.\d.attn2)(?<!^transformer_blocks.\d\d.attn2)"

# Order matters only for error messages; no name matches two rows.
ROLES: dict[str, Role] = {r.name: r for r in (
    # UNet cross-attention (SD1/2 and SDXL; diffusers, kohya and SAI names all end in attn2[._]to_*)
    Role("key", _p(_NOT_SD3 + r".*attn2[._]to_k$"), CONTEXT, "input", "exact", True,
         ("kv", "attention"), "attn2.to_k"),
    Role("value", _p(_NOT_SD3 + r".*attn2[._]to_v$"), CONTEXT, "input", "exact", True,
         ("kv", "attention"), "attn2.to_v"),
    # SDXL's pooled path: the pooled text embedding fills the first columns of add_embedding's input
    Role("pooled", _p(r"(add_embedding[._]linear_1|label_emb[._]0[._]0)$"), POOLED, "input", "padded", True,
         ("kv", "attention"), "add_embedding.linear_1"),
    Role("query", _p(r"(?<=attn2)" + _SD3_ATTN2_BEHIND + r"[._]to_q$"), CONTEXT, "output", "heads", False,
         ("attention",), "attn2.to_q", heads_of="to_k"),
    Role("out", _p(r"(?<=attn2)" + _SD3_ATTN2_BEHIND + r"[._]to_out[._]0$"), CONTEXT, "input", "heads", False,
         ("attention",), "attn2.to_out.0", heads_of="to_v"),
    # MMDiT (Flux, SD3/3.5): only the entrance reads the encoders. diffusers ``context_embedder`` (Flux: T5; SD3:
    # CLIP-L ++ CLIP-G zero-padded to T5's width, then T5), sd-scripts Flux ``txt_in``, SD3 ``context_embedder``
    Role("joint_context", _p(r"(^|[._])(context_embedder|txt_in)$"), CONTEXT, "input", "exact", True,
         ("kv", "attention"), "context_embedder / txt_in"),
    # the pooled CLIP vector: diffusers time_text_embed.text_embedder.linear_1, sd-scripts Flux vector_in.in_layer,
    # sd-scripts SD3 y_embedder.mlp.0
    Role("joint_pooled", _p(r"(time_text_embed[._]text_embedder[._]linear_1|vector_in[._]in_layer|"
                             r"y_embedder[._]mlp[._]0)$"), POOLED, "input", "exact", True, ("kv", "attention"),
         "time_text_embed.text_embedder.linear_1 / vector_in.in_layer"),
)}

# the MMDiT entrances (Flux, SD3): the only layers of those models that read the text encoders
MMDIT_ROLES = ("joint_context", "joint_pooled")

_WRAPPER_PARTS = {"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}


def add_role(role: Role) -> None:
    """Register one more row (a new architecture's text reader); a name already present is an error."""
    if role.name in ROLES:
        raise TargetError(f"role {role.name!r} is already registered")
    ROLES[role.name] = role


def canonical_name(name: str) -> str:
    """Module path without training wrappers (DDP/compile/FSDP ``module.`` parts, PEFT ``base_model.model.``)."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS]
    text = ".".join(parts)
    while text.startswith("base_model.model."):
        text = text[len("base_model.model."):]
    return text


def role_of(name: str) -> str | None:
    """The role whose pattern matches the (canonical or kohya) module name, or None."""
    for role in ROLES.values():
        if role.pattern.search(name):
            return role.name
    return None


def reads_text(role: str | None) -> bool:
    """Whether a layer of ``role`` takes the text states (or pooled embedding) as its input (None: no role)."""
    return role is not None and ROLES[role].reads_text


def constrained_by_heads(role: str | None) -> bool:
    """Whether the role's constraint is the per-head span of a sibling projection (attn2 query/out)."""
    return role is not None and ROLES[role].shape == "heads"


def target_sets() -> tuple[str, ...]:
    """Every target-set name some row belongs to, in first-seen order."""
    seen: dict[str, None] = {}
    for role in ROLES.values():
        seen.update(dict.fromkeys(role.sets))
    return tuple(seen)


def roles_in(sets: tuple[str, ...] | list[str]) -> set[str]:
    """Role names the target sets include; an unknown set is a ``TargetError``."""
    known = target_sets()
    for s in sets:
        if s not in known:
            raise TargetError(f"unknown target set {s!r} (known: {', '.join(known)})")
    return {r.name for r in ROLES.values() if set(r.sets) & set(sets)}


def attention_path(role: str, name: str) -> str:
    """The attention module a ``heads`` layer belongs to: its name without the row's own suffix."""
    return ROLES[role].pattern.sub("", name)


def head_basis(weight: torch.Tensor, basis: torch.Tensor, heads: int, rtol: float = 1e-6) -> torch.Tensor:
    """Block-diagonal orthonormal basis of span(W_h @ U) per head h: [out, sum of per-head ranks], float64."""
    w = weight.detach().double().cpu()
    out_dim = w.shape[0]
    if out_dim % heads:
        raise TargetError(f"output dimension {out_dim} is not divisible by {heads} heads")
    dh = out_dim // heads
    blocks = []
    for h in range(heads):
        m = w[h * dh:(h + 1) * dh] @ basis
        u, s, _ = torch.linalg.svd(m, full_matrices=False)
        keep = int((s > s.max().clamp_min(1e-300) * rtol).sum()) if s.numel() and float(s.max()) > 0 else 0
        block = torch.zeros(out_dim, keep, dtype=torch.float64)
        # a head whose whole space is constrained gets the identity: (I - Q Q^T) x is then exactly 0
        block[h * dh:(h + 1) * dh] = torch.eye(dh, dtype=torch.float64) if keep == dh else u[:, :keep]
        blocks.append(block)
    return torch.cat(blocks, dim=1)


def base_weight(linear: nn.Module) -> torch.Tensor:
    """The weight a (possibly PEFT-wrapped) Linear applies before any adapter."""
    inner = getattr(linear, "base_layer", linear)
    return inner.weight.detach()


AttentionLookup = Mapping[str, nn.Module] | Callable[[str], "nn.Module | None"]


def basis_for(role: str, name: str, bases: Mapping[str, torch.Tensor], in_features: int,
              attention: AttentionLookup | None = None) -> tuple[str, torch.Tensor]:
    """(side, basis) a layer of ``role`` named ``name`` is constrained against.

    ``bases``: the subspace's bases by space (``subspace.bases``). ``attention``: the attention
    modules by path (a mapping or a lookup function), needed for ``heads`` rows only.
    """
    row = ROLES[role]
    if row.space not in bases:
        raise SubspaceError(f"{name}: needs a {row.space!r} basis, the subspace has {', '.join(bases)}")
    u = bases[row.space]
    if row.shape == "exact":
        if in_features != u.shape[0]:
            raise SubspaceError(f"{name}: reads {in_features}-d text embeddings but the concept basis is "
                                f"{u.shape[0]}-d; build the subspace with this model's own text encoder(s)")
        return row.side, u
    if row.shape == "padded":
        if in_features < u.shape[0]:
            raise SubspaceError(f"{name}: has {in_features} inputs, fewer than the {u.shape[0]}-d {row.space} basis")
        padded = torch.zeros(in_features, u.shape[1], dtype=torch.float64)
        padded[:u.shape[0]] = u
        return row.side, padded
    path = attention_path(role, name)
    lookup = attention.get if isinstance(attention, Mapping) else attention
    attn = lookup(path) if lookup is not None else None
    if attn is None:
        raise TargetError(f"{name}: the 'attention' target set needs the attention module {path!r} "
                          f"(pass base_model= the UNet that the LoRA network patches)")
    w = base_weight(getattr(attn, row.heads_of))
    if w.shape[1] != u.shape[0]:
        raise SubspaceError(f"{path}.{row.heads_of} reads {w.shape[1]}-d text embeddings but the concept "
                            f"basis is {u.shape[0]}-d")
    return row.side, head_basis(w, u, attn.heads)
