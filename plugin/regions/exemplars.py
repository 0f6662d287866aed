"""Reading a preset's exemplar images: each file is found beside the preset (or inside the package for a shipped
preset), checked against its pinned sha256 before anything is decoded, and decoded as an image only
(``regions.images.decode_image``: PNG, JPEG, WebP or BMP, by Pillow, never unpickled)."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path, PurePosixPath

import torch

from concept_exclusion.concept.exemplars import ExemplarFile
from concept_exclusion.concept.preset import Preset
from concept_exclusion.errors import PresetError
from concept_exclusion.regions.images import decode_image

MAX_EXEMPLAR_BYTES = 20_000_000
MAX_EXEMPLAR_SIDE = 4096


def exemplar_path(preset: Preset, item: ExemplarFile):
    """Where ``item`` lives: beside the preset file, or inside the package for a shipped preset."""
    if preset.source.startswith("<shipped preset "):
        return resources.files("concept_exclusion.presets").joinpath(*PurePosixPath(item.path).parts)
    if preset.source.startswith("<"):
        raise PresetError(f"{preset.source}: exemplars.files: {item.path}: a preset parsed from a string has no "
                          "folder to read exemplars from; load it from its file")
    return Path(preset.source).parent.joinpath(*PurePosixPath(item.path).parts)


def read_exemplar(data: bytes, item: ExemplarFile, where: str) -> torch.Tensor:
    """``data`` checked against ``item``'s sha256 and decoded as an RGB image: float32 [3, h, w] in [-1, 1]."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != item.sha256:
        raise PresetError(f"{where}: sha256 is {digest}, the preset pins {item.sha256}: not the file the preset names")
    return decode_image(data, where, PresetError, MAX_EXEMPLAR_SIDE)


def exemplar_images(preset: Preset) -> list[torch.Tensor]:
    """The preset's exemplars as float32 [3, h, w] tensors in [-1, 1]; ``PresetError`` when it lists none, or one
    is missing, too large, altered or not an image."""
    if preset.exemplars is None:
        raise PresetError(f"{preset.source}: the preset lists no exemplars ([exemplars] files = [...]); add images "
                          "of the concept with their sha256")
    out = []
    for i, item in enumerate(preset.exemplars.files):
        where = f"{preset.source}: exemplars.files[{i}] ({item.path})"
        path = exemplar_path(preset, item)
        try:
            if not path.is_file():
                raise PresetError(f"{where}: no such file")
            with path.open("rb") as fh:
                data = fh.read(MAX_EXEMPLAR_BYTES + 1)  # never more than the limit in memory
        except OSError as exc:
            raise PresetError(f"{where}: cannot read ({exc.strerror or exc})") from None
        if len(data) > MAX_EXEMPLAR_BYTES:
            raise PresetError(f"{where}: larger than {MAX_EXEMPLAR_BYTES} bytes, the most an exemplar may be")
        out.append(read_exemplar(data, item, where))
    return out
