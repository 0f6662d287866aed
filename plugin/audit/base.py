"""The trusted base model an audit re-encodes the preset with: a diffusers folder or a single-file checkpoint.

SD1.x/2.x and SDXL (``unet/``), and Flux and SD3 folders (``transformer/``, read as a pipeline with its
CLIP and T5 encoders), or a base an installed package registers by name (``bases``).

Invariants: nothing is downloaded (``local_files_only``); weights are read from safetensors only
(``use_safetensors=True``; a single file must be ``.safetensors``), so no pickle is ever loaded;
any loader failure is one ``AuditError`` line naming the source.
"""

from __future__ import annotations

import functools
from pathlib import Path

from concept_exclusion.audit.base_model import BaseModel, base_model
from concept_exclusion.audit.bases import load_named, registered
from concept_exclusion.audit.checkpoint import CheckpointTensors, model_class, skeleton
from concept_exclusion.concept.encoders import FAMILIES
from concept_exclusion.concept.model_folder import load_text_encoders
from concept_exclusion.errors import AuditError, ModelFolderError


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0][:300] if text.strip() else type(exc).__name__


def load_base(source: str | Path, base_config: str | Path | None = None) -> BaseModel:
    """A diffusers folder (``tokenizer/``, ``text_encoder/``, ``unet/``) or a ``.safetensors`` single file
    (kohya/A1111 layout; needs ``base_config``, a diffusers folder with the component configs)."""
    root = Path(source)
    parts, fill = None, None
    if root.is_file():
        toks, encs, net, parts = _single_file(root, base_config)
        kind = "single file"
    elif root.is_dir() and (root / "transformer").is_dir() and not (root / "unet").is_dir():
        toks, encs, net = _dit_folder(root)
        fill = CheckpointTensors(root / "transformer", net)  # the weight check reads a few layers' weights
        parts = functools.cache(lambda: _vae_and_scheduler(root, flow=True))
        kind = "diffusers folder"
    elif root.is_dir() and all((root / d).is_dir() for d in ("tokenizer", "text_encoder", "unet")):
        toks, encs, net = _folder(root)
        parts = functools.cache(lambda: _vae_and_scheduler(root, flow=False))  # loaded once, if the check runs
        kind = "diffusers folder"
    elif str(source) in registered() or not root.is_dir():
        return load_named(str(source))
    else:
        raise AuditError(f"--base {root}: not a diffusers model folder (needs tokenizer/, text_encoder/ and "
                         f"unet/, or transformer/) nor a .safetensors checkpoint")
    base = base_model(str(root), kind, toks, encs, net)
    base.fill = fill
    if parts is not None:
        base.denoising = lambda clip_skip: _denoising(base, root, parts, clip_skip)
    return base


