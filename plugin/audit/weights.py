"""``concept-exclusion audit``: check any LoRA file against a trusted preset and a trusted base model.

Trust model: the verdict depends only on what the user supplies (``--preset``, ``--base``, ``--threshold``,
``--targets``, ``--clip-skip``, ``--max-sequence-length``) and on the file's tensors. The file's own basis, preset,
clip_skip, sequence length and target list are claims, shown and compared, never used to decide. Without ``--base``
the result is UNVERIFIED (exit 3); an unknown clip_skip is checked at every plausible value (1 and 2 for SD1/2;
SDXL reads the penultimate layer) and the worst counts. Verdicts and exit codes:
``audit_report``. Reading: ``lora_keys``/``lora_file``; base model: ``audit_base``; measuring:
``audit_measure``; printing: ``audit_format``; the commands: ``audit_cmd``.
"""

from __future__ import annotations

import binascii
import re
from pathlib import Path

import torch

from concept_exclusion.audit.base import clip_skips, load_base
from concept_exclusion.audit.base_model import BaseModel
from concept_exclusion.audit.behaviour.run import BehaviourOptions, audit_behaviour, check_inputs, why_not
from concept_exclusion.audit.measure import Bases, measure_file
from concept_exclusion.audit.report import AuditReport, LayerReport
from concept_exclusion.concept.embeddings import CONTEXT, POOLED, concept_rows
from concept_exclusion.concept.preset import Preset, load_preset
from concept_exclusion.concept.subspace import ConceptSubspace
from concept_exclusion.errors import AuditError
from concept_exclusion.lora.file import LoraFile, read_lora
from concept_exclusion.metadata import PREFIX, decode_basis
from concept_exclusion.model.roles import roles_in

DEFAULT_THRESHOLD = 0.01
_SHAPE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
_CLAIM_KEYS = ("preset_name", "preset_version", "preset_sha256", "clip_skip", "sequence_length", "targets", "mode",
               "version",
               "encoder", "leakage_max", "steps", "project_context", "frozen_layers", "text_encoder_trained")
_HOST_CLAIMS = ("ss_clip_skip", "ss_network_module", "ss_base_model_version", "modelspec.architecture")


def claimed_basis(metadata: dict[str, str], space: str) -> tuple[torch.Tensor | None, str]:
    """(the basis the file claims for ``space``, or None and why it is unusable); never raises."""
    text = metadata.get(PREFIX + f"basis.{space}")
    if text is None:
        return None, "none"
    m = _SHAPE.fullmatch(metadata.get(PREFIX + f"basis_shape.{space}", ""))
    if m is None or not 1 <= int(m[2]) <= int(m[1]) <= 16384:
        return None, "malformed shape"
    try:
        return decode_basis(text, (int(m[1]), int(m[2]))), ""
    except (ValueError, RuntimeError, binascii.Error) as exc:
        return None, f"malformed ({type(exc).__name__})"


def read_claims(metadata: dict[str, str]) -> dict[str, str]:
    """What the file says about its own training (raw strings, at most 300 characters each)."""
    out = {k: metadata[PREFIX + k][:300] for k in _CLAIM_KEYS if PREFIX + k in metadata}
    out.update({k: metadata[k][:300] for k in _HOST_CLAIMS if k in metadata})
    for space in (CONTEXT, POOLED):
        basis, why = claimed_basis(metadata, space)
        if basis is not None:
            out[f"basis.{space}"] = f"{basis.shape[0]}x{basis.shape[1]}"
        elif why != "none":
            out[f"basis.{space}"] = why
    return out


def _trusted_spaces(preset: Preset, base: BaseModel, skips: tuple[int, ...]) -> list[tuple[Bases, Bases]]:
    spaces = []
    for skip in skips:
        encoders = base.text_encoders(skip)
        subspace = ConceptSubspace._from_encoders(preset, encoders)
        spaces.append((subspace.bases, concept_rows(preset.concepts, encoders, preset.projection.tokens)))
    return spaces


def _compare_claims(lora: LoraFile, preset: Preset | None, spaces: list[tuple[Bases, Bases]],
                    sequence_length: int | None, notes: list[str]) -> None:
    meta = lora.metadata
    claimed_length = meta.get(PREFIX + "sequence_length", "")
    if sequence_length is not None and claimed_length.isdigit() and int(claimed_length) != sequence_length:
        notes.append(f"the file says its concept was read at T5 length {int(claimed_length)}; the audit read it at "
                     f"{sequence_length}: the concept's rows differ with the length, so audit with "
                     f"--max-sequence-length {int(claimed_length)} if the file is used at that length")
    claimed_sha = meta.get(PREFIX + "preset_sha256")
    if preset is not None and claimed_sha is not None:
        same = claimed_sha == preset.sha256
        notes.append("the file claims the trusted preset (same sha256)" if same else
                     "the file claims another preset than the trusted one (sha256 differs); the trusted one decides")
    for space in (CONTEXT, POOLED):
        basis, why = claimed_basis(meta, space)
        if why not in ("", "none"):
            notes.append(f"the file's claimed {space} basis is {why}; ignored")
        if basis is None or not spaces or space not in spaces[0][0]:
            continue
        u = spaces[0][0][space]
        if basis.shape[0] == u.shape[0]:
            outside = float(torch.linalg.matrix_norm(basis - u @ (u.T @ basis))) / max(
                float(torch.linalg.matrix_norm(basis)), 1e-300)
            notes.append(f"the file's claimed {space} basis (rank {basis.shape[1]}): {outside:.2e} of it lies outside "
                         f"the trusted span (rank {u.shape[1]})")


