"""``concept-exclusion train``: a complete accelerate + PEFT LoRA trainer with the exclusion built in.

Invariants:
- exact mode: after every optimizer step the LoRA's effective delta satisfies the preset's constraint
  ((W_eff - W0) U = 0 for keys/values, the 'attention' set's for queries/outputs) to float precision;
- determinism: micro-batch m (counted over the whole run) always sees the same images, noise,
  timesteps and caption dropout, derived from (seed, m) alone; a run resumed from a checkpoint
  therefore ends bit-identical to an uninterrupted one (same machine, same thread count);
- files: checkpoints, the LoRA and the samples are written atomically (plugin/safeio); checkpoints
  are safetensors only and resuming never unpickles (optimizer state is stored as tensors + JSON).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from concept_exclusion._version import __version__
from concept_exclusion.errors import ConceptExclusionError, SafetensorsFileError
from concept_exclusion.preset import MODES, TARGET_SETS, load_preset

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "concept-exclusion-train-checkpoint/1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LORA_TARGETS = {
    "cross_attention": r".*attn2\.(to_k|to_v|to_q|to_out\.0)$",
    "cross_attention_kv": r".*attn2\.(to_k|to_v)$",
    "attention": r".*attn[12]\.(to_k|to_v|to_q|to_out\.0)$",
}
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# settings that change the training trajectory: a checkpoint only resumes a run with the same ones
TRAJECTORY_KEYS = ("base", "preset", "resolution", "batch_size", "gradient_accumulation_steps", "learning_rate",
                   "lr_warmup_steps", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
                   "max_grad_norm", "rank", "alpha", "lora_targets", "mixed_precision", "seed", "caption_dropout",
                   "mode", "strength", "targets", "clip_skip")


# command line ----------------------------------------------------------------------------------------
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
    g.add_argument("--targets", default=None, help=f"comma-separated target sets ({', '.join(TARGET_SETS)}); "
                                                   f"default: the preset's")
    g.add_argument("--clip_skip", type=int, default=None, help="kohya-style (1 = last layer, 2 = penultimate)")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint_every", type=int, default=0, help="write a checkpoint every N steps (0: never)")
    g.add_argument("--keep_checkpoints", type=int, default=3, help="keep the newest N checkpoints (0: all)")
    g.add_argument("--resume", default=None, help="a checkpoint file, or a folder (the output folder or its "
                                                  "checkpoints/) whose newest checkpoint is used")


REQUIRED = ("base", "data", "preset")


def register(subparsers) -> None:
    """Add ``train`` to the ``concept-exclusion`` command line."""
    p = subparsers.add_parser("train", help="train a LoRA that cannot learn the preset's concept",
                              description="Train a PEFT LoRA on a folder of captioned images with the concept "
                                          "exclusion built in (accelerate: mixed precision, gradient accumulation, "
                                          "`accelerate launch` for several GPUs).")
    add_arguments(p)
    p.set_defaults(func=run, _train_parser=p)


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
            if t.strip() not in TARGET_SETS:
                raise ConceptExclusionError(f"train: --targets: unknown target set {t.strip()!r} "
                                            f"(known: {', '.join(TARGET_SETS)})")


def trajectory(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a checkpoint must share with the run resuming it (the preset by content, not by path)."""
    values = {k: getattr(args, k) for k in TRAJECTORY_KEYS}
    values["preset"] = load_preset(args.preset).sha256
    return values


# data -------------------------------------------------------------------------------------------------
@dataclass
class Example:
    image: Path
    caption: str


def scan_dataset(folder: str | Path) -> list[Example]:
    """Images (sorted by file name) with their same-name ``.txt`` captions."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConceptExclusionError(f"--data {folder}: not a folder")
    examples = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        caption_file = path.with_suffix(".txt")
        if caption_file.is_file():
            caption = caption_file.read_text(encoding="utf-8").strip()
        else:
            log.warning("%s has no caption file %s: training it with an empty caption", path, caption_file.name)
            caption = ""
        examples.append(Example(path, caption))
    if not examples:
        raise ConceptExclusionError(f"--data {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return examples


def dataset_fingerprint(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(f"{e.image.name}\0{e.image.stat().st_size}\0{e.caption}\n".encode())
    return h.hexdigest()


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """[3, R, R] in [-1, 1]: shorter side resized to R, then center-cropped."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = resolution / min(im.size)
            size = (max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale)))
            im = im.resize(size, Image.BICUBIC)
            left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
            arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    except OSError as exc:
        raise ConceptExclusionError(f"{path}: cannot read image ({exc})") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


