"""transformers ``Trainer``: a flag-driven callback that keeps a concept out of what the model learns.

Event order in ``Trainer`` (4.45+, 5.x): backward -> clip_grad_norm -> on_pre_optimizer_step ->
optimizer.step -> on_optimizer_step. Nothing fires between backward and clipping, so the gradient
projection runs in tensor hooks installed at ``on_train_begin`` (``ConceptExclusion.attach``): each
micro-batch's gradient is projected before accumulation, before DDP's reduction and before
clipping, so the norm clipping sees is the projected gradient's. Exact mode's re-projection runs in
``on_optimizer_step``.

Invariant (exact mode): after every optimizer step, ``(W - W0) U = 0`` to float precision for every
targeted weight (LoRA: the effective delta), where ``W0`` is the weight when training began; a run
resumed from a checkpoint keeps the original ``W0`` (restored from the checkpoint's
``concept_exclusion_state.safetensors``).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from concept_exclusion.concept.codec import from_json, record_of, to_json
from concept_exclusion.concept.model_folder import load_text_encoders
from concept_exclusion.concept.preset import load_preset
from concept_exclusion.concept.subspace import ConceptSubspace
from concept_exclusion.errors import ConceptExclusionError, ModelFolderError
from concept_exclusion.exclusion import ConceptExclusion
from concept_exclusion.model import roles
from concept_exclusion.model.plan import projection_of
from concept_exclusion.options import check_mode_strength
from concept_exclusion.loss_changes import warn_unapplied
from concept_exclusion.preservation import OutputPreservation
from concept_exclusion.regions import TemplateLocator
from concept_exclusion.safeio import read_safetensors, write_safetensors

log = logging.getLogger(__name__)

STATE_FILE = "concept_exclusion_state.safetensors"


FLAG_HELP = {  # the --help text of each flag
    "concept_preset": ("Preset to exclude: a .toml file, a shipped preset name, or a subspace .safetensors file "
                       "(ConceptSubspace.save). Leave unset to train without the exclusion."),
    "concept_mode": ("exact: re-project the weights after every step so (W - W0) U = 0; gradient: project "
                     "gradients only. Default: the preset's [projection] mode."),
    "concept_strength": "Share of the gradient's concept component removed (gradient mode only, 0..1).",
    "concept_targets": ("Target sets, comma-separated: 'kv' (cross-attention keys/values, SDXL pooled path) or "
                        "'attention' (also queries and outputs). Default: the preset's."),
    "concept_project_context": ("Also remove the concept's directions from the text states the model reads in "
                                "training passes, so no layer can learn from them. Default: the preset's "
                                "[projection] project_context."),
    "concept_clip_skip": ("Text-encoder layer the UNet reads, kohya-style (1 = last, 2 = penultimate). Must "
                          "match training."),
    "concept_text_encoder": ("A diffusers model folder or hub id to read tokenizer(s)/text encoder(s) from when "
                             "the script does not pass them to ConceptExclusionCallback.from_args."),
    "concept_save_subspace": "Also write the concept subspace to this .safetensors file (for audits).",
}


def _flag(name: str):
    """The ``--name`` flag: unset (None) unless given, with its ``--help`` text from ``FLAG_HELP``."""
    return field(default=None, metadata={"help": FLAG_HELP[name]})


@dataclass
class ConceptExclusionArguments:
    """Flags for ``HfArgumentParser((TrainingArguments, ConceptExclusionArguments))``; all start with ``concept_``."""

    concept_preset: str | None = _flag("concept_preset")
    concept_mode: Literal["exact", "gradient"] | None = _flag("concept_mode")
    concept_strength: float | None = _flag("concept_strength")
    concept_targets: str | None = _flag("concept_targets")
    concept_project_context: bool | None = _flag("concept_project_context")
    concept_clip_skip: int | None = _flag("concept_clip_skip")
    concept_text_encoder: str | None = _flag("concept_text_encoder")
    concept_save_subspace: str | None = _flag("concept_save_subspace")

    def __post_init__(self) -> None:
        if self.concept_targets is not None:
            for name in self.target_sets():
                if name not in roles.target_sets():
                    raise ConceptExclusionError(f"--concept_targets: unknown target set {name!r} "
                                                f"(known: {', '.join(roles.target_sets())})")
        check_mode_strength(self.concept_mode, self.concept_strength, mode_name="--concept_mode",
                            strength_name="--concept_strength")

    def target_sets(self) -> tuple[str, ...] | None:
        if self.concept_targets is None:
            return None
        return tuple(t.strip() for t in self.concept_targets.split(",") if t.strip())


# the subspace as JSON (TrainerState is JSON; ExportableState rebuilds callbacks from it): concept_exclusion.concept.codec
def subspace_to_json(subspace: ConceptSubspace) -> dict[str, Any]:
    """Bases as base64 of float64 little-endian bytes (bit-exact), with the preset and encoder identity."""
    return to_json(record_of(subspace))


def subspace_from_json(doc: dict[str, Any]) -> ConceptSubspace:
    """Inverse of ``subspace_to_json``; checks the format and that every basis is orthonormal."""
    return ConceptSubspace(**vars(from_json(doc)))


def _load_text_encoders(source: str) -> tuple[list, list]:
    """Tokenizer(s) and frozen text encoder(s) from a diffusers model folder or hub id (SDXL: both)."""
    try:
        return load_text_encoders(source, local_files_only=False)
    except ModelFolderError as exc:
        raise ConceptExclusionError(f"--concept_text_encoder {exc}") from None


class ConceptExclusionCallback(TrainerCallback, ExportableState):
    """Attach the exclusion at ``on_train_begin``, keep it exact in ``on_optimizer_step``, log its leakage,
    and save/restore its state with the Trainer's checkpoints."""

    def __init__(self, subspace: ConceptSubspace | dict, mode: str | None = None, strength: float | None = None,
                 targets: Sequence[str] | str | None = None, text_encoder=None,
                 project_context: bool | None = None) -> None:
        self.subspace = subspace if isinstance(subspace, ConceptSubspace) else subspace_from_json(subspace)
        self.mode = mode
        self.strength = strength
        self.targets = [targets] if isinstance(targets, str) else (list(targets) if targets else None)
        self.text_encoder = text_encoder
        self.project_context = project_context
        self.exclusion: ConceptExclusion | None = None
        self.resume_info: dict[str, Any] | None = None  # set by the Trainer from a checkpoint's trainer_state.json
        self._output_dir: str | None = None
        self._global_step = 0

    @classmethod
    def from_args(cls, args: ConceptExclusionArguments, tokenizer=None, text_encoder=None
                  ) -> "ConceptExclusionCallback | None":
        """The callback the flags ask for, or None when ``--concept_preset`` is unset.

        ``tokenizer``/``text_encoder``: the model's own (SDXL: lists of both); else ``--concept_text_encoder``
        names where to load them from. A subspace ``.safetensors`` file needs neither.
        """
        if not args.concept_preset:
            return None
        if str(args.concept_preset).endswith(".safetensors"):
            subspace = ConceptSubspace.load(args.concept_preset)
        else:
            preset = load_preset(args.concept_preset)
            if text_encoder is None and args.concept_text_encoder:
                tokenizer, text_encoder = _load_text_encoders(args.concept_text_encoder)
            if tokenizer is None or text_encoder is None:
                raise ConceptExclusionError(f"--concept_preset {args.concept_preset}: pass tokenizer= and "
                                            f"text_encoder= to from_args, or set --concept_text_encoder")
            subspace = ConceptSubspace.from_encoders(preset, tokenizer, text_encoder, args.concept_clip_skip)
        if args.concept_save_subspace:
            subspace.save(args.concept_save_subspace)
        return cls(subspace, mode=args.concept_mode, strength=args.concept_strength, targets=args.target_sets(),
                   text_encoder=text_encoder, project_context=args.concept_project_context)

    # ExportableState ----------------------------------------------------------------------------
    def state(self) -> dict:
        """JSON for trainer_state.json: the subspace and settings rebuild the callback; the tensors that
        resuming needs are in ``checkpoint-N/concept_exclusion_state.safetensors`` (written in ``on_save``)."""
        state_file = None
        if self._output_dir is not None:
            state_file = str(Path(self._output_dir) / f"checkpoint-{self._global_step}" / STATE_FILE)
        return {
            "args": {"subspace": subspace_to_json(self.subspace), "mode": self.mode, "strength": self.strength,
                     "targets": self.targets, "project_context": self.project_context},
            "attributes": {"resume_info": {"steps": self.exclusion.steps if self.exclusion else 0,
                                           "global_step": self._global_step, "state_file": state_file}},
        }

    # events -------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._output_dir = args.output_dir
        self._global_step = state.global_step
        if self.exclusion is not None:
            return
        if model is None:
            raise ConceptExclusionError("ConceptExclusionCallback: the Trainer passed no model to on_train_begin")
        projection = projection_of(self.subspace).overridden(
            mode=self.mode, strength=self.strength, targets=self.targets, project_context=self.project_context)
        self.exclusion = ConceptExclusion.attach(model, self.subspace, projection, text_encoder=self.text_encoder)
        if self.resume_info or state.global_step > 0:
            self._restore(args, state)
        if self.subspace.preset is not None:
            warn_unapplied(self.subspace.preset, "a Trainer callback", {
                "output_preservation": "compute your loss with callback.preservation.loss(...) in compute_loss "
                                       "(docs/huggingface.md)",
                "regions": "compute your loss with region_loss(pred, target, latent_mask(callback.locator.masks("
                           "pixel_values), pred)) in compute_loss (docs/huggingface.md)"})

    @property
    def preservation(self) -> OutputPreservation | None:
        """The output preservation the preset asks for (``[projection] output_preservation``), or None."""
        preset = self.subspace.preset
        return None if preset is None else OutputPreservation.for_preset(preset)

    @functools.cached_property
    def locator(self) -> TemplateLocator | None:
        """The locator of the preset's exemplars (``[exemplars]``), or None when it lists none; built once (it reads
        and hashes the exemplar files), as ``compute_loss`` asks for it on every step."""
        preset = self.subspace.preset
        return None if preset is None or preset.exemplars is None else TemplateLocator.from_preset(preset)

    def _restore(self, args, state) -> None:
        """Resuming (the Trainer loaded checkpoint weights before this event): restore W0 and the step count.

        The state file is looked for in ``output_dir/checkpoint-<step>``, in ``args.resume_from_checkpoint``, and
        where trainer_state.json recorded it (``restore_callback_states_from_checkpoint=True``).
        """
        info = self.resume_info or {}
        candidates = [Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE]
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            candidates.append(Path(args.resume_from_checkpoint) / STATE_FILE)
        if info.get("state_file"):
            candidates.append(Path(info["state_file"]))
        for path in candidates:
            if path.is_file():
                tensors, meta = read_safetensors(path)
                self.exclusion.load_state_dict(tensors)
                self.exclusion.steps = int(meta.get("steps", info.get("steps", 0)))
                log.info("concept exclusion state restored from %s (step %d)", path, state.global_step)
                return
        log.warning("resuming at step %d without %s (looked in %s): leakage is measured from the resumed weights; "
                    "the constraint itself still holds", state.global_step, STATE_FILE,
                    ", ".join(str(p) for p in candidates))

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.exclusion is not None:
            self.exclusion.after_optimizer_step()

    def on_step_end(self, args, state, control, **kwargs):
        self._global_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.exclusion is None or logs is None or "loss" not in logs:
            return
        value = self.exclusion.max_leakage()
        logs["concept_leakage_max"] = value
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["concept_leakage_max"] = value

    def on_save(self, args, state, control, **kwargs):
        if self.exclusion is None or not args.should_save:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        write_safetensors(folder / STATE_FILE, self.exclusion.state_dict(),
                          {"steps": str(self.exclusion.steps), "global_step": str(state.global_step)})
