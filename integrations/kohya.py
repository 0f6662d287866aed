"""kohya sd-scripts network module: ``--network_module concept_exclusion.integrations.kohya``.

sd-scripts imports the module named by ``--network_module`` and calls ``create_network`` /
``create_network_from_weights`` with ``--network_args key=value`` as string keyword arguments
(a ``--config_file``'s ``network_args = ["key=value", ...]`` arrives the same way). This module
builds the real LoRA network named by ``base_network`` (sd-scripts' ``networks.lora`` by
default, or ``lycoris.kohya``) and wraps it:

- ``create_network`` encodes the concept with the model's own tokenizer(s) and text encoder(s)
  at once, so a preset that cannot be encoded fails before training starts;
- ``apply_to`` checks that the network has LoRA factors on the layers that read the text;
- ``prepare_grad_etc`` (called once after ``accelerator.prepare``, on the final devices)
  attaches the exclusion: gradient hooks that run before accumulation, reduction and clipping,
  and, in exact mode, projects the LoRA factors;
- ``on_step_start`` (every micro-step, before the forward pass) re-projects in exact mode when
  the optimizer has changed a constrained factor since the last projection;
- ``save_weights`` re-projects, measures the leakage and adds our ``concept_exclusion.*`` keys to
  the host's metadata (``ss_*`` and ``modelspec.*`` keys are passed through untouched), writing
  the file under a temporary name first.

Invariant (exact mode): every file written satisfies ``(up @ down) U = 0`` for each key/value
(and pooled) LoRA, ``Q_k^T up = 0`` / ``down Q_v = 0`` for query/out LoRAs, to float precision.
Every other method the trainer calls is the base network's.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from concept_exclusion.errors import ConceptExclusionError, SubspaceError, TargetError
from concept_exclusion.exclusion import ConceptExclusion, _text_encoder_training
from concept_exclusion.metadata import PREFIX
from concept_exclusion.preset import MODES, TARGET_SETS, Preset, load_preset
from concept_exclusion.safeio import read_header
from concept_exclusion.subspace import ConceptSubspace
from concept_exclusion.targets import find_targets, role_of

log = logging.getLogger(__name__)

DEFAULT_BASE_NETWORK = "networks.lora"
THIS_MODULE = "concept_exclusion.integrations.kohya"
OUR_ARGS = ("concept_preset", "concept_mode", "concept_strength", "concept_targets", "concept_clip_skip",
            "concept_tokenizer", "concept_allow_text_encoder_training", "concept_reencode_every")


class KohyaArgsError(ConceptExclusionError):
    """A ``--network_args`` value for this module is missing or invalid."""


# network_args --------------------------------------------------------------------------------
def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise KohyaArgsError(f"network_args {key}={value!r}: expected true or false")


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
        if mode not in MODES:
            raise KohyaArgsError(f"network_args concept_mode={mode!r}: must be one of {', '.join(MODES)}")
        settings["mode"] = mode
    if ours.get("concept_strength") not in (None, ""):
        settings["strength"] = _as_float("concept_strength", ours["concept_strength"])
    if ours.get("concept_targets") not in (None, ""):
        raw = ours["concept_targets"]
        names = raw if isinstance(raw, (list, tuple)) else str(raw).replace(",", " ").split()
        for n in names:
            if n not in TARGET_SETS:
                raise KohyaArgsError(f"network_args concept_targets={raw!r}: {n!r} is not one of "
                                     f"{', '.join(TARGET_SETS)}")
        settings["targets"] = tuple(sorted(set(names)))
    if ours.get("concept_clip_skip") not in (None, ""):
        settings["clip_skip"] = _as_int("concept_clip_skip", ours["concept_clip_skip"], 1)
    if ours.get("concept_tokenizer") not in (None, ""):
        settings["tokenizer"] = str(ours["concept_tokenizer"]).strip()
    settings["allow_text_encoder_training"] = _as_bool(
        "concept_allow_text_encoder_training", ours.get("concept_allow_text_encoder_training", False))
    settings["reencode_every"] = _as_int("concept_reencode_every", ours.get("concept_reencode_every", 100), 1)
    if base_name == THIS_MODULE:
        raise KohyaArgsError(f"network_args base_network={base_name}: must be a LoRA network module such as "
                             f"networks.lora or lycoris.kohya, not this module")
    return settings, base_name, kwargs


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


# tokenizers and encoders -----------------------------------------------------------------------
def _strategy_objects() -> tuple[list | None, int | None, bool]:
    """(tokenizers, clip_skip, found) from sd-scripts' strategy objects, when sd-scripts is loaded."""
    try:
        from library import strategy_base  # sd-scripts
    except Exception:  # noqa: BLE001 - sd-scripts absent (or an unrelated 'library' package)
        return None, None, False
    tokenize = getattr(getattr(strategy_base, "TokenizeStrategy", None), "get_strategy", lambda: None)()
    encode = getattr(getattr(strategy_base, "TextEncodingStrategy", None), "get_strategy", lambda: None)()
    tokenizers = None
    if tokenize is not None:
        if getattr(tokenize, "tokenizer1", None) is not None:
            tokenizers = [tokenize.tokenizer1] + ([tokenize.tokenizer2] if getattr(tokenize, "tokenizer2", None)
                                                   is not None else [])
        elif getattr(tokenize, "tokenizer", None) is not None:
            tokenizers = [tokenize.tokenizer]
    clip_skip = getattr(encode, "clip_skip", None) if encode is not None else None
    return tokenizers, clip_skip, tokenize is not None or encode is not None


