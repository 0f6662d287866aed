"""Layers the constraint leaves no freedom (every head of to_q/to_out at a basis rank >= head width) are warned
about at attach, recorded in the file's metadata and shown by audit."""

from __future__ import annotations

import json
import logging

from concept_exclusion.metadata import PREFIX
from helpers import make_preset
from helpers.models import attention_lora_exclusion


def test_frozen_layers_are_warned_recorded_and_audited(sd, caplog, tmp_path, capsys):
    with caplog.at_level(logging.WARNING, logger="concept_exclusion.exclusion"):
        unet, exclusion = attention_lora_exclusion(sd)
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
