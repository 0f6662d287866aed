"""Running the behavioural check from the audit's trusted inputs: which images, which clip_skip values, what it
cannot run on.

Invariant: the check runs only on a trusted preset and base (never on what the file claims); where it cannot run,
the reason is a note on the report and the weight check's verdict stands alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from concept_exclusion.audit.base_model import BaseModel
from concept_exclusion.audit.behaviour.check import BehaviourConfig, Probe, check_behaviour
from concept_exclusion.audit.behaviour.denoising import DenoisingBase
from concept_exclusion.audit.behaviour.images import (folder_probe, image_files, preset_probe, read_folder,
                                                      require_comparison)
from concept_exclusion.audit.behaviour.report import BehaviourReport
from concept_exclusion.concept.preset import Preset
from concept_exclusion.errors import AuditError
from concept_exclusion.lora.file import LoraFile


@dataclass(frozen=True)
class BehaviourOptions:
    """What the user asked of the behavioural check: ``enabled`` False skips it; ``exemplars``/``controls``: image
    folders (default: the preset's exemplars, the rest of each image)."""

    enabled: bool = True
    exemplars: str | None = None
    controls: str | None = None
    max_images: int = 16
    resolution: int | None = None  # the image side in pixels (default: the one the base trains at)
    config: BehaviourConfig = BehaviourConfig()


def check_inputs(options: BehaviourOptions, preset: Preset | None) -> None:
    """Refuse, before any model is loaded, a missing or image-less ``--exemplars``/``--controls`` folder, and
    exemplar images that nothing could be compared against (no ``--controls``, no exemplars in the preset)."""
    if not options.enabled:
        return
    for flag, folder in (("--exemplars", options.exemplars), ("--controls", options.controls)):
        if folder is not None:
            image_files(folder, options.max_images, flag)
    if preset is not None and options.exemplars is not None:
        require_comparison(preset, has_controls=options.controls is not None)


def why_not(options: BehaviourOptions, preset: Preset | None, base: BaseModel | None) -> str:
    """Why the behavioural check does not run ("" when it does)."""
    if not options.enabled:
        return "behavioural check not run (--no-behaviour)"
    if base is None or preset is None:
        return "behavioural check not run: it needs --base and --preset"
    if base.denoising is None:
        return ("behavioural check not available for this base (it gives no training objective); the weight check "
                "stands alone")
    if options.exemplars is None and preset.exemplars is None:
        return "behavioural check not run: the preset lists no exemplars of the concept; give --exemplars DIR"
    return ""


def audit_behaviour(lora: LoraFile, preset: Preset, base: BaseModel, clip_skips: tuple[int | None, ...],
                    options: BehaviourOptions, progress: bool = True) -> BehaviourReport:
    """The check at every clip_skip the weight check used; the report with the largest figure counts."""
    models = [base.denoising(skip) for skip in clip_skips or (None,)]
    for model in models:
        model.resolution = _side(model, options.resolution)
    probe = _probe(preset, options, models[0].resolution)  # read and located once: every clip_skip sees the same
    reports = []
    for skip, model in zip(clip_skips or (None,), models):
        report = check_behaviour(lora, base, model, preset, probe, options.config, progress)
        if len(clip_skips) > 1:
            report.notes.append(f"measured at clip_skip {skip} (the largest figure over {len(clip_skips)} values "
                                "counts)")
        reports.append(report)
    return max(reports, key=lambda r: r.largest[1].value)


def _side(model: DenoisingBase, asked: int | None) -> int:
    """The image side the check runs at: ``asked`` where the model can run at it, else its training resolution."""
    if asked is None or asked == model.resolution:
        return model.resolution
    if model.multiple is None:
        raise AuditError(f"--resolution {asked}: this base runs at {model.resolution} px only")
    if asked % model.multiple:
        raise AuditError(f"--resolution {asked}: must be a multiple of {model.multiple} px for this base (it trains "
                         f"at {model.resolution})")
    return asked


def _probe(preset: Preset, options: BehaviourOptions, resolution: int) -> Probe:
    """The images the check runs on: ``--exemplars`` (and ``--controls``), else the preset's exemplars on canvases."""
    if options.exemplars is None:
        return preset_probe(preset, resolution, options.max_images, options.config.seed)
    images = read_folder(options.exemplars, options.max_images, "--exemplars")
    controls = None if options.controls is None else read_folder(options.controls, options.max_images, "--controls")
    return folder_probe(preset, images, controls, resolution, f"{len(images)} image(s) from {options.exemplars}")
