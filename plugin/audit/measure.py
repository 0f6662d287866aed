"""Measuring what a LoRA file changes on each model layer against a concept basis.

Which layers read the text states, and what each is held against, is the role registry's
(``roles.ROLES``): for an ``exact``/``padded`` row (``attn2.to_k``/``to_v``, SDXL's pooled path, Flux/SD3
``context_embedder``/``txt_in`` and the pooled text embedder) the share is ``||dW U|| / ||dW||``; for a
``heads`` row (``attn2.to_q``/``to_out.0``) it is measured against the per-head spans of the base
sibling projection. ``dW`` is the *effective* change: the sum of every adapter the file holds
for the layer (a loader that applies them all applies the sum), and each adapter alone; the worst
share counts. Invariant: a text-reading layer whose change cannot be formed or measured gets a
``blocking`` reason, never a share of 0.
"""

from __future__ import annotations

import re

import torch

from concept_exclusion.audit.base_model import BaseModel
from concept_exclusion.audit.report import LayerReport
from concept_exclusion.concept.embeddings import CONTEXT
from concept_exclusion.lora.file import LoraFile, effective_delta
from concept_exclusion.lora.keys import is_dit, is_text_encoder, role
from concept_exclusion.model.roles import ROLES, attention_path, constrained_by_heads, head_basis, reads_text

Bases = dict[str, torch.Tensor]  # space -> orthonormal basis [d, r]
_BFL_BLOCKS = re.compile(r"^lora_unet_(double_blocks|single_blocks|joint_blocks|img_in|time_in|guidance_in|"
                         r"vector_in_out_layer|final_layer|x_embedder|t_embedder|y_embedder_mlp_2|pos_embed)(_|$)")


def _norm(x: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x)) if x.numel() else 0.0


def _ratio(part: torch.Tensor, whole: torch.Tensor) -> float:
    den = _norm(whole)
    return _norm(part) / den if den > 0 else 0.0


def _weight(base: BaseModel | None, module: str) -> torch.Tensor | None:
    """The base weight of a Linear layer (float64), or None; read only for the layers that are measured."""
    layer = base.module(module) if base is not None else None
    return base.load(layer).weight.detach().double() if isinstance(layer, torch.nn.Linear) else None


def _share(role_name: str, dw: torch.Tensor, bases: Bases, attn: torch.nn.Module | None) -> tuple[float | None, str]:
    """(share of ``dw`` on the constraint of its role, or None and why not)."""
    row = ROLES[role_name]
    u = bases.get(row.space)
    if u is None:
        return None, f"no {row.space} basis for this model"
    if row.shape == "exact":
        if dw.shape[1] != u.shape[0]:
            return None, f"reads {dw.shape[1]}-d inputs but the {row.space} basis is {u.shape[0]}-d (another model?)"
        return _ratio(dw @ u, dw), ""
    if row.shape == "padded":
        if dw.shape[1] < u.shape[0]:
            return None, f"has {dw.shape[1]} inputs, fewer than the {u.shape[0]}-d {row.space} basis"
        return _ratio(dw[:, :u.shape[0]] @ u, dw), ""
    if attn is None:
        return None, "needs the base model's attention module (per-head spans of its key/value weights)"
    sibling = getattr(attn, row.heads_of)
    if sibling.weight.shape[1] != u.shape[0]:
        return None, f"the base {row.heads_of} reads {sibling.weight.shape[1]}-d states, the basis is {u.shape[0]}-d"
    q = head_basis(sibling.weight, u, attn.heads)
    if row.side == "output":
        return (_ratio(q.T @ dw, dw), "") if dw.shape[0] == q.shape[0] else (None, "delta does not fit the heads")
    return (_ratio(dw @ q, dw), "") if dw.shape[1] == q.shape[0] else (None, "delta does not fit the heads")


def frozen_heads(attn: torch.nn.Module, role_name: str, context: torch.Tensor, rtol: float = 1e-6) -> int:
    """How many heads of a query/out layer the constraint leaves no freedom (the basis spans the whole head)."""
    w = getattr(attn, ROLES[role_name].heads_of).weight.detach().double()
    dh = w.shape[0] // attn.heads
    count = 0
    for h in range(attn.heads):
        s = torch.linalg.svdvals(w[h * dh:(h + 1) * dh] @ context)
        if s.numel() and float(s.max()) > 0 and int((s > s.max() * rtol).sum()) >= dh:
            count += 1
    return count