def _claimed_spaces(lora: LoraFile) -> list[tuple[Bases, Bases]]:
    bases = {s: b for s in (CONTEXT, POOLED) if (b := claimed_basis(lora.metadata, s)[0]) is not None}
    return [(bases, {})] if CONTEXT in bases else []


def audit_file(path: str | Path, *, preset_path: str | None = None, base: str | None = None,
               base_config: str | None = None, threshold: float = DEFAULT_THRESHOLD, targets: str | None = None,
               clip_skip: int | None = None, sequence_length: int | None = None,
               behaviour: BehaviourOptions = BehaviourOptions(enabled=False), progress: bool = False) -> AuditReport:
    """Measure every layer of a LoRA file (only a trusted preset re-encoded with a trusted base can PASS), and,
    as ``behaviour`` asks, what the file makes the trusted base produce (``behaviour.run``)."""
    lora = read_lora(path)
    preset = load_preset(preset_path) if preset_path else None
    check_inputs(behaviour, preset)
    if base is not None and preset is None:
        raise AuditError(f"--base {base}: needs --preset PRESET (the preset a file embeds is a claim, not a "
                         f"trusted input)")
    sets = (targets,) if targets else (tuple(preset.projection.targets) if preset else ("kv",))
    checked = roles_in(sets)
    notes: list[str] = []
    base_model, skips, spaces, length = None, (), [], None
    if base is not None:
        base_model = load_base(base, base_config)
        length = base_model.read_at(sequence_length)
        skips = clip_skips(base_model, clip_skip)
        spaces = _trusted_spaces(preset, base_model, skips)
    by_skip: dict[int, float] = {}
    if len(spaces) > 1:  # one measurement per clip_skip: the worst counts, and each value's maximum is reported
        runs = [measure_file(lora, base_model, [space], checked) for space in spaces]
        by_skip = {skip: max((r.share for r in run if r.checked and r.share is not None), default=0.0)
                   for skip, run in zip(skips, runs)}
        layers = [_worst(group) for group in zip(*runs)]
    else:
        layers = measure_file(lora, base_model, spaces or _claimed_spaces(lora), checked)
    if base_model is not None:
        _require_some_match(path, layers)
    else:
        notes.append("no --base: the shares shown use the basis the file claims; only --base with --preset "
                     "can verify" if _claimed_spaces(lora) else "no --base: nothing could be measured; only --base "
                     "with --preset can verify")
    _compare_claims(lora, preset, spaces, length, notes)
    if lora.text_encoder_modules:
        notes.append(f"the file changes {len(lora.text_encoder_modules)} text-encoder layer(s): the concept's "
                     f"embeddings may move, so the guarantee is approximate")
    skipped = why_not(behaviour, preset, base_model)
    behaviour_report = None if skipped else audit_behaviour(lora, preset, base_model, tuple(skips), behaviour,
                                                            progress)
    return AuditReport(
        file=str(path), layout=lora.layout, threshold=threshold, target_sets=sets, verified=base_model is not None,
        preset=None if preset is None else {"name": preset.name, "sha256": preset.sha256, "source": preset.source},
        base=None if base_model is None else {"source": base_model.source, "kind": base_model.kind},
        clip_skips=tuple(skips), sequence_length=length, layers=layers, unknown_keys=list(lora.unknown),
        claims=read_claims(lora.metadata),
        notes=notes, ranks={s: int(u.shape[1]) for s, u in sorted(spaces[0][0].items())} if spaces else {},
        by_clip_skip=by_skip, behaviour=behaviour_report, behaviour_note=skipped)


def _worst(reports: tuple[LayerReport, ...]) -> LayerReport:
    """The same layer measured at several clip_skip values: a blocking one, else the largest share."""
    blocking = [r for r in reports if r.blocking]
    if blocking:
        return blocking[0]
    return max(reports, key=lambda r: (-1.0 if r.share is None else r.share))


def _require_some_match(path: str | Path, layers: list[LayerReport]) -> None:
    denoiser = [r for r in layers if r.role != "text-encoder"]
    if denoiser and all(r.blocking.startswith("no such layer") for r in denoiser):
        raise AuditError(f"{path}: none of its {len(denoiser)} layer(s) exists in the base model (a LoRA for "
                         f"another model?)")


__all__ = ["DEFAULT_THRESHOLD", "AuditReport", "LayerReport", "audit_file", "claimed_basis", "read_claims"]