def _load_tokenizers(path: str, count: int) -> list:
    """``count`` CLIP tokenizers from a folder: a diffusers model folder (tokenizer/, tokenizer_2/),
    a tokenizer folder, or comma-separated tokenizer folders."""
    from transformers import CLIPTokenizer

    root = Path(path)
    if root.is_dir() and (root / "tokenizer").is_dir():
        folders = [root / "tokenizer"] + ([root / "tokenizer_2"] if count == 2 else [])
    else:
        folders = [Path(p.strip()) for p in path.split(",") if p.strip()]
    if len(folders) != count:
        raise KohyaArgsError(f"network_args concept_tokenizer={path}: the model has {count} text encoder(s); give "
                             f"a diffusers model folder or {count} comma-separated tokenizer folders")
    out = []
    for folder in folders:
        if not folder.is_dir():
            raise KohyaArgsError(f"network_args concept_tokenizer={path}: {folder} is not a folder")
        try:
            out.append(CLIPTokenizer.from_pretrained(str(folder), local_files_only=True))
        except (OSError, ValueError) as exc:
            raise KohyaArgsError(f"network_args concept_tokenizer={path}: {folder}: not a CLIP tokenizer "
                                 f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return out


def _encoders_list(text_encoder) -> list[nn.Module]:
    if text_encoder is None:
        return []
    return [t for t in (text_encoder if isinstance(text_encoder, (list, tuple)) else [text_encoder]) if t is not None]


def build_subspace(preset: Preset, text_encoder, settings: dict[str, Any]) -> ConceptSubspace:
    """Encode the preset's concepts with the model's encoders (SDXL: a list of two) -> the concept subspace."""
    encoders = _encoders_list(text_encoder)
    if not encoders or len(encoders) > 2:
        raise SubspaceError(f"expected one (SD1/SD2) or two (SDXL) text encoders from sd-scripts, got {len(encoders)}")
    tokenizers, strategy_skip, found = _strategy_objects()
    source = "sd-scripts' TokenizeStrategy"
    if "tokenizer" in settings:
        tokenizers, source = _load_tokenizers(settings["tokenizer"], len(encoders)), "concept_tokenizer"
    if tokenizers is None:
        raise KohyaArgsError("cannot encode the concept: no tokenizer (sd-scripts' TokenizeStrategy is not set and "
                             "network_args concept_tokenizer=PATH was not given)")
    if len(tokenizers) != len(encoders):
        raise KohyaArgsError(f"cannot encode the concept: {len(tokenizers)} tokenizer(s) from {source} for "
                             f"{len(encoders)} text encoder(s)")
    clip_skip = settings.get("clip_skip", strategy_skip)
    if found and "clip_skip" in settings and strategy_skip is not None and settings["clip_skip"] != strategy_skip:
        log.warning("concept_clip_skip=%s differs from the training's --clip_skip %s: the concept is encoded "
                    "differently from the prompts the UNet reads", settings["clip_skip"], strategy_skip)
    if len(encoders) == 2:
        return ConceptSubspace.from_text_encoders(preset, tokenizers, encoders, clip_skip)
    return ConceptSubspace.from_text_encoder(preset, tokenizers[0], encoders[0], clip_skip)


def _check_unet_width(unet: nn.Module | None, subspace: ConceptSubspace) -> None:
    """Fail early when the UNet's cross-attention reads embeddings of another width than the basis."""
    if unet is None:
        return
    dim = subspace.dim("context")
    for name, m in unet.named_modules():
        if role_of(name) == "key" and isinstance(m, nn.Linear):
            if m.in_features != dim:
                raise SubspaceError(f"{name} reads {m.in_features}-d text embeddings but the concept was encoded "
                                    f"as {dim}-d: the text encoders given do not belong to this UNet")
            return


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
        projection = subspace.preset.projection if subspace.preset is not None else None
        self.mode = settings.get("mode") or (projection.mode if projection else "exact")
        self.strength = settings.get("strength")
        self.target_sets = settings.get("targets") or (projection.targets if projection else ("kv",))
        self._stamp: tuple | None = None

    # attribute delegation: every method the trainer may call and we do not wrap is the base's
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        base = self.__dict__.get("_modules", {}).get("base_network")
        if base is None:
            raise AttributeError(name)
        return getattr(base, name)

    @property
    def unet(self) -> nn.Module | None:
        return self._unet_ref[0]

    # trainer calls ---------------------------------------------------------------------------
    def prepare_network(self, args) -> None:
        """sd-scripts calls this with its parsed arguments right after create_network."""
        fmt = getattr(args, "save_model_as", "safetensors") or "safetensors"
        if fmt != "safetensors":
            raise KohyaArgsError(f"--save_model_as {fmt}: concept-exclusion records its provenance in safetensors "
                                 f"metadata and never writes pickles; use --save_model_as safetensors")
        clip_skip = getattr(args, "clip_skip", None)
        sdxl = "pooled" in self.subspace.bases  # SDXL reads fixed layers; sd-scripts ignores --clip_skip there
        if not sdxl and _skip(clip_skip) != _skip(self.subspace.clip_skip):
            raise KohyaArgsError(f"--clip_skip {clip_skip} but the concept was encoded with clip_skip "
                                 f"{self.subspace.clip_skip}; set network_args concept_clip_skip={clip_skip}")
        if hasattr(self.base_network, "prepare_network"):
            self.base_network.prepare_network(args)

    def apply_to(self, text_encoder, unet, *args, **kwargs):
        result = self.base_network.apply_to(text_encoder, unet, *args, **kwargs)
        self._check_targets(unet)
        return result

    def _check_targets(self, unet: nn.Module | None) -> None:
        """Dry run of the target search: fail now, not after the first epoch, when nothing can be protected."""
        training = _text_encoder_training(self.base_network, [])
        if training and not self.settings.get("allow_text_encoder_training"):
            raise TargetError(f"the network trains the text encoder ({training[0]}, ...): the concept's embeddings "
                              f"would move; train with --network_train_unet_only, or pass network_args "
                              f"concept_allow_text_encoder_training=true (approximate)")
        find_targets(self.base_network, self.subspace, self.target_sets, base_model=unet or self.unet)

    def prepare_optimizer_params(self, *args, **kwargs):
        return self.base_network.prepare_optimizer_params(*args, **kwargs)

    def prepare_grad_etc(self, text_encoder, unet) -> None:
        """Runs once after accelerator.prepare: parameters are on their devices; attach the hooks now."""
        if hasattr(self.base_network, "prepare_grad_etc"):
            self.base_network.prepare_grad_etc(text_encoder, unet)
        self._attach(unet)

    def _attach(self, unet: nn.Module | None = None) -> ConceptExclusion:
        if self.exclusion is None:
            self.exclusion = ConceptExclusion.attach(
                self.base_network, self.subspace, self.mode, strength=self.strength, targets=self.target_sets,
                allow_text_encoder_training=bool(self.settings.get("allow_text_encoder_training")),
                reencode_every=int(self.settings.get("reencode_every", 100)), base_model=unet or self.unet)
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
        out = {}
        for t in self._attach().targets:
            p, basis = t.param.detach().double().cpu(), t.basis
            if t.kind == "full" or t.other is None:
                continue
            o = t.other.detach().double().cpu()
            delta = o @ p if t.side == "input" else p @ o
            part = delta @ basis if t.side == "input" else basis.T @ delta
            norm = float(delta.norm())
            out[t.name] = float(part.norm()) / norm if norm > 0 else 0.0
        return out

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
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".safetensors", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            self.base_network.save_weights(str(tmp), dtype, merged)
            _, written = read_header(tmp)
            missing = [k for k in ours if written.get(k) != ours[k]]
            if missing:
                raise ConceptExclusionError(f"{path}: the {self.base_name} network dropped the metadata key "
                                            f"{missing[0]!r} while saving; refusing to write an unlabelled file")
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        log.info("saved %s: max leakage %s over %s target layers", path, ours[PREFIX + "leakage_max"],
                 ours[PREFIX + "target_layers"])


# the kohya module contract ----------------------------------------------------------------------------
def encode_concept(text_encoder, unet, settings: dict[str, Any]) -> ConceptSubspace:
    """Load the preset and encode it with the model's own encoder(s); every failure is one line, before training."""
    preset = load_preset(settings["preset"])
    mode = settings.get("mode") or preset.projection.mode
    strength = settings.get("strength")
    if strength is not None and not 0.0 <= strength <= 1.0:
        raise KohyaArgsError(f"network_args concept_strength={strength}: must be in [0, 1]")
    if mode == "exact" and strength not in (None, 1.0):
        raise KohyaArgsError("network_args concept_strength applies to concept_mode=gradient only")
    if mode == "gradient":
        log.warning("concept_mode=gradient projects gradients only: a LoRA's down factors keep their initial "
                    "concept components and Adam drifts, so the saved file will usually fail `concept-exclusion "
                    "audit`; use concept_mode=exact for a guarantee")
    subspace = build_subspace(preset, text_encoder, settings)
    _check_unet_width(unet, subspace)
    log.info("concept %s encoded: ranks %s (clip_skip %s)", preset.name,
             {s: subspace.rank(s) for s in subspace.bases}, subspace.clip_skip)
    return subspace


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoder,
                   unet, neuron_dropout: float | None = None, **kwargs) -> ConceptExclusionNetwork:
    """sd-scripts' entry point. ``kwargs`` are ``--network_args`` (strings): ours (``concept_*``,
    ``base_network``) are taken out, the rest go to the base network's ``create_network``.
    The concept is encoded first, so a preset or tokenizer problem fails before anything is built."""
    settings, base_name, base_kwargs = split_network_args(kwargs)
    module = import_base_network(base_name)
    subspace = encode_concept(text_encoder, unet, settings)
    base = module.create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet,
                                 neuron_dropout=neuron_dropout, **base_kwargs)
    if base is None:
        raise KohyaArgsError(f"base_network={base_name}: create_network returned no network")
    return ConceptExclusionNetwork(base, subspace, unet, settings, base_name)


