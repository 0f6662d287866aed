"""The trusted base model an audit re-encodes the preset with: a diffusers folder or a single-file checkpoint.

Invariants: nothing is downloaded (``local_files_only``); weights are read from safetensors only
(``use_safetensors=True``; a single file must be ``.safetensors``), so no pickle is ever loaded;
any loader failure is one ``AuditError`` line naming the source.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .embeddings import TextEncoders
from .errors import AuditError, ModelFolderError
from .lora_file import sgm_to_diffusers
from .model_folder import load_text_encoders


@dataclass
class BaseModel:
    """Tokenizer(s), frozen text encoder(s) and UNet of the trusted base, with the UNet's layers by kohya name."""

    source: str
    kind: str  # "diffusers folder" | "single file"
    tokenizers: list
    encoders: list
    unet: torch.nn.Module
    modules: dict[str, torch.nn.Module]
    layers_per_block: int

    @property
    def dual(self) -> bool:
        return len(self.encoders) == 2

    @property
    def depth(self) -> int:
        """The number of layers of the (first) text encoder: the largest clip_skip that selects a layer."""
        return int(self.encoders[0].config.num_hidden_layers)

    def text_encoders(self, clip_skip: int | None) -> TextEncoders:
        return TextEncoders(self.tokenizers, self.encoders, clip_skip, dual=self.dual)

    def module(self, key: str) -> torch.nn.Module | None:
        """The UNet layer a kohya-spelled key names (diffusers or SAI paths)."""
        return self.modules.get(key) or self.modules.get(sgm_to_diffusers(key, self.layers_per_block))


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0][:300] if text.strip() else type(exc).__name__


def load_base(source: str | Path, base_config: str | Path | None = None) -> BaseModel:
    """A diffusers folder (``tokenizer/``, ``text_encoder/``, ``unet/``) or a ``.safetensors`` single file
    (kohya/A1111 layout; needs ``base_config``, a diffusers folder with the component configs)."""
    root = Path(source)
    if root.is_file():
        toks, encs, unet = _single_file(root, base_config)
        kind = "single file"
    elif root.is_dir():
        if not all((root / d).is_dir() for d in ("tokenizer", "text_encoder", "unet")):
            raise AuditError(f"--base {root}: not a diffusers model folder (needs tokenizer/, text_encoder/ and "
                             f"unet/) nor a .safetensors checkpoint")
        toks, encs, unet = _folder(root)
        kind = "diffusers folder"
    else:
        raise AuditError(f"--base {root}: no such folder or file")
    unet = unet.eval().requires_grad_(False)
    modules = {"lora_unet_" + n.replace(".", "_"): m for n, m in unet.named_modules() if n}
    lpb = unet.config.layers_per_block
    lpb = lpb[0] if isinstance(lpb, (list, tuple)) else lpb
    return BaseModel(str(root), kind, list(toks), list(encs), unet, modules, int(lpb))


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

    from .safeio import read_header

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
        pipe = cls.from_single_file(str(path), config=str(base_config), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any loader failure is unusable input, reported in one line
        raise AuditError(f"--base {path}: cannot load the checkpoint ({_first_line(exc)})") from None
    toks = [pipe.tokenizer] + ([pipe.tokenizer_2] if xl else [])
    encs = [pipe.text_encoder] + ([pipe.text_encoder_2] if xl else [])
    return toks, [e.eval().requires_grad_(False) for e in encs], pipe.unet


def clip_skips(base: BaseModel, requested: int | None) -> tuple[int, ...]:
    """The clip_skip values to check: the one asked for (validated), SDXL's penultimate, or 1 and 2 for SD1/2."""
    if requested is not None:
        if not 1 <= requested <= base.depth:
            raise AuditError(f"--clip-skip {requested}: must be 1 to {base.depth} (the base text encoder's "
                             f"layers; 1 = last, 2 = penultimate)")
        return (requested,)
    if base.dual:
        return (2,)
    return (1, 2) if base.depth >= 2 else (1,)
