"""A preset that asks for output preservation (a change to the loss) gets the same one warning from every integration
that cannot change the loss itself, naming the integration and the remedy; none skips it silently."""

from __future__ import annotations

import logging

import torch
from peft import LoraConfig

from concept_exclusion.integrations import kohya
from concept_exclusion.integrations.diffusers import attach_exclusion
from helpers import make_preset

LEAD = "the preset asks for output_preservation='base', a change to the training loss that "


def _preserving_preset(tmp_path):
    path = tmp_path / "preserving.toml"
    path.write_text(make_preset().toml_text + '\noutput_preservation = "base"\n', encoding="utf-8")
    return path


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "concept_exclusion.preservation" and r.levelno == logging.WARNING]


def test_diffusers_helper_and_kohya_module_warn_alike(sd, tmp_path, caplog):
    preset = _preserving_preset(tmp_path)
    unet = sd.unet().requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_v"]))
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-3)
    with caplog.at_level(logging.WARNING):
        attach_exclusion(unet, preset, sd.tokenizer, sd.text_encoder, optimizer=optimizer, clip_skip=1)
        kohya.create_network(1.0, 4, 1.0, None, sd.text_encoder, sd.unet(), concept_tokenizer=str(sd.root),
                             concept_preset=str(preset), base_network="lycoris.kohya", preset="attn-mlp", dropout=None)
    diffusers_says, kohya_says = _warnings(caplog)
    assert diffusers_says.startswith(LEAD + "attach_exclusion does not make") and "OutputPreservation" in diffusers_says
    assert kohya_says.startswith(LEAD + "an sd-scripts network module does not make") and "docs/kohya.md" in kohya_says


def test_no_warning_when_the_preset_keeps_the_loss(sd, tmp_path, caplog):
    path = tmp_path / "plain.toml"
    path.write_text(make_preset().toml_text, encoding="utf-8")
    unet = sd.unet().requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_v"]))
    with caplog.at_level(logging.WARNING):
        attach_exclusion(unet, path, sd.tokenizer, sd.text_encoder, clip_skip=1)
    assert not _warnings(caplog)
