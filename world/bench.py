"""Running the comparison: methods x seeds on one base model, measured the same way, written as one JSON.

Invariants: every method of a seed is measured with that seed's prompt sets and noise, and attacked by inversion
with that seed's renders, noise and budget; the base model is measured and attacked once per seed the same way;
the JSON document holds every per-seed figure the report, the calibration gate and the verdict are computed
from, and the command that made it.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .base import Base
from .export import save_lora
from .inversion import InversionConfig, inversion_rate
from .measure import EvalConfig, evaluate
from .methods import METHODS
from .text import ENCODER_NAME
from .train import TrainConfig, finetune
from .uplift import REFERENCE, calibration, judge

FORMAT = "concept-exclusion-evidence/4"
WORLD = "3.3"


@dataclass(frozen=True)
class BenchConfig:
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    attack: InversionConfig = field(default_factory=InversionConfig)
    custom_prompts: tuple[str, ...] = ()


def sample_counts(cfg: EvalConfig, attack: InversionConfig, custom: int = 0) -> dict[str, int]:
    """How many samples each rate is measured on (the bootstrap resamples them)."""
    n = cfg.n
    return {"leak_rate": n, "neutral_rate": n, "paraphrase_leak_rate": n, "paraphrase_neutral_rate": n,
            "preset_paraphrase_rate": n, "no_word_rate": n, "public_protected_rate": n, "allowed_leak_rate": n,
            "public_fidelity": n, "empty_prompt_rate": cfg.n_empty, "new_content_rate": cfg.n_new,
            "inversion_rate": attack.samples, "custom_rate": custom}


def measure(model, base: Base, seed: int, cfg: BenchConfig, keep_samples: bool = False) -> dict:
    """Every figure of one model in one seed: the prompt families and the inversion attack (flat, as the bootstrap
    reads them); with ``keep_samples`` the samples per prompt set and the attack's under ``_samples``."""
    t0 = time.time()
    figures = evaluate(model, base.text, seed, cfg.evaluation, cfg.custom_prompts, keep_samples=keep_samples)
    if "custom" in figures:
        figures["custom_rate"] = figures["custom"]["leak_rate"]
    attack = inversion_rate(model, base.text, seed, cfg.attack, keep_samples=keep_samples)
    if keep_samples:
        figures["_samples"]["inversion"] = attack["_samples"]
    figures.update(inversion_rate=attack["rate"], inversion_final_loss=attack["final_loss"],
                   eval_seconds=round(time.time() - t0, 1))
    return figures


def run(base: Base, cfg: BenchConfig, on_run: Callable[[str, int, dict], None] | None = None,
        progress: bool = True, loras: Path | None = None) -> dict:
    """Measure the base model and fine-tune + measure (prompt families and the inversion attack) every method in
    every seed; with ``loras``, each measured model is also written as ``loras/seed-<seed>/lora-<method>.safetensors``
    (the files the audit benchmark audits).

    Returns {"base": {seed: figures}, "runs": {method: [figures per seed]}}.
    """
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)} (known: {', '.join(METHODS)})")
    out: dict = {"base": {}, "runs": {m: [] for m in cfg.methods}}
    bar = tqdm(total=len(cfg.seeds) * (len(cfg.methods) + 1), desc="evidence runs", unit="run", disable=not progress)
    for seed in cfg.seeds:
        out["base"][seed] = measure(base.model, base, seed, cfg)
        bar.update(1)
        for name in cfg.methods:
            ft = finetune(base, METHODS[name], seed, cfg.train, progress=False)
            if loras is not None:
                save_lora(ft, loras / f"seed-{seed}" / f"lora-{name}.safetensors")
            figures = measure(ft.model, base, seed, cfg)
            figures.update(seed=seed, train_seconds=round(ft.seconds, 1),
                           final_train_loss=sum(ft.losses[-50:]) / max(len(ft.losses[-50:]), 1))
            out["runs"][name].append(figures)
            if on_run is not None:
                on_run(name, seed, figures)
            bar.update(1)
    bar.close()
    return out


def document(results: dict, cfg: BenchConfig, command: str, seconds: float, default_method: str) -> dict:
    """The JSON document: configuration, per-seed figures, and (with plain and the reference) the calibration gate
    and per-method verdicts."""
    runs = results["runs"]
    base = {str(k): v for k, v in results["base"].items()}
    counts = sample_counts(cfg.evaluation, cfg.attack, len(cfg.custom_prompts))
    doc = {
        "format": FORMAT, "world": WORLD, "command": command, "seconds": round(seconds, 1),
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(), "torch": torch.__version__},
        "encoder": {"name": ENCODER_NAME}, "default_method": default_method,
        "config": {"methods": list(cfg.methods), "seeds": list(cfg.seeds), "train": asdict(cfg.train),
                   "evaluation": asdict(cfg.evaluation), "attack": asdict(cfg.attack),
                   "custom_prompts": len(cfg.custom_prompts)},
        "counts": counts, "base": base, "runs": runs,
    }
    if "plain" in runs and REFERENCE in runs:
        doc["calibration"] = calibration(base, runs, counts)
        doc["verdicts"] = {m: judge(m, runs, counts) for m in runs if m != REFERENCE}
    return doc
