"""The trusted base model an audit re-encodes the preset with: a diffusers folder or a single-file checkpoint.

SD1.x/2.x and SDXL (``unet/``), and Flux and SD3 folders (``transformer/``, read as a pipeline with its
CLIP and T5 encoders). kohya/BFL spellings of the Flux/SD3 text readers (``txt_in``, ``vector_in.in_layer``,
``y_embedder.mlp.0``) are found under diffusers' names.

Invariants: nothing is downloaded (``local_files_only``); weights are read from safetensors only
(``use_safetensors=True``; a single file must be ``.safetensors``), so no pickle is ever loaded;
any loader failure is one ``AuditError`` line naming the source.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from concept_exclusion.concept.encoders import FAMILIES, TextEncoders, family_of, is_clip
from concept_exclusion.concept.model_folder import load_text_encoders
from concept_exclusion.errors import AuditError, ModelFolderError
from concept_exclusion.lora.file import sgm_to_diffusers


_DIT_ALIASES = {"lora_unet_txt_in": "lora_unet_context_embedder",
                "lora_unet_vector_in_in_layer": "lora_unet_time_text_embed_text_embedder_linear_1",
                "lora_unet_y_embedder_mlp_0": "lora_unet_time_text_embed_text_embedder_linear_1"}


@dataclass
class BaseModel:
    """Tokenizer(s), frozen text encoder(s) and denoiser of the trusted base, its layers by kohya name."""

    source: str
    kind: str  # "diffusers folder" | "single file"
    tokenizers: list
    encoders: list
    denoiser: torch.nn.Module  # UNet (SD1/2, SDXL) or transformer (Flux, SD3)
    modules: dict[str, torch.nn.Module]
    layers_per_block: int | None  # UNets only (SAI names)
    family: str  # encoders.FAMILIES name

    @property
    def depth(self) -> int:
        """Layers of the first CLIP encoder: the largest clip_skip that selects a layer (0: no CLIP reads states)."""
        clip = [e for e in self.encoders if is_clip(e)]
        return int(clip[0].config.num_hidden_layers) if clip else 0

    def text_encoders(self, clip_skip: int | None) -> TextEncoders:
        return TextEncoders(self.tokenizers, self.encoders, clip_skip, family=self.family)

    def module(self, key: str) -> torch.nn.Module | None:
        """The denoiser layer a kohya-spelled key names (diffusers, SAI or BFL paths)."""
        key = _DIT_ALIASES.get(key, key)
        found = self.modules.get(key)
        if found is None and self.layers_per_block is not None:
            found = self.modules.get(sgm_to_diffusers(key, self.layers_per_block))
        return found


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0][:300] if text.strip() else type(exc).__name__


def load_base(source: str | Path, base_config: str | Path | None = None) -> BaseModel:
    """A diffusers folder (``tokenizer/``, ``text_encoder/``, ``unet/``) or a ``.safetensors`` single file
    (kohya/A1111 layout; needs ``base_config``, a diffusers folder with the component configs)."""
    root = Path(source)
    if root.is_file():
        toks, encs, net = _single_file(root, base_config)
        kind = "single file"
    elif root.is_dir() and (root / "transformer").is_dir() and not (root / "unet").is_dir():
        toks, encs, net = _dit_folder(root)
        kind = "diffusers folder"
    elif root.is_dir():
        if not all((root / d).is_dir() for d in ("tokenizer", "text_encoder", "unet")):
            raise AuditError(f"--base {root}: not a diffusers model folder (needs tokenizer/, text_encoder/ and "
                             f"unet/, or transformer/) nor a .safetensors checkpoint")
        toks, encs, net = _folder(root)
        kind = "diffusers folder"
    else:
        raise AuditError(f"--base {root}: no such folder or file")
    net = net.eval().requires_grad_(False)
    modules = {"lora_unet_" + n.replace(".", "_"): m for n, m in net.named_modules() if n}
    lpb = getattr(net.config, "layers_per_block", None)
    lpb = lpb[0] if isinstance(lpb, (list, tuple)) else lpb
    family = family_of(encs)
    return BaseModel(str(root), kind, list(toks), list(encs), net, modules, None if lpb is None else int(lpb), family)


def _dit_folder(root: Path):
    """A Flux or SD3 pipeline folder: its tokenizers and encoders in pipeline order, and its transformer."""
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(str(root), local_files_only=True, use_safetensors=True)
    except Exception as exc:  # noqa: BLE001 - any loader failure is unusable input, reported in one line
        raise AuditError(f"--base {root}: cannot load the pipeline from safetensors ({_first_line(exc)})") from None
    toks, encs = [], []
    for suffix in ("", "_2", "_3"):
        enc, tok = getattr(pipe, "text_encoder" + suffix, None), getattr(pipe, "tokenizer" + suffix, None)
        if enc is not None and tok is not None:
            toks.append(tok)
            encs.append(enc.eval().requires_grad_(False))
    if not encs or getattr(pipe, "transformer", None) is None:
        raise AuditError(f"--base {root}: a {type(pipe).__name__} without text encoders or transformer")
    return toks, encs, pipe.transformer


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
    toks = [pipe.tokenizer] + ([pipe.tokenizer_2] if xl else [])
    encs = [pipe.text_encoder] + ([pipe.text_encoder_2] if xl else [])
    return toks, [e.eval().requires_grad_(False) for e in encs], pipe.unet


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