def _dit_folder(root: Path):
    """A Flux or SD3 pipeline folder: its tokenizers and encoders in pipeline order, and its transformer built from
    its config without weights (``CheckpointTensors`` reads the layers the audit measures; the behavioural check
    loads it whole)."""
    from diffusers import DiffusionPipeline

    try:
        # the weight check reads the encoders and a few transformer layers; the VAE is never loaded for it
        pipe = DiffusionPipeline.from_pretrained(str(root), local_files_only=True, use_safetensors=True, vae=None,
                                                 transformer=None)
        net = skeleton(root / "transformer")
    except ModelFolderError as exc:
        raise AuditError(f"--base {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any loader failure is unusable input, reported in one line
        raise AuditError(f"--base {root}: cannot load the pipeline from safetensors ({_first_line(exc)})") from None
    toks, encs = [], []
    for suffix in ("", "_2", "_3"):
        enc, tok = getattr(pipe, "text_encoder" + suffix, None), getattr(pipe, "tokenizer" + suffix, None)
        if enc is not None and tok is not None:
            toks.append(tok)
            encs.append(enc.eval().requires_grad_(False))
    if not encs:
        raise AuditError(f"--base {root}: a {type(pipe).__name__} without text encoders")
    return toks, encs, net


def _folder(root: Path):
    from diffusers import UNet2DConditionModel

    try:
        toks, encs = load_text_encoders(root, local_files_only=True)
        unet = UNet2DConditionModel.from_pretrained(str(root / "unet"), local_files_only=True, use_safetensors=True)
    except ModelFolderError as exc:
        raise AuditError(f"--base {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any loader failure is unusable input, reported in one line
        raise AuditError(f"--base {root}: cannot load the UNet from safetensors ({_first_line(exc)})") from None
    return toks, encs, unet


def _single_file(path: Path, base_config: str | Path | None):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from concept_exclusion.safeio import read_header

    if path.suffix != ".safetensors":
        raise AuditError(f"--base {path}: single-file checkpoints must be .safetensors (pickled .ckpt/.bin files "
                         f"are never loaded)")
    if base_config is None:
        raise AuditError(f"--base {path}: a single-file checkpoint needs --base-config FOLDER (a diffusers folder "
                         f"with the component configs), so that nothing is downloaded")
    names, _ = read_header(path)
    xl = any(k.startswith("conditioner.embedders.1") for k in names)
    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    try:
        extra = {} if xl else {"safety_checker": None, "feature_extractor": None}  # never loaded from the config
        pipe = cls.from_single_file(str(path), config=str(base_config), local_files_only=True, **extra)
    except Exception as exc:  # noqa: BLE001 - any loader failure is unusable input, reported in one line
        raise AuditError(f"--base {path}: cannot load the checkpoint ({_first_line(exc)})") from None
    from diffusers import DDPMScheduler

    toks = [pipe.tokenizer] + ([pipe.tokenizer_2] if xl else [])
    encs = [pipe.text_encoder] + ([pipe.text_encoder_2] if xl else [])
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return toks, [e.eval().requires_grad_(False) for e in encs], pipe.unet, lambda: (pipe.vae, scheduler)


def _vae_and_scheduler(root: Path, flow: bool):
    """The folder's VAE (safetensors) and its noise schedule as the trainers use it: DDPM for a UNet, flow matching
    for a transformer."""
    from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler

    schedule = FlowMatchEulerDiscreteScheduler if flow else DDPMScheduler
    try:
        vae = AutoencoderKL.from_pretrained(str(root / "vae"), local_files_only=True, use_safetensors=True)
        scheduler = schedule.from_pretrained(str(root), subfolder="scheduler", local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any loader failure is unusable input, reported in one line
        raise AuditError(f"--base {root}: the behavioural check needs vae/ and scheduler/ ({_first_line(exc)})"
                         ) from None
    return vae, scheduler


def _denoising(base: BaseModel, root: Path, parts, clip_skip: int | None):
    """The base as its training objective: a UNet's (``behaviour.unet``) or a Flux/SD3 transformer's (``.flow``,
    the transformer loaded whole first)."""
    vae, scheduler = parts()
    if base.family in ("flux", "sd3"):
        from concept_exclusion.audit.behaviour.flow import FlowDenoising

        if base.fill is not None:
            base.use_denoiser(_whole_transformer(root))
        return FlowDenoising(base.denoiser, vae, scheduler, base.text_encoders(clip_skip))
    from concept_exclusion.audit.behaviour.unet import UNetDenoising

    return UNetDenoising(base.denoiser, vae, scheduler, base.text_encoders(clip_skip))


def _whole_transformer(root: Path):
    """The transformer with its weights, from safetensors."""
    try:
        return model_class(root / "transformer").from_pretrained(str(root / "transformer"), local_files_only=True,
                                                                 use_safetensors=True)
    except Exception as exc:  # noqa: BLE001 - any loader failure is unusable input, reported in one line
        raise AuditError(f"--base {root}: cannot load the transformer from safetensors ({_first_line(exc)})"
                         ) from None


def clip_skips(base: BaseModel, requested: int | None) -> tuple[int | None, ...]:
    """The clip_skip values to check: the one asked for (validated), the family's fixed layer (SDXL, SD3:
    penultimate; Flux: T5, none), or both plausible values 1 and 2 for SD1/2 (the worst counts)."""
    if base.family == "flux":
        if requested not in (None, 1):
            raise AuditError(f"--clip-skip {requested}: Flux reads T5's last states; clip_skip does not apply")
        return (None,)
    if requested is not None:
        if not 1 <= requested <= base.depth:
            raise AuditError(f"--clip-skip {requested}: must be 1 to {base.depth} (the base text encoder's "
                             f"layers; 1 = last, 2 = penultimate)")
        return (requested,)
    if base.family != "single":
        return (FAMILIES[base.family].clip_skip,)
    return (1, 2) if base.depth >= 2 else (1,)
