"""A diffusers model folder (``transformer/``) read as the weight check needs it: the model built from its config
without weights, and a layer's weights read from the folder's safetensors when asked for.

Why: the weight check reads the few layers that take the text encoders' output (Flux's ``context_embedder`` and
pooled-text embedder: megabytes), while FLUX.1-dev's transformer is 24 GB in bf16. Invariants: tensors are read
with ``safetensors`` only (one file, or the shards an ``.index.json`` names), in the checkpoint's dtype, each at
most once; a missing folder, config or tensor is one ``ModelFolderError`` line naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from concept_exclusion.errors import ModelFolderError

WEIGHTS = "diffusion_pytorch_model.safetensors"


def model_class(folder: Path):
    """The diffusers class a model folder's ``config.json`` names."""
    import diffusers

    try:
        name = json.loads((folder / "config.json").read_text(encoding="utf-8"))["_class_name"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelFolderError(f"{folder}: no readable config.json naming its model class") from None
    cls = getattr(diffusers, str(name), None)
    if cls is None:
        raise ModelFolderError(f"{folder}: config.json names {name!r}, which this diffusers does not have")
    return cls


def skeleton(folder: Path) -> nn.Module:
    """The folder's model built from its config on the meta device: every layer and shape, no weights."""
    cls = model_class(folder)
    with torch.device("meta"):
        return cls.from_config(cls.load_config(str(folder)))


class CheckpointTensors:
    """Reads a layer's parameters of ``net`` (a ``skeleton`` of ``folder``) from the folder's safetensors."""

    def __init__(self, folder: Path, net: nn.Module) -> None:
        index = folder / (WEIGHTS + ".index.json")
        if index.is_file():
            try:
                shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                self.files = {k: folder / v for k, v in shards.items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise ModelFolderError(f"{index}: not a readable shard index") from None
        else:
            self.files = None
        self.folder = folder
        self.paths = {id(m): name for name, m in net.named_modules()}

    def _file(self, key: str) -> Path:
        found = self.folder / WEIGHTS if self.files is None else self.files.get(key)
        if found is None or not found.is_file():
            raise ModelFolderError(f"{self.folder}: no safetensors file holds {key}")
        return found

    def __call__(self, module: nn.Module) -> None:
        """Give ``module`` its checkpoint weights (parameters still on the meta device only)."""
        from safetensors import safe_open

        path = self.paths.get(id(module))
        if path is None:
            return
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type != "meta":
                continue
            key = f"{path}.{name}" if path else name
            try:
                with safe_open(str(self._file(key)), framework="pt") as f:
                    tensor = f.get_tensor(key)
            except ModelFolderError:
                raise
            except Exception as exc:  # noqa: BLE001 - a damaged or foreign file is unusable input
                raise ModelFolderError(f"{self.folder}: cannot read {key} ({type(exc).__name__})") from None
            if tuple(tensor.shape) != tuple(param.shape):
                raise ModelFolderError(f"{self.folder}: {key} is {list(tensor.shape)}, its config says "
                                       f"{list(param.shape)}")
            setattr(module, name, nn.Parameter(tensor, requires_grad=False))
