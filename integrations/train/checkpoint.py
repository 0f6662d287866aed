"""``concept-exclusion train`` checkpoints: one safetensors file per checkpoint, and resuming from it.

Invariants: a checkpoint holds the trainable LoRA tensors, the AdamW state (tensors + JSON param
groups), the exclusion's state and the run's trajectory settings; it is written atomically and read
back without unpickling, and it only resumes a run with the same trajectory and data folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from concept_exclusion._version import __version__
from concept_exclusion.concept.preset import load_preset
from concept_exclusion.errors import ConceptExclusionError, SafetensorsFileError

CHECKPOINT_FORMAT = "concept-exclusion-train-checkpoint/1"
# settings that change the training trajectory: a checkpoint only resumes a run with the same ones
TRAJECTORY_KEYS = ("base", "preset", "resolution", "batch_size", "gradient_accumulation_steps", "learning_rate",
                   "lr_warmup_steps", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
                   "max_grad_norm", "rank", "alpha", "lora_targets", "mixed_precision", "seed", "caption_dropout",
                   "mode", "strength", "targets", "clip_skip")


def trajectory(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a checkpoint must share with the run resuming it (the preset by content, not by path)."""
    values = {k: getattr(args, k) for k in TRAJECTORY_KEYS}
    values["preset"] = load_preset(args.preset).sha256
    return values


def checkpoint_path(output: Path, step: int) -> Path:
    return output / "checkpoints" / f"step-{step:08d}.safetensors"


def find_checkpoint(resume: str) -> Path | None:
    """``resume`` itself if a file, else the newest ``step-*.safetensors`` in it or in its ``checkpoints/``.

    An existing folder without checkpoints (a run stopped before its first one) gives None: start afresh.
    """
    path = Path(resume)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ConceptExclusionError(f"--resume {resume}: no checkpoint file or folder there")
    for folder in (path / "checkpoints", path):
        found = sorted(folder.glob("step-*.safetensors")) if folder.is_dir() else []
        if found:
            return found[-1]
    return None


def save_checkpoint(path: Path, step: int, unet, optimizer, exclusion, scaler, args: argparse.Namespace,
                    fingerprint: str) -> None:
    """One safetensors file: trainable LoRA tensors, AdamW state (tensors + JSON param groups), exclusion state."""
    from concept_exclusion.safeio import write_safetensors

    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    tensors = {f"lora/{n}": p.detach() for n, p in unet.named_parameters() if p.requires_grad}
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for key, value in state.items():
            if not torch.is_tensor(value):
                value = torch.tensor(value)
            tensors[f"optim/{index}/{key}"] = value
    tensors.update({f"exclusion/{k}": v for k, v in exclusion.state_dict().items()})
    metadata = {
        "format": CHECKPOINT_FORMAT, "version": __version__, "step": str(step),
        "param_names": json.dumps(names), "param_groups": json.dumps(opt["param_groups"]),
        "exclusion_steps": str(exclusion.steps), "trajectory": json.dumps(trajectory(args), sort_keys=True),
        "dataset_sha256": fingerprint, "basis_sha256": exclusion.subspace.sha256,
        "scaler": json.dumps(scaler.state_dict()) if scaler is not None else "",
    }
    write_safetensors(path, tensors, metadata)


def load_checkpoint(path: Path, unet, optimizer, exclusion, scaler, args: argparse.Namespace, fingerprint: str
                    ) -> int:
    """Restore a ``save_checkpoint`` file into the run (validated; never unpickles). Returns its step."""
    from concept_exclusion.safeio import read_safetensors

    tensors, meta = read_safetensors(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise SafetensorsFileError(f"{path}: not a train checkpoint (metadata 'format' is {meta.get('format')!r})")
    try:
        saved = json.loads(meta["trajectory"])
        names = json.loads(meta["param_names"])
        groups = json.loads(meta["param_groups"])
        step = int(meta["step"])
    except (KeyError, ValueError) as exc:
        raise SafetensorsFileError(f"{path}: malformed checkpoint metadata ({exc})") from None
    if not (isinstance(saved, dict) and isinstance(names, list) and isinstance(groups, list)):
        raise SafetensorsFileError(f"{path}: malformed checkpoint metadata (trajectory, param_names or param_groups "
                                   f"of the wrong JSON type)")
    now = json.loads(json.dumps(trajectory(args), sort_keys=True))
    for key in TRAJECTORY_KEYS:
        if saved.get(key) != now.get(key):
            raise ConceptExclusionError(f"{path}: was written with {key} = {saved.get(key)!r}, this run has "
                                        f"{now.get(key)!r}; resume with the same settings")
    if meta.get("dataset_sha256") != fingerprint:
        raise ConceptExclusionError(f"{path}: the --data folder changed since this checkpoint (images or captions)")
    if meta.get("basis_sha256", exclusion.subspace.sha256) != exclusion.subspace.sha256:
        raise ConceptExclusionError(f"{path}: was trained against another concept basis (sha256 "
                                    f"{meta['basis_sha256'][:12]}..., now {exclusion.subspace.sha256[:12]}...): the "
                                    f"base model's text encoder or the clip_skip changed; resume with the same base")
    params = dict(unet.named_parameters())
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    if names != trainable:
        raise ConceptExclusionError(f"{path}: its LoRA parameters do not match this model's "
                                    f"({len(names)} saved, {len(trainable)} here)")
    with torch.no_grad():
        for name in names:
            value = tensors.get(f"lora/{name}")
            if value is None or value.shape != params[name].shape:
                raise SafetensorsFileError(f"{path}: tensor 'lora/{name}' missing or of the wrong shape")
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            parts = key.split("/", 2)
            if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) >= len(names):
                raise SafetensorsFileError(f"{path}: malformed optimizer tensor name {key!r}")
            owner = params[names[int(parts[1])]]
            if value.ndim and value.shape != owner.shape:
                raise SafetensorsFileError(f"{path}: optimizer tensor {key!r} has shape {list(value.shape)}, its "
                                           f"parameter {list(owner.shape)}")
            state.setdefault(int(parts[1]), {})[parts[2]] = value
    try:  # torch validates param_groups; anything it rejects is a malformed file, not a crash
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        exclusion_steps = int(meta.get("exclusion_steps", step))
        scaler_state = json.loads(meta["scaler"]) if scaler is not None and meta.get("scaler") else None
        if scaler_state is not None:
            scaler.load_state_dict(scaler_state)
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise SafetensorsFileError(f"{path}: malformed optimizer state ({exc.__class__.__name__}: {first})") from None
    try:
        exclusion.load_state_dict({k[len("exclusion/"):]: v for k, v in tensors.items() if k.startswith("exclusion/")})
    except ConceptExclusionError as exc:
        raise SafetensorsFileError(f"{path}: {exc}") from None
    exclusion.steps = exclusion_steps
    return step


def remove_stale_temporaries(output: Path) -> None:
    """Temporary files left by a process killed while writing a checkpoint (never a complete checkpoint)."""
    for stale in (output / "checkpoints").glob(".step-*.tmp"):
        stale.unlink(missing_ok=True)


def prune_checkpoints(output: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` checkpoints (0: keep all)."""
    folder = output / "checkpoints"
    found = sorted(folder.glob("step-*.safetensors"))
    for old in (found[:-keep] if keep > 0 else []):
        old.unlink(missing_ok=True)
