"""What real trainers showed (issue 14): layers the constraint freezes are warned about, recorded and shown by
audit; kohya refuses a text encoder that would train right after create_network; diffusers'
``--checkpointing_steps`` checkpoints carry our metadata and resuming restores the step count."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig

from concept_exclusion import ConceptExclusion, ConceptSubspace
from concept_exclusion.metadata import PREFIX
from concept_exclusion.safeio import read_header, write_safetensors

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_preset  # noqa: E402


def _attached(sd, caplog):
    unet = sd.unet().requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    subspace = ConceptSubspace.from_text_encoder(make_preset(targets='["attention"]'), sd.tokenizer, sd.text_encoder)
    with caplog.at_level(logging.WARNING, logger="concept_exclusion.exclusion"):
        exclusion = ConceptExclusion.attach(unet, subspace)
    return unet, exclusion


def test_frozen_layers_are_warned_recorded_and_audited(sd, caplog, tmp_path, capsys):
    unet, exclusion = _attached(sd, caplog)
    assert exclusion.frozen_layers and all(n.endswith(("to_q", "to_out.0")) for n in exclusion.frozen_layers)
    warned = [r.getMessage() for r in caplog.records if "get no change at all" in r.getMessage()]
    assert warned and exclusion.frozen_layers[0] in warned[0]
    recorded = json.loads(exclusion.metadata()[PREFIX + "frozen_layers"])
    assert recorded == list(exclusion.frozen_layers)
    from concept_exclusion.integrations.diffusers import save_lora

    path = save_lora(unet, tmp_path / "lora.safetensors", exclusion, format="kohya")
    preset = tmp_path / "p.toml"
    preset.write_text(make_preset(targets='["attention"]').toml_text)
    from concept_exclusion.commands.main import main

    capsys.readouterr()
    rc = main(["audit", str(path), "--preset", str(preset), "--base", str(sd.root), "--clip-skip", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "heads frozen by the constraint" in out and "frozen_layers=" in out


def test_kohya_refuses_text_encoder_training_after_create_network():
    from concept_exclusion.errors import ConceptExclusionError
    from concept_exclusion.integrations.kohya import ConceptExclusionNetwork

    stand_in = SimpleNamespace(settings={})
    with pytest.raises(ConceptExclusionError, match="--network_train_unet_only"):
        ConceptExclusionNetwork.prepare_network(stand_in, SimpleNamespace(network_train_unet_only=False))


def test_diffusers_checkpoints_carry_metadata_and_resume_the_step_count(sd, caplog, tmp_path):
    from accelerate import Accelerator

    from concept_exclusion.integrations.diffusers import checkpoint_hooks

    unet, exclusion = _attached(sd, caplog)
    accelerator = Accelerator(cpu=True)

    def script_hook(models, weights, output_dir):  # what train_text_to_image_lora.py's save_model_hook does
        write_safetensors(Path(output_dir) / "pytorch_lora_weights.safetensors", {"w": torch.zeros(1)},
                          {"format": "pt"})

    accelerator.register_save_state_pre_hook(script_hook)
    checkpoint_hooks(accelerator, exclusion)
    exclusion.steps = 12
    accelerator.save_state(str(tmp_path / "checkpoint-12"))
    meta = read_header(tmp_path / "checkpoint-12" / "pytorch_lora_weights.safetensors")[1]
    assert meta["format"] == "pt" and meta[PREFIX + "steps"] == "12" and PREFIX + "basis.context" in meta
    exclusion.steps = 0
    accelerator.load_state(str(tmp_path / "checkpoint-12"))
    assert exclusion.steps == 12