def _concept_change(role_name: str, dw: torch.Tensor, w0: torch.Tensor | None, rows: Bases) -> float | None:
    """||dW c|| / ||W0 c|| over the concept's rows c, for a layer that reads them (exact or padded rows)."""
    row = ROLES[role_name]
    c = rows.get(row.space)
    if w0 is None or w0.shape != dw.shape or c is None or row.shape == "heads" or c.shape[1] > dw.shape[1]:
        return None
    if row.shape == "exact" and c.shape[1] != dw.shape[1]:
        return None
    k = c.shape[1]
    return _ratio(c @ dw[:, :k].T, c @ w0[:, :k].T)


def measure_file(lora: LoraFile, base: BaseModel | None, spaces: list[tuple[Bases, Bases]],
                 checked_roles: set[str]) -> list[LayerReport]:
    """One report per module the file changes. ``spaces``: (bases, concept rows) per clip_skip checked;
    ``checked_roles``: the query/out roles that count toward the verdict (text readers always count)."""
    dit = is_dit(lora.modules()) and (base is None or base.layers_per_block is None)
    by_module: dict[str, list] = {}
    for adapter in lora.adapters:
        by_module.setdefault(adapter.module, []).append(adapter)
    reports = []
    for module in lora.modules():
        adapters = by_module.get(module, [])
        if is_text_encoder(module):
            reports.append(LayerReport(module, "text-encoder", [a.spelling for a in adapters],
                                       note="a text-encoder layer: the concept's embeddings themselves may move"))
            continue
        role_name = role(module)
        reports.append(_measure_module(lora, module, role_name, adapters, base, spaces, checked_roles, dit))
    return reports


def _measure_module(lora: LoraFile, module: str, role_name: str | None, adapters: list, base: BaseModel | None,
                    spaces: list[tuple[Bases, Bases]], checked_roles: set[str], dit: bool) -> LayerReport:
    found = base is not None and base.module(module) is not None
    text = reads_text(role_name)
    attention = constrained_by_heads(role_name)
    report = LayerReport(module, role_name or "elsewhere", [],
                         checked=text or (attention and role_name in checked_roles))
    if base is not None and not found:
        if dit and not text and _BFL_BLOCKS.search(module):
            report.kinds = sorted({a.spelling for a in adapters})
            report.note = "a Flux/SD3 block under its BFL/SAI name (does not read the text encoders' output)"
            return report
        report.blocking = "no such layer in the base model: what it changes cannot be placed"
        return report
    if not adapters:
        report.kinds = ["settings only"]
        if text:
            report.blocking = "holds settings (alpha, DoRA magnitude) but no factors: not understood"
        return report
    if not (text or attention):
        report.kinds = sorted({a.spelling for a in adapters})
        return report  # a layer that does not read the text states: listed, not measured
    w0 = _weight(base, module)
    formed = [effective_delta(lora, a, w0) for a in adapters]
    report.kinds = [f.kind for f in formed]
    missing = [f.reason for f in formed if f.delta is None and f.kind != "bias"]
    if len(adapters) > 1:
        report.note = f"{len(adapters)} adapters in different spellings ({', '.join(a.spelling for a in adapters)}): " \
                      f"their sum and each alone measured"
    if missing:
        if report.checked:
            report.blocking = "; ".join(missing)
        else:
            report.note = "; ".join(missing)
        return report
    deltas = [f.delta for f in formed if f.delta is not None]
    if not deltas:
        report.note = "changes only biases"
        return report
    if len(deltas) > 1 and any(d.shape != deltas[0].shape for d in deltas):
        report.blocking = "adapters of different shapes on one layer"
        return report
    candidates = ([sum(deltas)] if len(deltas) > 1 else []) + deltas
    attn = base.module(attention_path(role_name, module)) if (attention and base is not None) else None
    shares, changes, reasons = [], [], []
    for bases, rows in spaces:
        for dw in candidates:
            share, why = _share(role_name, dw, bases, attn)
            if share is None:
                reasons.append(why)
            else:
                shares.append(share)
            change = _concept_change(role_name, dw, w0, rows)
            if change is not None:
                changes.append(change)
    if reasons:
        if report.checked:
            report.blocking = reasons[0]
        else:
            report.note = reasons[0]
        return report
    report.share = max(shares, default=None)
    report.concept_change = max(changes, default=None)
    if attention and attn is not None and spaces and CONTEXT in spaces[0][0]:
        frozen = frozen_heads(attn, role_name, spaces[0][0][CONTEXT])
        if frozen:
            report.note = (report.note + "; " if report.note else "") + \
                f"{frozen} of {attn.heads} heads frozen by the constraint (the basis spans the whole head)"
    return report
