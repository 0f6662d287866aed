"""``concept-exclusion train`` samples: a few images from the trained pipeline, written next to the LoRA.

Invariant: sample i is seeded by ``--seed`` + i alone, and each image and its prompt are written atomically.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from concept_exclusion.integrations.train.data import Example

log = logging.getLogger(__name__)


def write_samples(pipe, args: argparse.Namespace, examples: list[Example], preset, output: Path, accelerator
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
