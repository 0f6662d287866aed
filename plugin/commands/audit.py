"""The ``audit`` and ``inspect`` commands: arguments, running, printing, exit codes.

Exit codes (also in the README, docs/audit.md and docs/kohya.md): 0 PASS, 1 FLAGGED, 2 unusable input (one line
on stderr), 3 UNVERIFIED, 4 internal error, 5 PASS-APPROXIMATE, 6 LEARNED (the behavioural check), 141 output pipe
closed early. Invariant:
``inspect`` and ``audit`` read files through the same validating reader (``safeio.read_header``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from concept_exclusion.audit.behaviour.check import BehaviourConfig
from concept_exclusion.audit.behaviour.run import BehaviourOptions
from concept_exclusion.audit.format import format_inspect, format_report
from concept_exclusion.audit.weights import DEFAULT_THRESHOLD, audit_file
from concept_exclusion.lora.file import layout_of
from concept_exclusion.metadata import PREFIX
from concept_exclusion.safeio import read_header

EXIT_HELP = ("exit codes: 0 PASS (and NOT LEARNED where the behavioural check ran), 1 FLAGGED, 2 unusable input, "
             "3 UNVERIFIED (no --base, something on a text-reading layer not measured, 0 layers checked, or the "
             "behavioural check could not apply the whole file), 4 internal error, 5 PASS-APPROXIMATE (text encoder "
             "trained), 6 LEARNED (the behavioural check: the file makes the base better at drawing the concept; "
             "whatever the weight verdict)")


def _threshold(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return v


def _count(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 10_000:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 10000, got {text!r}")
    return int(text)


def _clip_skip(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 3:
        raise argparse.ArgumentTypeError(f"must be a small positive integer, got {text!r}")
    return int(text)


def register_audit(subparsers) -> None:
    p = subparsers.add_parser(
        "audit", help="check a LoRA file for changes that act on a concept",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Report per layer the share of a LoRA's change that acts on the concept subspace "
                    "(||dW U||/||dW||), the subspace re-encoded from the trusted --preset with the trusted --base "
                    "model, and (behavioural check) whether the file makes the base better at drawing the concept. "
                    "The file's own basis, preset, clip_skip, T5 length and targets are claims, never inputs.",
        epilog=EXIT_HELP)
    p.add_argument("lora", help="LoRA .safetensors (kohya, diffusers, PEFT, LyCORIS, ai-toolkit, BFL; SD1/2, SDXL, "
                                "SD3, Flux)")
    p.add_argument("--preset", help="the trusted concept preset (.toml or shipped name)")
    p.add_argument("--base", help="the trusted base model: a local diffusers folder or a .safetensors checkpoint")
    p.add_argument("--base-config", help="for a single-file --base: a diffusers folder with the component configs")
    p.add_argument("--threshold", type=_threshold, default=DEFAULT_THRESHOLD,
                   help=f"largest allowed share per layer (default {DEFAULT_THRESHOLD})")
    p.add_argument("--targets", choices=("kv", "attention"),
                   help="which layers must pass: kv (keys, values, pooled) or attention (also queries/outputs); "
                        "default: the trusted preset's [projection] targets, else kv")
    p.add_argument("--clip-skip", type=_clip_skip,
                   help="the clip_skip the LoRA was trained with (default: SD1/2 checks 1 and 2, SDXL reads the "
                        "penultimate layer)")
    p.add_argument("--max-sequence-length", type=_count, metavar="N",
                   help="T5's length (Flux, SD3) the file was trained and is used with (kohya "
                        "--t5xxl_max_token_length, diffusers --max_sequence_length; default: the base tokenizer's)")
    b = p.add_argument_group("behavioural check", "what the file makes the base draw: on by default when the preset "
                             "lists exemplars of the concept or --exemplars is given; reported beside the weight check")
    b.add_argument("--exemplars", metavar="DIR", help="images of the concept (PNG/JPEG/WebP/BMP; brought to the "
                   "base's resolution); default: the preset's exemplars pasted onto plain canvases")
    b.add_argument("--controls", metavar="DIR", help="images without the concept to compare against (default: the "
                   "rest of each exemplar image, outside where the preset's exemplars find the concept)")
    b.add_argument("--no-behaviour", action="store_true", help="run the weight check only")
    b.add_argument("--behaviour-threshold", type=_threshold, default=BehaviourConfig.threshold,
                   help=f"largest figure a NOT LEARNED file may have (default {BehaviourConfig.threshold})")
    b.add_argument("--inversion-steps", type=_count, default=BehaviourConfig.inversion_steps,
                   help=f"the inversion attack's budget (default {BehaviourConfig.inversion_steps})")
    b.add_argument("--resolution", type=_count, metavar="PX",
                   help="image side the check runs at (default: the base's training resolution: SD1.5 512, SDXL, "
                        "SD3 and Flux 1024); check at the resolution the LoRA was trained at")
    b.add_argument("--max-images", type=_count, default=BehaviourOptions.max_images,
                   help=f"most exemplar (and control) images read (default {BehaviourOptions.max_images})")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_audit)


def run_audit(args: argparse.Namespace) -> int:
    config = replace(BehaviourConfig(), threshold=args.behaviour_threshold, inversion_steps=args.inversion_steps)
    behaviour = BehaviourOptions(enabled=not args.no_behaviour, exemplars=args.exemplars, controls=args.controls,
                                 max_images=args.max_images, resolution=args.resolution, config=config)
    report = audit_file(args.lora, preset_path=args.preset, base=args.base, base_config=args.base_config,
                        threshold=args.threshold, targets=args.targets, clip_skip=args.clip_skip,
                        sequence_length=args.max_sequence_length,
                        behaviour=behaviour, progress=sys.stderr.isatty())
    print(json.dumps(report.to_json(), indent=2) if args.json else format_report(report))
    return report.exit_code


def register_inspect(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="print a safetensors file's metadata readably",
                              description="Print the concept-exclusion provenance and the host trainer's "
                                          "metadata of a safetensors file (reads the header only).")
    p.add_argument("file", help=".safetensors file")
    p.add_argument("--json", action="store_true", help="print as JSON (basis blobs summarised)")
    p.set_defaults(func=run_inspect)


def _maybe_json(value: str) -> Any:
    """A JSON-valued claim parsed when it parses (bounded), else the string itself."""
    if len(value) > 100_000:
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        return value


def inspect_file(path: str | Path) -> dict[str, Any]:
    header, meta = read_header(path)
    ours: dict[str, Any] = {}
    for key, value in sorted(meta.items()):
        if not key.startswith(PREFIX):
            continue
        name = key[len(PREFIX):]
        if name.startswith("basis_shape."):
            continue
        if name.startswith("basis."):
            shape = meta.get(PREFIX + "basis_shape." + name[len("basis."):], "?")
            ours[name] = f"{shape} float16, {len(value)} base64 chars"
        elif name in ("ranks", "energy_kept", "targets", "leakage"):
            ours[name] = _maybe_json(value)
        else:
            ours[name] = value
    host = {k: v for k, v in sorted(meta.items()) if not k.startswith(PREFIX)}
    return {"file": str(path), "tensors": len(header), "layout": layout_of(sorted(header)), "concept_exclusion": ours,
            "host": host}


def run_inspect(args: argparse.Namespace) -> int:
    info = inspect_file(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    shown = dict(info)
    shown["concept_exclusion"] = {k: v if isinstance(v, str) else json.dumps(v) for k, v in
                                  info["concept_exclusion"].items()}
    print(format_inspect(shown))
    return 0
