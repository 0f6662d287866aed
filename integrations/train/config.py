"""``concept-exclusion train`` settings: the flags, a TOML ``--config`` file merged under them, validation.

Invariant: a run's settings come from flags, then the config file, then the defaults, in that order of
precedence; every value is checked here, so a bad setting fails with one line before anything loads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from concept_exclusion.concept.preset import MODES, OUTPUT_PRESERVATION
from concept_exclusion.errors import ConceptExclusionError
from concept_exclusion.model.roles import target_sets
from concept_exclusion.options import parse_bool

from concept_exclusion.integrations.train.model import LORA_TARGETS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def boolean(value: Any) -> bool:
    """``true``/``false`` (also 1/0, yes/no, on/off) from a flag, or a TOML boolean as it is."""
    return parse_bool(value)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every flag; a TOML ``--config`` file uses the same names as keys (flags override the file)."""
    g = p.add_argument_group("inputs")
    g.add_argument("--config", help="TOML file whose keys are these flags' names (flags given here override it)")
    g.add_argument("--base", help="base model: a diffusers folder, a single .safetensors checkpoint, or a hub id")
    g.add_argument("--base_config", help="for a single-file --base: a diffusers folder (or hub id) with the "
                                         "component configs, so nothing is downloaded")
    g.add_argument("--local_files_only", action="store_true", help="never contact the hub")
    g.add_argument("--data", help="folder of images with same-name .txt captions (kohya convention)")
    g.add_argument("--preset", help="preset to exclude: a .toml file or a shipped preset name")
    g = p.add_argument_group("outputs")
    g.add_argument("--output", default="concept-exclusion-output", help="output folder (LoRA, samples, log, "
                                                                        "checkpoints)")
    g.add_argument("--output_name", default="lora", help="LoRA file name without .safetensors")
    g.add_argument("--format", default="kohya", choices=("kohya", "diffusers"), help="LoRA layout")
    g.add_argument("--save_dtype", default="float32", choices=tuple(SAVE_DTYPES), help="dtype of the saved LoRA")
    g.add_argument("--sample_prompt", dest="sample_prompts", action="append", default=None,
                   help="prompt for a sample image at the end (repeatable; default: the first caption and the "
                        "preset's first concept prompt)")
    g.add_argument("--sample_steps", type=int, default=20, help="inference steps per sample (0: no samples)")
    g.add_argument("--sample_guidance", type=float, default=7.5, help="classifier-free guidance of the samples")
    g.add_argument("--log_every", type=int, default=10, help="steps between leakage measurements / log lines")
    g = p.add_argument_group("training")
    g.add_argument("--resolution", type=int, default=512, help="square training resolution (center crop)")
    g.add_argument("--batch_size", type=int, default=1, help="images per micro-batch and process")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--max_steps", type=int, default=1000, help="optimizer steps")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="linear warm-up, then constant")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the (projected) gradient; 0: off")
    g.add_argument("--rank", type=int, default=16, help="LoRA rank")
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    g.add_argument("--lora_targets", default="cross_attention", help=f"{', '.join(LORA_TARGETS)} or a PEFT regex")
    g.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"))
    g.add_argument("--seed", type=int, default=0, help="seeds LoRA init, data order, noise and timesteps")
    g.add_argument("--caption_dropout", type=float, default=0.0, help="share of captions replaced by ''")
    g = p.add_argument_group("exclusion")
    g.add_argument("--mode", default=None, choices=MODES, help="default: the preset's")
    g.add_argument("--strength", type=float, default=None, help="gradient mode only (0..1)")
    g.add_argument("--targets", default=None, help=f"comma-separated target sets ({', '.join(target_sets())}); "
                                                   f"default: the preset's")
    g.add_argument("--project_context", default=None, type=boolean, metavar="{true,false}",
                   help="also project the text states the UNet reads in training passes (default: the preset's)")
    g.add_argument("--output_preservation", default=None, choices=OUTPUT_PRESERVATION,
                   help="captions naming the concept teach the image through the caption without the name, and the "
                        "name is pulled to that prediction (scrub) or to the frozen base's (base); default: the preset's")
    g.add_argument("--regions", default="preset", choices=("preset", "ignore", "base", "off"),
                   help="the concept's region in each image, found from the preset's exemplars whatever the caption "
                        "says: learn nothing there (ignore) or the frozen base's prediction (base); preset: the "
                        "preset's [exemplars] region when it lists exemplars (or a --segmenter is given), else off")
    g.add_argument("--segmenter", default=None, help="find the concept with this local CLIPSeg folder (prompted with "
                                                     "the preset's names and exemplars) instead of template matching")
    g.add_argument("--segmenter_threshold", type=float, default=0.5,
                   help="the segmenter's probability that marks a pixel as the concept's")
    g.add_argument("--clip_skip", type=int, default=None, help="kohya-style (1 = last layer, 2 = penultimate)")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint_every", type=int, default=0, help="write a checkpoint every N steps (0: never)")
    g.add_argument("--keep_checkpoints", type=int, default=3, help="keep the newest N checkpoints (0: all)")
    g.add_argument("--resume", default=None, help="a checkpoint file, or a folder (the output folder or its "
                                                  "checkpoints/) whose newest checkpoint is used")


