"""The text side of a diffusers model folder or hub id: tokenizer(s) and frozen text encoder(s), SDXL's two.

Invariant: with ``local_files_only`` nothing is downloaded and a hub id is refused; encoder weights are
read from safetensors only (``use_safetensors=True``: a ``.bin`` is never unpickled); any loader failure
becomes one ``ModelFolderError`` line that names the source and the first line of its cause.
"""

from __future__ import annotations

from pathlib import Path

from concept_exclusion.errors import ModelFolderError


def _has_second_encoder(source: str, local_files_only: bool) -> bool:
    local = Path(source)
    if local.is_dir():
        return (local / "text_encoder_2").is_dir()
    if local_files_only:
        raise ModelFolderError(f"{source}: not a diffusers model folder")
    try:
        from huggingface_hub import file_exists

        return file_exists(source, "text_encoder_2/config.json")
    except Exception as exc:  # noqa: BLE001 - offline, no such repo, ...: reported in one line
        raise ModelFolderError(f"{source}: not a folder, and the hub cannot be asked "
                               f"({exc.__class__.__name__})") from None


def load_text_encoders(source: str | Path, local_files_only: bool = True) -> tuple[list, list]:
    """(tokenizers, text encoders in eval mode without gradients); two of each when ``text_encoder_2/`` exists."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    source = str(source)
    dual = _has_second_encoder(source, local_files_only)
    kwargs = {"local_files_only": local_files_only}
    weights = {**kwargs, "use_safetensors": True}
    try:
        toks = [CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)]
        encs = [CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **weights)]
        if dual:
            toks.append(CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kwargs))
            encs.append(CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", **weights))
    except Exception as exc:  # noqa: BLE001 - any loader failure is unusable input, reported in one line
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelFolderError(f"{source}: cannot load tokenizer/text_encoder ({first})") from None
    return toks, [e.eval().requires_grad_(False) for e in encs]