def create_network_from_weights(multiplier: float, file, vae, text_encoder, unet, weights_sd=None,
                                for_inference: bool = False, **kwargs):
    """sd-scripts' second entry point: the base network sized from a weights file.

    ``for_inference=True`` (merging ``--base_weights``, generation) returns the base network
    unwrapped: nothing is trained. Otherwise (``--dim_from_weights``) the network is wrapped as in
    ``create_network``. Weights files are read as safetensors only.
    """
    kwargs = dict(kwargs)
    if weights_sd is None:
        if Path(str(file)).suffix != ".safetensors":
            raise KohyaArgsError(f"{file}: concept-exclusion reads network weights from .safetensors only")
        from concept_exclusion.safeio import read_safetensors

        weights_sd, _ = read_safetensors(file)
    if for_inference:
        base_name = str(kwargs.pop("base_network", None) or DEFAULT_BASE_NETWORK)
        base_kwargs = {k: v for k, v in kwargs.items() if not k.startswith("concept_")}
        return import_base_network(base_name).create_network_from_weights(
            multiplier, file, vae, text_encoder, unet, weights_sd=weights_sd, for_inference=for_inference,
            **base_kwargs)
    settings, base_name, base_kwargs = split_network_args(kwargs)
    module = import_base_network(base_name)
    subspace = encode_concept(text_encoder, unet, settings)
    base, weights_sd = module.create_network_from_weights(
        multiplier, file, vae, text_encoder, unet, weights_sd=weights_sd, for_inference=False, **base_kwargs)
    return ConceptExclusionNetwork(base, subspace, unet, settings, base_name), weights_sd


__all__ = ["ConceptExclusionNetwork", "create_network", "create_network_from_weights", "split_network_args",
           "KohyaArgsError"]
