"""A preset that asks for a change to the loss (output preservation, exemplar regions) gets the same one warning
per change from every integration that cannot change the loss itself, naming the integration and the remedy; none
skips it silently, and kohya's --masked_loss (the remedy for regions) silences the regions warning."""

from __future__ import annotations

import argparse
import hashlib
import logging

import torch
from peft import LoraConfig
from PIL import Image

from concept_exclusion.integrations import kohya
from concept_exclusion.integrations.diffusers import attach_exclusion
from helpers import make_preset

LEAD = "the preset asks for output_preservation='base', a change to the training loss that "
REGIONS = "the preset asks for exemplar regions (region='ignore'), a change to the training loss that "


def _preset(tmp_path, preserve: bool = True, exemplars: bool = False):
    path = tmp_path / "changing.toml"
    text = make_preset().toml_text + ('\noutput_preservation = "base"\n' if preserve else "")
    if exemplars:
        Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "logo.png")
        digest = hashlib.sha256((tmp_path / "logo.png").read_bytes()).hexdigest()
        text += f'\n[exemplars]\nfiles = [{{ path = "logo.png", sha256 = "{digest}" }}]\n'
    path.write_text(text, encoding="utf-8")
    return path


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "concept_exclusion.loss_changes" and r.levelno == logging.WARNING]


def _network(sd, preset):
    return kohya.create_network(1.0, 4, 1.0, None, sd.text_encoder, sd.unet(), concept_tokenizer=str(sd.root),
                                concept_preset=str(preset), base_network="lycoris.kohya", preset="attn-mlp",
                                dropout=None)


def test_diffusers_helper_and_kohya_module_warn_alike(sd, tmp_path, caplog):
    preset = _preset(tmp_path)
    unet = sd.unet().requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_v"]))
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-3)
    with caplog.at_level(logging.WARNING):
        attach_exclusion(unet, preset, sd.tokenizer, sd.text_encoder, optimizer=optimizer, clip_skip=1)
        _network(sd, preset)
    diffusers_says, kohya_says = _warnings(caplog)
    assert diffusers_says.startswith(LEAD + "attach_exclusion does not make") and "OutputPreservation" in diffusers_says
    assert kohya_says.startswith(LEAD + "an sd-scripts network module does not make") and "docs/kohya.md" in kohya_says


def test_exemplar_regions_are_named_with_their_remedy_until_kohya_masks_the_loss(sd, tmp_path, caplog):
    preset = _preset(tmp_path, preserve=False, exemplars=True)
    unet = sd.unet().requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_v"]))
    with caplog.at_level(logging.WARNING):
        attach_exclusion(unet, preset, sd.tokenizer, sd.text_encoder, clip_skip=1)
    (says,) = _warnings(caplog)
    assert says.startswith(REGIONS + "attach_exclusion does not make") and "region_loss(" in says
    caplog.clear()
    net = _network(sd, preset)
    with caplog.at_level(logging.WARNING):
        net.prepare_network(argparse.Namespace(clip_skip=None, save_model_as="safetensors", masked_loss=False))
    (says,) = _warnings(caplog)
    assert says.startswith(REGIONS + "sd-scripts without --masked_loss") and "concept-exclusion masks" in says
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        net.prepare_network(argparse.Namespace(clip_skip=None, save_model_as="safetensors", masked_loss=True))
    assert not _warnings(caplog)
    net.apply_to(sd.text_encoder, net.unet, False, True)
    assert net.provenance()["concept_exclusion.masked_loss"] == "true"  # recorded in the file sd-scripts saves


def test_no_warning_when_the_preset_keeps_the_loss(sd, tmp_path, caplog):
    path = _preset(tmp_path, preserve=False)
    unet = sd.unet().requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_v"]))
    with caplog.at_level(logging.WARNING):
        attach_exclusion(unet, path, sd.tokenizer, sd.text_encoder, clip_skip=1)
        _network(sd, path).prepare_network(argparse.Namespace(clip_skip=None, save_model_as="safetensors"))
    assert not _warnings(caplog)
