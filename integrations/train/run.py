"""``concept-exclusion train``: a complete accelerate + PEFT LoRA trainer with the exclusion built in.

This module is the command (``register``) and the training loop; its parts live beside it:
train_config (flags, ``--config``), train_data (images, captions, batch order and seeds),
train_model (base pipeline, LoRA), train_checkpoint (save/resume) and train_samples.

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
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from concept_exclusion._version import __version__
from concept_exclusion.concept.preset import load_preset
from concept_exclusion.errors import ConceptExclusionError
from concept_exclusion.metadata import PREFIX
from concept_exclusion.integrations.train.checkpoint import (checkpoint_path, find_checkpoint, load_checkpoint,
                                                             prune_checkpoints, remove_stale_temporaries,
                                                             save_checkpoint)
from concept_exclusion.integrations.train.config import SAVE_DTYPES, add_arguments, resolve_config
from concept_exclusion.integrations.train.data import (batch_indices, concept_regions, dataset_fingerprint, load_image,
                                                       micro_batch_seed, scan_dataset)
from concept_exclusion.integrations.train.model import load_pipeline, lora_config
from concept_exclusion.integrations.train.samples import write_samples

log = logging.getLogger(__name__)

def register(subparsers) -> None:
    """Add ``train`` to the ``concept-exclusion`` command line."""
    p = subparsers.add_parser("train", help="train a LoRA that cannot learn the preset's concept",
                              description="Train a PEFT LoRA on a folder of captioned images with the concept "
                                          "exclusion built in (accelerate: mixed precision, gradient accumulation, "
                                          "`accelerate launch` for several GPUs).")
    add_arguments(p)
    p.set_defaults(func=run, _train_parser=p)


def _setup_log(output: Path, main: bool) -> logging.Handler | None:
    """On the main process, append the package's INFO log to ``output/train.log``; returns the handler."""
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


def region_treatment(choice: str, preset, segmenter: bool = False) -> str:
    """'ignore', 'base' or 'off' for ``--regions choice``: 'preset' reads the preset's [exemplars] region (with a
    segmenter but no exemplars: 'ignore'; else off); asking for regions with nothing to find them by is an error."""
    if choice == "preset":
        return preset.exemplars.region if preset.exemplars is not None else "ignore" if segmenter else "off"
    if choice != "off" and preset.exemplars is None and not segmenter:
        raise ConceptExclusionError(f"--regions {choice}: the preset {preset.name} lists no exemplars to find the "
                                    "concept with (add an [exemplars] table, or pass --segmenter)")
    return choice


def _train(args: argparse.Namespace, output: Path, accelerator) -> int:
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from diffusers.training_utils import cast_training_params
    from tqdm.auto import tqdm

    from concept_exclusion.exclusion import ConceptExclusion
    from concept_exclusion.preservation import OutputPreservation
    from concept_exclusion.regions import SegmenterLocator, TemplateLocator, latent_mask, region_loss

    from concept_exclusion.integrations.diffusers import encode_prompts, is_sdxl, save_lora, subspace_from_pipeline

    log.info("concept-exclusion %s train: %s", __version__,
             json.dumps({k: v for k, v in vars(args).items() if not k.startswith("_") and k != "func"},
                        sort_keys=True, default=str))
    examples = scan_dataset(args.data)
    fingerprint = dataset_fingerprint(examples)
    preset = load_preset(args.preset)
    chosen = args.output_preservation or preset.projection.output_preservation
    preservation = None if chosen == "none" else OutputPreservation.from_preset(preset, target=chosen)
    region = region_treatment(args.regions, preset, args.segmenter is not None)
    locator = None
    if region != "off":
        locator = (SegmenterLocator.from_pretrained(args.segmenter, preset, args.segmenter_threshold)
                   if args.segmenter else TemplateLocator.from_preset(preset))
    if locator is not None and preservation is not None:
        raise ConceptExclusionError(f"--regions {region} and output preservation ({chosen}) both change the loss; "
                                    "train applies one: pass --regions off or --output_preservation none")
    regions, regions_record = None, {"region": region}
    if locator is not None:
        regions = concept_regions(locator, examples, args.resolution, accelerator.is_local_main_process)
        regions_record.update(locator="segmenter" if args.segmenter else "template",
                              found_in=int(regions.flatten(1).any(1).sum()), images=len(examples))
        log.info("regions: %s", regions_record)
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
    unet.add_adapter(lora_config(args))
    cast_training_params(unet, dtype=torch.float32)
    targets = [t.strip() for t in args.targets.split(",")] if args.targets else None
    projection = preset.projection.overridden(mode=args.mode, strength=args.strength, targets=targets,
                                              project_context=args.project_context)
    exclusion = ConceptExclusion.attach(unet, subspace, projection, text_encoder=encoders)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    unet_prepared, optimizer = accelerator.prepare(unet, optimizer)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    scaler = getattr(accelerator, "scaler", None)

    start = 0
    if accelerator.is_main_process:
        remove_stale_temporaries(output)
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
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        if regions is not None:
            cond = conditioning(captions)
            concept = latent_mask(regions[idx].to(device), latents)
            base = None
            if region == "base":
                with torch.no_grad():
                    base = base_predict(noisy, timesteps, cond).float()
            return region_loss(predict(noisy, timesteps, cond).float(), target.float(), concept, base)
        if preservation is None:
            return F.mse_loss(predict(noisy, timesteps, conditioning(captions)).float(), target.float())
        return preservation.loss(predict, noisy, timesteps, target, captions, conditioning,
                                 base_predict=base_predict).total

    def predict(x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        embeds, pooled = cond
        kwargs = {}
        if sdxl:
            r = args.resolution
            time_ids = torch.tensor([[r, r, 0, 0, r, r]] * len(x), device=device, dtype=weight_dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        return unet_prepared(x, t, embeds, **kwargs).sample

    def base_predict(x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The frozen base model: the same UNet with its LoRA switched off (output_preservation = "base")."""
        unet.disable_adapters()
        try:
            return predict(x, t, cond)
        finally:
            unet.enable_adapters()

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
                prune_checkpoints(output, args.keep_checkpoints)
                log.info("checkpoint %s", path)
    bar.close()
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return 0
    leak = exclusion.max_leakage()
    lora_path = save_lora(unet, output / f"{args.output_name}.safetensors", exclusion, format=args.format,
                          dtype=SAVE_DTYPES[args.save_dtype],
                          extra_metadata={PREFIX + "regions": json.dumps(regions_record, sort_keys=True)})
    log.info("saved %s (%s layout), leakage max %.3e, %.1f s of training", lora_path, args.format, leak,
             time.time() - started)
    samples = write_samples(pipe, args, examples, preset, output, accelerator)
    print(f"LoRA: {lora_path}  (leakage max {leak:.2e}, {exclusion.mode} mode, preset {preset.name})")
    for s in samples:
        print(f"sample: {s}")
    return 0
