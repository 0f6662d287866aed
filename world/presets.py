"""The world's presets, read through the core's public ``load_preset`` (shipped in ``concept_exclusion.presets``)."""

from __future__ import annotations

from dataclasses import replace

from concept_exclusion import Preset, load_preset


def world_preset(name: str = "world-panda", tokens: str | None = None) -> Preset:
    """A shipped preset, with ``[projection].tokens`` replaced when ``tokens`` is given."""
    preset = load_preset(name)
    if tokens is None:
        return preset
    return replace(preset, projection=replace(preset.projection, tokens=tokens))