_ORDER, _NOISE = 0, 1


def derived_seed(seed: int, stream: int, *counters: int) -> int:
    """A 63-bit seed that depends on (seed, stream, counters) only: 'order' per epoch, 'noise' per micro-batch."""
    entropy = [seed & 0xFFFFFFFFFFFFFFFF, stream, *counters]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def micro_batch_seed(seed: int, micro_step: int, rank: int) -> int:
    """The seed of one micro-batch's noise, timesteps, VAE sample and caption dropout."""
    return derived_seed(seed, _NOISE, micro_step, rank)


def batch_indices(micro_step: int, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Example indices of micro-batch ``micro_step`` on process ``rank``: epoch e is a permutation seeded by
    (seed, e), cut into micro-batches of ``batch_size * world`` (a tail shorter than that is skipped)."""
    per_step = batch_size * world
    per_epoch = n // per_step
    if per_epoch < 1:
        raise ConceptExclusionError(f"--data has {n} images, fewer than batch_size x processes = {per_step}")
    epoch, position = divmod(micro_step, per_epoch)
    g = torch.Generator().manual_seed(derived_seed(seed, _ORDER, epoch))
    order = torch.randperm(n, generator=g).tolist()
    start = position * per_step + rank * batch_size
    return order[start:start + batch_size]


# model --------------------------------------------------------------------------------------------------
def load_pipeline(base: str, base_config: str | None = None, local_files_only: bool = False):
    """StableDiffusion(XL)Pipeline from a diffusers folder, a single-file checkpoint or a hub id."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(base)
    try:
        if path.is_file():
            if path.suffix != ".safetensors":
                raise ConceptExclusionError(f"--base {base}: single-file checkpoints must be .safetensors "
                                            f"(pickled .ckpt files are never loaded)")
            from concept_exclusion.safeio import read_header

            names, _ = read_header(path)
            xl = any(k.startswith("conditioner.embedders.1") for k in names)
            cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
            kwargs = {"config": base_config} if base_config else {}
            return cls.from_single_file(str(path), local_files_only=local_files_only, **kwargs)
        pipe = DiffusionPipeline.from_pretrained(base, local_files_only=local_files_only, safety_checker=None) \
            if _has_safety_checker(path) else DiffusionPipeline.from_pretrained(base, local_files_only=local_files_only)
    except ConceptExclusionError:
        raise
    except (OSError, ValueError) as exc:
        raise ConceptExclusionError(f"--base {base}: cannot load ({str(exc).splitlines()[0] if str(exc) else exc})") \
            from None
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        raise ConceptExclusionError(f"--base {base}: is a {type(pipe).__name__}; train supports SD1.x/2.x and SDXL")
    return pipe


def _has_safety_checker(path: Path) -> bool:
    index = path / "model_index.json"
    if not index.is_file():
        return True  # a hub id: pass safety_checker=None, harmless for SDXL
    try:
        return "safety_checker" in json.loads(index.read_text())
    except ValueError:
        return False


def _lora_config(args: argparse.Namespace):
    from peft import LoraConfig

    target = LORA_TARGETS.get(args.lora_targets, args.lora_targets)
    return LoraConfig(r=args.rank, lora_alpha=args.alpha if args.alpha is not None else args.rank,
                      init_lora_weights="gaussian", target_modules=target, lora_dropout=0.0)


# checkpoints --------------------------------------------------------------------------------------------
def checkpoint_path(output: Path, step: int) -> Path:
    return output / "checkpoints" / f"step-{step:08d}.safetensors"


def find_checkpoint(resume: str) -> Path | None:
    """``resume`` itself if a file, else the newest ``step-*.safetensors`` in it or in its ``checkpoints/``.

    An existing folder without checkpoints (a run stopped before its first one) gives None: start afresh.
    """
    path = Path(resume)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ConceptExclusionError(f"--resume {resume}: no checkpoint file or folder there")
    for folder in (path / "checkpoints", path):
        found = sorted(folder.glob("step-*.safetensors")) if folder.is_dir() else []
        if found:
            return found[-1]
    return None


def save_checkpoint(path: Path, step: int, unet, optimizer, exclusion, scaler, args: argparse.Namespace,
                    fingerprint: str) -> None:
    """One safetensors file: trainable LoRA tensors, AdamW state (tensors + JSON param groups), exclusion state."""
    from concept_exclusion.safeio import write_safetensors

    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    tensors = {f"lora/{n}": p.detach() for n, p in unet.named_parameters() if p.requires_grad}
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for key, value in state.items():
            if not torch.is_tensor(value):
                value = torch.tensor(value)
            tensors[f"optim/{index}/{key}"] = value
    tensors.update({f"exclusion/{k}": v for k, v in exclusion.state_dict().items()})
    metadata = {
        "format": CHECKPOINT_FORMAT, "version": __version__, "step": str(step),
        "param_names": json.dumps(names), "param_groups": json.dumps(opt["param_groups"]),
        "exclusion_steps": str(exclusion.steps), "trajectory": json.dumps(trajectory(args), sort_keys=True),
        "dataset_sha256": fingerprint,
        "scaler": json.dumps(scaler.state_dict()) if scaler is not None else "",
    }
    write_safetensors(path, tensors, metadata)


def load_checkpoint(path: Path, unet, optimizer, exclusion, scaler, args: argparse.Namespace, fingerprint: str
                    ) -> int:
    """Restore a ``save_checkpoint`` file into the run (validated; never unpickles). Returns its step."""
    from concept_exclusion.safeio import read_safetensors

    tensors, meta = read_safetensors(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise SafetensorsFileError(f"{path}: not a train checkpoint (metadata 'format' is {meta.get('format')!r})")
    try:
        saved = json.loads(meta["trajectory"])
        names = json.loads(meta["param_names"])
        groups = json.loads(meta["param_groups"])
        step = int(meta["step"])
    except (KeyError, ValueError) as exc:
        raise SafetensorsFileError(f"{path}: malformed checkpoint metadata ({exc})") from None
    if not (isinstance(saved, dict) and isinstance(names, list) and isinstance(groups, list)):
        raise SafetensorsFileError(f"{path}: malformed checkpoint metadata (trajectory, param_names or param_groups "
                                   f"of the wrong JSON type)")
    now = json.loads(json.dumps(trajectory(args), sort_keys=True))
    for key in TRAJECTORY_KEYS:
        if saved.get(key) != now.get(key):
            raise ConceptExclusionError(f"{path}: was written with {key} = {saved.get(key)!r}, this run has "
                                        f"{now.get(key)!r}; resume with the same settings")
    if meta.get("dataset_sha256") != fingerprint:
        raise ConceptExclusionError(f"{path}: the --data folder changed since this checkpoint (images or captions)")
    params = dict(unet.named_parameters())
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    if names != trainable:
        raise ConceptExclusionError(f"{path}: its LoRA parameters do not match this model's "
                                    f"({len(names)} saved, {len(trainable)} here)")
    with torch.no_grad():
        for name in names:
            value = tensors.get(f"lora/{name}")
            if value is None or value.shape != params[name].shape:
                raise SafetensorsFileError(f"{path}: tensor 'lora/{name}' missing or of the wrong shape")
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            parts = key.split("/", 2)
            if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) >= len(names):
                raise SafetensorsFileError(f"{path}: malformed optimizer tensor name {key!r}")
            owner = params[names[int(parts[1])]]
            if value.ndim and value.shape != owner.shape:
                raise SafetensorsFileError(f"{path}: optimizer tensor {key!r} has shape {list(value.shape)}, its "
                                           f"parameter {list(owner.shape)}")
            state.setdefault(int(parts[1]), {})[parts[2]] = value
    try:  # torch validates param_groups; anything it rejects is a malformed file, not a crash
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        exclusion_steps = int(meta.get("exclusion_steps", step))
        scaler_state = json.loads(meta["scaler"]) if scaler is not None and meta.get("scaler") else None
        if scaler_state is not None:
            scaler.load_state_dict(scaler_state)
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise SafetensorsFileError(f"{path}: malformed optimizer state ({exc.__class__.__name__}: {first})") from None
    try:
        exclusion.load_state_dict({k[len("exclusion/"):]: v for k, v in tensors.items() if k.startswith("exclusion/")})
    except ConceptExclusionError as exc:
        raise SafetensorsFileError(f"{path}: {exc}") from None
    exclusion.steps = exclusion_steps
    return step


def _remove_stale_temporaries(output: Path) -> None:
    """Temporary files left by a process killed while writing a checkpoint (never a complete checkpoint)."""
    for stale in (output / "checkpoints").glob(".step-*.tmp"):
        stale.unlink(missing_ok=True)


def _prune_checkpoints(output: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` checkpoints (0: keep all)."""
    folder = output / "checkpoints"
    found = sorted(folder.glob("step-*.safetensors"))
    for old in (found[:-keep] if keep > 0 else []):
        old.unlink(missing_ok=True)


# the run ------------------------------------------------------------------------------------------------
def _setup_log(output: Path, main: bool) -> logging.Handler | None:
    if not main:
        return None
    output.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(output / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("concept_exclusion")
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    return handler


def run(args: argparse.Namespace) -> int:
    """The ``train`` command: returns 0 on success (errors raise ConceptExclusionError -> exit code 2)."""
    args = resolve_config(args)
    output = Path(args.output)
    from accelerate import Accelerator

    # torchrun on a machine without GPUs: accelerate needs cpu=True to use gloo across the processes
    cpu_ranks = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision, cpu=cpu_ranks)
    handler = _setup_log(output, accelerator.is_main_process)
    try:
        return _train(args, output, accelerator)
    finally:
        if handler is not None:
            logging.getLogger("concept_exclusion").removeHandler(handler)
            handler.close()


def _train(args: argparse.Namespace, output: Path, accelerator) -> int:
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from diffusers.training_utils import cast_training_params
    from tqdm.auto import tqdm

    from concept_exclusion.exclusion import ConceptExclusion

    from .diffusers import encode_prompts, is_sdxl, save_lora, subspace_from_pipeline

    log.info("concept-exclusion %s train: %s", __version__,
             json.dumps({k: v for k, v in vars(args).items() if not k.startswith("_") and k != "func"},
                        sort_keys=True, default=str))
    examples = scan_dataset(args.data)
    fingerprint = dataset_fingerprint(examples)
    preset = load_preset(args.preset)
    set_seed(args.seed)
    pipe = load_pipeline(args.base, args.base_config, args.local_files_only)
    sdxl = is_sdxl(pipe)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    device = accelerator.device
    encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    for module in [pipe.vae, pipe.unet, *encoders]:
        module.requires_grad_(False)
    pipe.vae.to(device, torch.float32)  # the VAE stays float32: SDXL's overflows in float16
    for enc in encoders:
        enc.to(device, weight_dtype)
    subspace = subspace_from_pipeline(preset, pipe, args.clip_skip)
    unet = pipe.unet
    unet.to(device, weight_dtype)
    torch.manual_seed(args.seed)
    unet.add_adapter(_lora_config(args))
    cast_training_params(unet, dtype=torch.float32)
    targets = [t.strip() for t in args.targets.split(",")] if args.targets else None
    exclusion = ConceptExclusion.attach(unet, subspace, args.mode, strength=args.strength, targets=targets,
                                        text_encoder=encoders)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    unet_prepared, optimizer = accelerator.prepare(unet, optimizer)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    scaler = getattr(accelerator, "scaler", None)

    start = 0
    if accelerator.is_main_process:
        _remove_stale_temporaries(output)
    if args.resume:
        found = find_checkpoint(args.resume)
        if found is None:
            log.warning("--resume %s: no checkpoint in that folder yet; training from step 0", args.resume)
        else:
            start = load_checkpoint(found, unet, optimizer, exclusion, scaler, args, fingerprint)
            log.info("resumed from %s at step %d", found, start)
    log.info("%d images, %d process(es), %d targets (%s), subspace ranks %s, %s LoRA rank %d", len(examples),
             accelerator.num_processes, len(exclusion.targets), exclusion.mode,
             {s: subspace.rank(s) for s in subspace.bases}, args.lora_targets, args.rank)

    def conditioning(captions: list[str]):
        with torch.no_grad():
            embeds, pooled = encode_prompts(pipe, captions, args.clip_skip, device=device, dtype=weight_dtype)
        return embeds, pooled

    def micro_batch_loss(micro_step: int) -> torch.Tensor:
        idx = batch_indices(micro_step, len(examples), args.batch_size, args.seed, accelerator.process_index,
                            accelerator.num_processes)
        g = torch.Generator().manual_seed(micro_batch_seed(args.seed, micro_step, accelerator.process_index))
        pixels = torch.stack([load_image(examples[i].image, args.resolution) for i in idx]).to(device)
        drop = torch.rand(len(idx), generator=g) < args.caption_dropout
        captions = ["" if d else examples[i].caption for i, d in zip(idx, drop.tolist())]
        with torch.no_grad():
            latents = pipe.vae.encode(pixels).latent_dist.sample(generator=g) * pipe.vae.config.scaling_factor
        latents = latents.to(weight_dtype)
        noise = torch.randn(latents.shape, generator=g).to(device, weight_dtype)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=g).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        embeds, pooled = conditioning(captions)
        kwargs = {}
        if sdxl:
            r = args.resolution
            time_ids = torch.tensor([[r, r, 0, 0, r, r]] * len(idx), device=device, dtype=weight_dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        pred = unet_prepared(noisy, timesteps, embeds, **kwargs).sample
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return F.mse_loss(pred.float(), target.float())

    unet_prepared.train()
    bar = tqdm(range(start, args.max_steps), initial=start, total=args.max_steps, desc="train",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    leak = exclusion.max_leakage()
    started = time.time()
    for step in bar:
        lr = args.learning_rate * min(1.0, (step + 1) / args.lr_warmup_steps) if args.lr_warmup_steps else \
            args.learning_rate
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = []
        for micro in range(args.gradient_accumulation_steps):
            with accelerator.accumulate(unet_prepared):
                loss = micro_batch_loss(step * args.gradient_accumulation_steps + micro)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    exclusion.after_optimizer_step()  # exact mode: back onto the constraint
                optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        done = step + 1
        loss_value = sum(losses) / len(losses)
        if not math.isfinite(loss_value):
            log.warning("step %d: loss is %s", done, loss_value)
        if done % args.log_every == 0 or done == args.max_steps:
            leak = exclusion.max_leakage()
            log.info("step %d loss %.5f leakage %.3e lr %.3e", done, loss_value, leak, lr)
        bar.set_postfix(loss=f"{loss_value:.4f}", leakage=f"{leak:.1e}")
        if args.checkpoint_every and done % args.checkpoint_every == 0 and done < args.max_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                path = checkpoint_path(output, done)
                save_checkpoint(path, done, unet, optimizer, exclusion, scaler, args, fingerprint)
                _prune_checkpoints(output, args.keep_checkpoints)
                log.info("checkpoint %s", path)
    bar.close()
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return 0
    leak = exclusion.max_leakage()
    lora_path = save_lora(unet, output / f"{args.output_name}.safetensors", exclusion, format=args.format,
                          dtype=SAVE_DTYPES[args.save_dtype])
    log.info("saved %s (%s layout), leakage max %.3e, %.1f s of training", lora_path, args.format, leak,
             time.time() - started)
    samples = _write_samples(pipe, args, examples, preset, output, accelerator)
    print(f"LoRA: {lora_path}  (leakage max {leak:.2e}, {exclusion.mode} mode, preset {preset.name})")
    for s in samples:
        print(f"sample: {s}")
    return 0


def _write_samples(pipe, args: argparse.Namespace, examples: list[Example], preset, output: Path, accelerator
                   ) -> list[Path]:
    """A few images from the trained pipeline (LoRA active), seeded per prompt."""
    from concept_exclusion.safeio import atomic_path, write_text

    if args.sample_steps <= 0:
        return []
    prompts = args.sample_prompts or [examples[0].caption,
                                      preset.concepts[0].templates[0].replace("{}", preset.concepts[0].prompts[0])]
    pipe.unet.eval()
    pipe.set_progress_bar_config(disable=True)
    written = []
    for i, prompt in enumerate(prompts):
        g = torch.Generator().manual_seed(args.seed + i)
        with torch.no_grad(), accelerator.autocast():
            image = pipe(prompt, num_inference_steps=args.sample_steps, guidance_scale=args.sample_guidance,
                         height=args.resolution, width=args.resolution, generator=g).images[0]
        path = output / "samples" / f"{i:02d}.png"
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        write_text(output / "samples" / f"{i:02d}.txt", prompt + "\n")
        log.info("sample %s: %s", path, prompt)
        written.append(path)
    return written
