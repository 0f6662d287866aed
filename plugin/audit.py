"""``concept-exclusion audit`` and ``inspect``: check any LoRA file for what it learned about a concept.

The audit reads a LoRA (kohya ``lora_down``/``lora_up``/``alpha``, diffusers ``lora.down``/``lora.up``
or ``unet.*.lora_A``, PEFT ``lora_A``/``lora_B``; LyCORIS LoHa/LoKr/full ``diff`` too) with
safetensors only, forms each layer's delta ``dW`` (scale * up @ down, scale = alpha / rank from the
file) and reports, for every layer that reads the text embeddings, the share of the delta that acts
on the concept subspace: ``||dW U|| / ||dW||`` (keys, values, SDXL's pooled path; with the base
model also queries/outputs against their per-head spans). With ``--base`` it also reports how much
the concept's own keys/values change: ``||dW c|| / ||W0 c||`` over the concept's embeddings c.

The basis is recomputed from the base model's text encoder(s) when ``--base`` is given, else taken
from the file's embedded basis (files written by this project carry one). Exit codes: 0 every
checked layer at or under ``--threshold``; 1 a layer over it; 2 unusable input (one line).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .embeddings import CONTEXT, POOLED, TextEncoders, concept_rows
from .errors import AuditError, ModelFolderError
from .metadata import PREFIX, read_basis, read_provenance
from .model_folder import load_text_encoders
from .preset import Preset, load_preset, parse_preset
from .safeio import read_header
from .subspace import ConceptSubspace
from .targets import head_basis, role_of

from .lora_file import LoraLayer, layer_key, layout_of, read_lora, sgm_to_diffusers

DEFAULT_THRESHOLD = 0.01


# the base model --------------------------------------------------------------------------------------
@dataclass
class BaseModel:
    encoders: TextEncoders
    unet: torch.nn.Module
    modules: dict[str, torch.nn.Module]  # kohya-style key -> module
    layers_per_block: int

    def module(self, name: str) -> torch.nn.Module | None:
        key = layer_key(name)
        return self.modules.get(key) or self.modules.get(sgm_to_diffusers(key, self.layers_per_block))


def load_base(folder: str | Path, clip_skip: int | None) -> BaseModel:
    """Tokenizer(s), text encoder(s) and UNet of a local diffusers model folder (no download)."""
    from diffusers import UNet2DConditionModel

    root = Path(folder)
    if not (root / "text_encoder").is_dir() or not (root / "tokenizer").is_dir() or not (root / "unet").is_dir():
        raise AuditError(f"--base {root}: not a diffusers model folder (needs tokenizer/, text_encoder/ and unet/)")
    try:
        toks, encs = load_text_encoders(root, local_files_only=True)
        unet = UNet2DConditionModel.from_pretrained(str(root / "unet"), local_files_only=True)
    except ModelFolderError as exc:
        raise AuditError(f"--base {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any loader failure is unusable input, reported in one line
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AuditError(f"--base {root}: cannot load the model ({first})") from None
    unet = unet.eval().requires_grad_(False)
    modules = {"lora_unet_" + n.replace(".", "_"): m for n, m in unet.named_modules() if n}
    lpb = unet.config.layers_per_block
    lpb = lpb[0] if isinstance(lpb, (list, tuple)) else lpb
    return BaseModel(TextEncoders(toks, encs, clip_skip, dual=len(encs) == 2), unet, modules, int(lpb))


# the audit ------------------------------------------------------------------------------------------------
@dataclass
class LayerReport:
    name: str
    role: str
    share: float | None  # ||constraint part of dW|| / ||dW||; None when not measurable
    concept_change: float | None  # ||dW c|| / ||W0 c|| (with --base)
    checked: bool
    note: str = ""

    def over(self, threshold: float) -> bool:
        return self.checked and self.share is not None and self.share > threshold


@dataclass
class AuditReport:
    file: str
    layout: str
    basis_source: str
    ranks: dict[str, int]
    threshold: float
    target_sets: tuple[str, ...]
    layers: list[LayerReport]
    notes: list[str]
    provenance: dict[str, Any]

    @property
    def flagged(self) -> list[LayerReport]:
        return [r for r in self.layers if r.over(self.threshold)]

    @property
    def max_share(self) -> float:
        return max((r.share for r in self.layers if r.checked and r.share is not None), default=0.0)

    @property
    def passed(self) -> bool:
        return not self.flagged

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file, "layout": self.layout, "basis_source": self.basis_source, "ranks": self.ranks,
            "threshold": self.threshold, "target_sets": list(self.target_sets), "passed": self.passed,
            "max_share": self.max_share, "flagged": [r.name for r in self.flagged], "notes": self.notes,
            "provenance": self.provenance,
            "layers": [{"name": r.name, "role": r.role, "share": r.share, "concept_change": r.concept_change,
                        "checked": r.checked, "over": r.over(self.threshold), "note": r.note} for r in self.layers],
        }


def _norm(x: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x)) if x.numel() else 0.0


def _ratio(part: torch.Tensor, whole: torch.Tensor) -> float:
    den = _norm(whole)
    return _norm(part) / den if den > 0 else 0.0


def audit_file(path: str | Path, *, preset_path: str | None = None, base: str | None = None,
               threshold: float = DEFAULT_THRESHOLD, targets: str | None = None,
               clip_skip: int | None = None) -> AuditReport:
    """Measure every text-reading layer of a LoRA file against the concept subspace."""
    lora = read_lora(path)
    meta = lora.metadata
    provenance = read_provenance(meta, source=str(path))
    notes = list(lora.notes)
    sets = (targets,) if targets else tuple(provenance.get("targets") or ("kv",))
    if clip_skip is None:
        recorded = meta.get(PREFIX + "clip_skip") or meta.get("ss_clip_skip") or ""
        clip_skip = int(recorded) if recorded.isdigit() else None

    preset: Preset | None = None
    if preset_path:
        preset = load_preset(preset_path)
    elif meta.get(PREFIX + "preset_toml"):
        preset = parse_preset(meta[PREFIX + "preset_toml"], source=f"{path}:{PREFIX}preset_toml")

    base_model: BaseModel | None = None
    rows: dict[str, torch.Tensor] = {}
    if base is not None:
        if preset is None:
            raise AuditError(f"--base {base}: needs the concept's preset to recompute the basis; pass --preset "
                             f"(the file embeds none)")
        base_model = load_base(base, clip_skip)
        subspace = ConceptSubspace._from_encoders(preset, base_model.encoders)
        rows = concept_rows(preset.concepts, base_model.encoders, preset.projection.tokens)
        source = "recomputed from the base model's text encoder(s)"
        for space, u in subspace.bases.items():
            embedded = read_basis(meta, space, str(path))
            if embedded is not None and embedded.shape[0] == u.shape[0]:
                outside = _norm(embedded - u @ (u.T @ embedded)) / max(_norm(embedded), 1e-300)
                notes.append(f"embedded {space} basis (rank {embedded.shape[1]}) vs recomputed (rank {u.shape[1]}): "
                             f"{outside:.2e} of it lies outside the recomputed span")
        bases = subspace.bases
    else:
        bases = {s: b for s in (CONTEXT, POOLED) if (b := read_basis(meta, s, str(path))) is not None}
        if CONTEXT not in bases:
            raise AuditError(f"{path}: the file embeds no concept basis; pass --base MODEL (a local diffusers "
                             f"folder) and --preset PRESET to recompute it")
        source = "taken from the file"
        if preset_path:
            notes.append("--preset without --base: the basis is still the file's (recomputing needs the encoder)")

    reports = [_measure(layer, role_of(layer_key(layer.name)), bases, rows, base_model, sets)
               for layer in lora.layers]
    te_layers = lora.text_encoder_layers
    if "attention" in sets and base_model is None and any(r.role in ("query", "out") for r in reports):
        notes.append("the 'attention' target set's query/output layers are checked only with --base "
                     "(their constraint depends on the base key/value weights)")
    if te_layers:
        notes.append(f"the file also changes {te_layers} text-encoder layer(s): the concept's embeddings themselves "
                     f"may move; this audit does not measure that")
    if not reports:
        notes.append("no layer in the file reads the text embeddings (no cross-attention or pooled-path LoRA)")
    return AuditReport(str(path), lora.layout, source, {s: int(b.shape[1]) for s, b in sorted(bases.items())},
                       threshold, sets, reports, notes, provenance)


def _measure(layer: LoraLayer, role: str, bases: dict[str, torch.Tensor], rows: dict[str, torch.Tensor],
             base_model: BaseModel | None, sets: tuple[str, ...]) -> LayerReport:
    dw = layer.delta
    context = bases[CONTEXT]
    module = base_model.module(layer.name) if base_model is not None else None
    w0 = module.weight.detach().double() if isinstance(module, torch.nn.Linear) else None
    if w0 is not None and w0.shape != dw.shape:
        return LayerReport(layer.name, role, None, None, False,
                           f"delta {list(dw.shape)} does not match the base weight {list(w0.shape)}")
    if base_model is not None and w0 is None:
        note_missing = "no matching layer in the base model"
    else:
        note_missing = ""
    if role in ("key", "value"):
        if dw.shape[1] != context.shape[0]:
            raise AuditError(f"{layer.name}: reads {dw.shape[1]}-d text embeddings but the basis is "
                             f"{context.shape[0]}-d (a basis for another model)")
        change = None
        if w0 is not None and CONTEXT in rows:
            c = rows[CONTEXT]
            change = _ratio(c @ dw.T, c @ w0.T)
        return LayerReport(layer.name, role, _ratio(dw @ context, dw), change, True, note_missing)
    if role == "pooled":
        if POOLED not in bases:
            return LayerReport(layer.name, role, None, None, False, "no pooled basis (SD1/SD2 file or basis)")
        u = bases[POOLED]
        if dw.shape[1] < u.shape[0]:
            raise AuditError(f"{layer.name}: has {dw.shape[1]} inputs, fewer than the {u.shape[0]}-d pooled basis")
        part = dw[:, :u.shape[0]] @ u
        change = None
        if w0 is not None and POOLED in rows:
            c = rows[POOLED]
            change = _ratio(c @ dw[:, :u.shape[0]].T, c @ w0[:, :u.shape[0]].T)
        return LayerReport(layer.name, role, _ratio(part, dw), change, True, note_missing)
    # query / out: their constraint depends on the base key/value weights, per head
    checked = "attention" in sets
    if base_model is None:
        return LayerReport(layer.name, role, None, None, False, "needs --base (per-head spans of the base weights)")
    path = re.sub(r"_to_(q|out_0)$", "", layer_key(layer.name))
    attn = base_model.module(path)
    if attn is None or not hasattr(attn, "to_k"):
        return LayerReport(layer.name, role, None, None, False, "no matching attention module in the base model")
    if role == "query":
        q = head_basis(attn.to_k.weight, context, attn.heads)
        return LayerReport(layer.name, role, _ratio(q.T @ dw, dw), None, checked)
    q = head_basis(attn.to_v.weight, context, attn.heads)
    return LayerReport(layer.name, role, _ratio(dw @ q, dw), None, checked)


# presentation ------------------------------------------------------------------------------------------
def format_report(report: AuditReport) -> str:
    lines = [f"file:      {report.file}", f"layout:    {report.layout}",
             f"basis:     {report.basis_source} (rank {', '.join(f'{s} {r}' for s, r in report.ranks.items())})",
             f"targets:   {', '.join(report.target_sets)}   threshold: {report.threshold:g}"]
    prov = report.provenance
    if prov:
        lines.append(f"provenance: trained with concept-exclusion {prov.get('version', '?')}, preset "
                     f"{prov.get('preset_name', '?')}, mode {prov.get('mode', '?')}, leakage at save "
                     f"{prov.get('leakage_max', '?')}")
    lines.append("")
    width = max([len(r.name) for r in report.layers] + [5])
    lines.append(f"{'layer':<{width}}  {'role':<6}  {'|dW U|/|dW|':>12}  {'|dW c|/|W0 c|':>14}  status")
    for r in report.layers:
        share = "-" if r.share is None else f"{r.share:.3e}"
        change = "-" if r.concept_change is None else f"{r.concept_change:.3e}"
        status = "OVER" if r.over(report.threshold) else ("ok" if r.checked and r.share is not None else "info")
        lines.append(f"{r.name:<{width}}  {r.role:<6}  {share:>12}  {change:>14}  {status}"
                     + (f"  ({r.note})" if r.note else ""))
    lines.append("")
    for n in report.notes:
        lines.append(f"note: {n}")
    flagged = report.flagged
    checked = sum(1 for r in report.layers if r.checked and r.share is not None)
    if flagged:
        lines.append(f"FLAGGED: {len(flagged)} of {checked} checked layer(s) put more than {report.threshold:g} of "
                     f"their change on the concept subspace (max {report.max_share:.3e})")
    else:
        lines.append(f"PASS: {checked} checked layer(s), max share on the concept subspace {report.max_share:.3e} "
                     f"<= {report.threshold:g}")
    return "\n".join(lines)


def _threshold(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return v


def register_audit(subparsers) -> None:
    p = subparsers.add_parser(
        "audit", help="check a LoRA file for changes that act on a concept",
        description="Report per layer the share of a LoRA's change that acts on the concept subspace "
                    "(||dW U||/||dW||) and, with --base, how much the concept's keys/values change "
                    "(||dW c||/||W0 c||). Exit 0 pass, 1 a layer over --threshold, 2 unusable input.")
    p.add_argument("lora", help="LoRA .safetensors (kohya, diffusers or PEFT layout)")
    p.add_argument("--preset", help="concept preset (.toml or shipped name); default: the one embedded in the file")
    p.add_argument("--base", help="local diffusers model folder: recompute the basis with its text encoder(s)")
    p.add_argument("--threshold", type=_threshold, default=DEFAULT_THRESHOLD,
                   help=f"largest allowed share per layer (default {DEFAULT_THRESHOLD})")
    p.add_argument("--targets", choices=("kv", "attention"),
                   help="which layers must pass: kv (keys, values, pooled) or attention (also queries/outputs, "
                        "needs --base); default: what the file records, else kv")
    p.add_argument("--clip-skip", type=int, help="clip_skip for recomputing (default: what the file records)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_run_audit)


def _run_audit(args) -> int:
    report = audit_file(args.lora, preset_path=args.preset, base=args.base, threshold=args.threshold,
                        targets=args.targets, clip_skip=args.clip_skip)
    print(json.dumps(report.to_json(), indent=2) if args.json else format_report(report))
    return 0 if report.passed else 1


def register_inspect(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="print a safetensors file's metadata readably",
                              description="Print the concept-exclusion provenance and the host trainer's "
                                          "metadata of a safetensors file (reads the header only).")
    p.add_argument("file", help=".safetensors file")
    p.add_argument("--json", action="store_true", help="print as JSON (basis blobs summarised)")
    p.set_defaults(func=_run_inspect)


def inspect_file(path: str | Path) -> dict[str, Any]:
    header, meta = read_header(path)
    prov = read_provenance(meta, source=str(path))
    host = {k: v for k, v in sorted(meta.items()) if not k.startswith(PREFIX)}
    return {"file": str(path), "tensors": len(header), "layout": layout_of(sorted(header)), "concept_exclusion": prov,
            "host": host}


def _short(value: str, limit: int = 120) -> str:
    value = value.replace("\n", "\\n")
    return value if len(value) <= limit else value[:limit] + f"... ({len(value)} chars)"


def _run_inspect(args) -> int:
    info = inspect_file(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    out = [f"file:    {info['file']}", f"tensors: {info['tensors']} ({info['layout']} layout)", ""]
    prov = dict(info["concept_exclusion"])
    if prov:
        toml = prov.pop("preset_toml", None)
        out.append("concept-exclusion provenance:")
        for k, v in prov.items():
            shown = (v or "-") if isinstance(v, str) else json.dumps(v)
            out.append(f"  {k:<16} {_short(shown)}")
        if toml:
            out.append("  preset TOML:")
            out.extend("    " + line for line in toml.rstrip().splitlines())
    else:
        out.append("concept-exclusion provenance: none (not written by concept-exclusion)")
    out.append("")
    out.append(f"other metadata ({len(info['host'])} keys):")
    for k, v in info["host"].items():
        out.append(f"  {k}: {_short(v)}")
    print("\n".join(out))
    return 0


__all__ = ["AuditReport", "LayerReport", "audit_file", "format_report", "inspect_file", "load_base", "register_audit",
           "register_inspect"]
