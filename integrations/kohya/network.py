"""``ConceptExclusionNetwork``: a kohya network (``base_network``) with the exclusion attached; every trainer call
that it does not wrap is the base network's.

- ``apply_to`` validates the plan at once (nothing installed), so a network that cannot be protected fails before
  the first epoch;
- ``prepare_grad_etc`` (called once after ``accelerator.prepare``, on the final devices) attaches the exclusion:
  gradient hooks that run before accumulation, reduction and clipping, and, in exact mode, projects the factors;
- ``on_step_start`` (every micro-step, before the forward pass) re-projects in exact mode when the optimizer has
  changed a constrained factor since the last projection;
- ``save_weights`` re-projects, measures the leakage and adds our ``concept_exclusion.*`` keys to the host's
  metadata (``ss_*`` and ``modelspec.*`` keys are passed through untouched), writing under a temporary name first.

Invariant (exact mode): every file written satisfies ``(up @ down) U = 0`` for each key/value (and pooled) LoRA,
``Q_k^T up = 0`` / ``down Q_v = 0`` for query/out LoRAs, to float precision.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from concept_exclusion.concept.subspace import ConceptSubspace
from concept_exclusion.errors import ConceptExclusionError
from concept_exclusion.exclusion import ConceptExclusion
from concept_exclusion.loss_changes import REGIONS_REMEDY, warn_unapplied
from concept_exclusion.metadata import PREFIX
from concept_exclusion.model.plan import plan_exclusion, projection_of
from concept_exclusion.options import AttachOptions
from concept_exclusion.safeio import atomic_path, read_header

from concept_exclusion.integrations.kohya.args import THIS_MODULE, KohyaArgsError

log = logging.getLogger(__name__)


def import_base_network(name: str):
    """The base network module (``networks.lora`` needs sd-scripts' folder on the path)."""
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        hint = " (networks.lora is sd-scripts' own: run train_network.py from the sd-scripts folder)" \
            if name.startswith("networks.") else ""
        raise KohyaArgsError(f"network_args base_network={name}: cannot import it ({exc}){hint}") from None
    for fn in ("create_network", "create_network_from_weights"):
        if not callable(getattr(module, fn, None)):
            raise KohyaArgsError(f"network_args base_network={name}: has no {fn}(); not a kohya network module")
    return module


def _skip(value) -> int:
    """clip_skip with None and 1 both meaning the last layer."""
    return 1 if value in (None, "", 1) else int(value)


# the wrapped network ------------------------------------------------------------------------------
class ConceptExclusionNetwork(nn.Module):
    """A kohya network (``base_network``) with the concept exclusion attached; trainer calls are delegated."""

    def __init__(self, base: nn.Module, subspace: ConceptSubspace, unet: nn.Module | None, settings: dict[str, Any],
                 base_name: str) -> None:
        super().__init__()
        self.base_network = base
        self.subspace = subspace
        self.settings = dict(settings)
        self.base_name = base_name
        self.exclusion: ConceptExclusion | None = None
        self._unet_ref = (unet,)  # a tuple: the UNet must not become a submodule of the network
        self.projection = projection_of(subspace).overridden(
            mode=settings.get("mode"), strength=settings.get("strength"), targets=settings.get("targets"),
            project_context=settings.get("project_context"))
        self.options = AttachOptions(allow_text_encoder_training=bool(settings.get("allow_text_encoder_training")),
                                     reencode_every=int(settings.get("reencode_every", 100)))
        self._stamp: tuple | None = None
        self.masked_loss: bool | None = None  # sd-scripts' --masked_loss, known once prepare_network has run

    # attribute delegation: every method the trainer may call and we do not wrap is the base's
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_network")
            if base is None:
                raise
        return getattr(base, name)

    @property
    def unet(self) -> nn.Module | None:
        return self._unet_ref[0]

    # trainer calls ---------------------------------------------------------------------------
    def prepare_network(self, args) -> None:
        """sd-scripts calls this with its parsed arguments right after create_network."""
        if getattr(args, "network_train_unet_only", True) is False and not self.settings.get(
                "allow_text_encoder_training"):
            raise KohyaArgsError("sd-scripts trains the text encoder unless --network_train_unet_only is given: the "
                                 "concept's embeddings would move; add --network_train_unet_only, or network_args "
                                 "concept_allow_text_encoder_training=true (approximate)")
        fmt = getattr(args, "save_model_as", "safetensors") or "safetensors"
        if fmt != "safetensors":
            raise KohyaArgsError(f"--save_model_as {fmt}: concept-exclusion records its provenance in safetensors "
                                 f"metadata and never writes pickles; use --save_model_as safetensors")
        clip_skip = getattr(args, "clip_skip", None)
        sdxl = "pooled" in self.subspace.bases  # SDXL reads fixed layers; sd-scripts ignores --clip_skip there
        if not sdxl and _skip(clip_skip) != _skip(self.subspace.clip_skip):
            raise KohyaArgsError(f"--clip_skip {clip_skip} but the concept was encoded with clip_skip "
                                 f"{self.subspace.clip_skip}; set network_args concept_clip_skip={clip_skip}")
        self.masked_loss = bool(getattr(args, "masked_loss", False))
        if not self.masked_loss and self.subspace.preset is not None:
            warn_unapplied(self.subspace.preset, "sd-scripts without --masked_loss", {"regions": REGIONS_REMEDY["kohya"]})
        if hasattr(self.base_network, "prepare_network"):
            self.base_network.prepare_network(args)

    def apply_to(self, text_encoder, unet, *args, **kwargs):
        result = self.base_network.apply_to(text_encoder, unet, *args, **kwargs)
        self._check_targets(unet)
        return result

    def _check_targets(self, unet: nn.Module | None) -> None:
        """Dry run of the plan (validation only, nothing installed): fail now, not after the first epoch."""
        plan_exclusion(self.base_network, self.subspace, self.projection, base_model=unet or self.unet,
                       options=self.options)

    def prepare_optimizer_params(self, *args, **kwargs):
        return self.base_network.prepare_optimizer_params(*args, **kwargs)

    def prepare_grad_etc(self, text_encoder, unet) -> None:
        """Runs once after accelerator.prepare: parameters are on their devices; attach the hooks now."""
        if hasattr(self.base_network, "prepare_grad_etc"):
            self.base_network.prepare_grad_etc(text_encoder, unet)
        self._attach(unet)

    def _attach(self, unet: nn.Module | None = None) -> ConceptExclusion:
        if self.exclusion is None:
            self.exclusion = ConceptExclusion.attach(self.base_network, self.subspace, self.projection,
                                                     base_model=unet or self.unet, options=self.options)
            self._stamp = self._current_stamp()
            log.info("concept exclusion on the %s network: %r", self.base_name, self.exclusion)
        return self.exclusion

    def _current_stamp(self) -> tuple:
        """Changes whenever a constrained tensor was written to (in place or replaced) since the last look."""
        assert self.exclusion is not None
        return tuple((t.param._version, t.param.data_ptr(), t.param.dtype) for t in self.exclusion.targets) + \
            tuple((t.other._version, t.other.data_ptr()) for t in self.exclusion.targets if t.other is not None)

    def _reproject_if_changed(self) -> bool:
        if self.exclusion is None:
            return False
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return False
        self.exclusion.after_optimizer_step()
        self._stamp = self._current_stamp()
        return True

    def on_epoch_start(self, *args, **kwargs):
        return self.base_network.on_epoch_start(*args, **kwargs)

    def on_step_start(self, *args, **kwargs):
        """Every micro-step before the forward pass: exact mode puts changed factors back on the constraint."""
        if hasattr(self.base_network, "on_step_start"):
            self.base_network.on_step_start(*args, **kwargs)
        self._reproject_if_changed()

    def get_trainable_params(self):
        return self.base_network.get_trainable_params()

    def enable_gradient_checkpointing(self):
        if hasattr(self.base_network, "enable_gradient_checkpointing"):
            return self.base_network.enable_gradient_checkpointing()
        return None

    def set_multiplier(self, multiplier):
        return self.base_network.set_multiplier(multiplier)

    def is_mergeable(self) -> bool:
        return bool(getattr(self.base_network, "is_mergeable", lambda: False)())

    def merge_to(self, *args, **kwargs):
        return self.base_network.merge_to(*args, **kwargs)

    def load_weights(self, file):
        """Safetensors only (no unpickling); the file is validated before the base network reads it."""
        if Path(str(file)).suffix != ".safetensors":
            raise KohyaArgsError(f"{file}: concept-exclusion loads network weights from .safetensors only")
        read_header(file)
        return self.base_network.load_weights(file)

    # saving -------------------------------------------------------------------------------------
    @torch.no_grad()
    def file_leakage(self) -> dict[str, float]:
        """Per target, the constraint part of the LoRA delta the file holds (up @ down, relative to zero),
        over its norm. Unlike ``ConceptExclusion.leakage`` (change since attach) this stays right when
        training resumed from weights that were not projected before."""
        return {t.name: t.leakage(t.product(t.param.detach().double().cpu(), t.other.detach().double().cpu()))
                for t in self._attach().targets if t.kind == "lora"}

    def provenance(self) -> dict[str, str]:
        """Our metadata for the file being written (leakage measured now, on the LoRA delta the file holds)."""
        meta = self._attach().metadata()
        leak = self.file_leakage()
        if leak:
            meta[PREFIX + "leakage"] = json.dumps({k: float(f"{v:.3e}") for k, v in sorted(leak.items())})
            meta[PREFIX + "leakage_max"] = f"{max(leak.values()):.3e}"
        meta[PREFIX + "network_module"] = THIS_MODULE
        meta[PREFIX + "base_network"] = self.base_name
        meta[PREFIX + "lora_format"] = "kohya"
        if self.masked_loss is not None:  # what sd-scripts was told; the masks themselves are not seen here
            meta[PREFIX + "masked_loss"] = "true" if self.masked_loss else "false"
        return meta

    def save_weights(self, file, dtype, metadata):
        """Re-project (exact mode), then let the base network write with our keys added to ``metadata``."""
        path = Path(str(file))
        if path.suffix != ".safetensors":
            raise KohyaArgsError(f"{path}: concept-exclusion writes .safetensors only (its provenance lives in "
                                 f"the metadata); use --save_model_as safetensors")
        exclusion = self._attach()
        if exclusion.mode == "exact":
            self._reproject_if_changed()
        ours = self.provenance()
        merged = dict(metadata or {})
        clash = [k for k in merged if k.startswith(PREFIX)]
        if clash:
            log.info("replacing %d stale %s* metadata keys from the host", len(clash), PREFIX)
        merged.update(ours)
        with atomic_path(path) as tmp:
            # the base network picks its writer by the extension (sd-scripts: torch.save for anything else)
            staged = tmp.with_name(tmp.name + ".safetensors")
            try:
                self.base_network.save_weights(str(staged), dtype, merged)
                _, written = read_header(staged)
                missing = [k for k in ours if written.get(k) != ours[k]]
                if missing:
                    raise ConceptExclusionError(f"{path}: the {self.base_name} network dropped the metadata key "
                                                f"{missing[0]!r} while saving; refusing to write an unlabelled file")
                os.replace(staged, tmp)
            finally:
                staged.unlink(missing_ok=True)
        log.info("saved %s: max leakage %s over %s target layers", path, ours[PREFIX + "leakage_max"],
                 ours[PREFIX + "target_layers"])