REQUIRED = ("base", "data", "preset")


def resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Merge ``--config``: file values replace defaults, flags given on the command line win."""
    parser = parser or getattr(args, "_train_parser", None)
    if args.config:
        path = Path(args.config)
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConceptExclusionError(f"{path}: cannot read config ({exc.strerror or exc})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConceptExclusionError(f"{path}: invalid TOML: {exc}") from None
        actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
        for key, value in doc.items():
            if key not in actions:
                raise ConceptExclusionError(f"{path}: {key}: unknown key (keys are the flags' names, e.g. max_steps)")
            action = actions[key]
            if getattr(args, key) != action.default:
                continue  # given on the command line
            setattr(args, key, _config_value(path, key, value, action))
    missing = [k for k in REQUIRED if not getattr(args, k, None)]
    if missing:
        raise ConceptExclusionError(f"train: --{missing[0]} is required (on the command line or in --config)")
    _validate(args)
    return args


def _config_value(path: Path, key: str, value: Any, action: argparse.Action) -> Any:
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise ConceptExclusionError(f"{path}: {key}: must be true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConceptExclusionError(f"{path}: {key}: must be an array of strings")
        return list(value)
    if isinstance(value, (dict, list)):
        raise ConceptExclusionError(f"{path}: {key}: must be a single value, got {type(value).__name__}")
    kind = action.type or str
    try:
        value = kind(value) if not (kind is int and isinstance(value, float)) else int(str(value))
    except (TypeError, ValueError):
        raise ConceptExclusionError(f"{path}: {key}: cannot be read as {kind.__name__}: {value!r}") from None
    if action.choices and value not in action.choices:
        raise ConceptExclusionError(f"{path}: {key}: must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


def _validate(args: argparse.Namespace) -> None:
    positive = ("resolution", "batch_size", "gradient_accumulation_steps", "max_steps", "rank", "log_every")
    for key in positive:
        if getattr(args, key) < 1:
            raise ConceptExclusionError(f"train: --{key} must be at least 1, got {getattr(args, key)}")
    for key in ("checkpoint_every", "keep_checkpoints", "sample_steps", "lr_warmup_steps"):
        if getattr(args, key) < 0:
            raise ConceptExclusionError(f"train: --{key} must not be negative, got {getattr(args, key)}")
    if not 0.0 <= args.caption_dropout <= 1.0:
        raise ConceptExclusionError(f"train: --caption_dropout must be in [0, 1], got {args.caption_dropout}")
    if args.targets:
        for t in args.targets.split(","):
            if t.strip() not in target_sets():
                raise ConceptExclusionError(f"train: --targets: unknown target set {t.strip()!r} "
                                            f"(known: {', '.join(target_sets())})")
