"""Running the comparison: methods x seeds on one base model, measured the same way, written as one JSON.

Invariants: every method of a seed is measured with that seed's prompt sets and noise; the base
model is measured once per seed with the same sets; the JSON document holds every per-seed figure
the report, the calibration gate and the verdict are computed from, and the command that made it.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from .base import Base
from .measure import EvalConfig, evaluate
from .methods import METHODS
from .text import ENCODER_NAME
from .train import TrainConfig, finetune
from .verdict import calibration, judge

log = logging.getLogger(__name__)
FORMAT = "concept-exclusion-evidence/3"


@dataclass(frozen=True)
class BenchConfig:
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    custom_prompts: tuple[str, ...] = ()


def sample_counts(cfg: EvalConfig) -> dict[str, int]:
    """How many samples each rate is measured on (the bootstrap resamples them)."""
    n = cfg.n
    return {"leak_rate": n, "neutral_rate": n, "paraphrase_leak_rate": n, "paraphrase_neutral_rate": n,
            "allowed_leak_rate": n, "public_fidelity": n, "empty_prompt_rate": cfg.n_empty,
            "new_content_rate": cfg.n_new}


def run(base: Base, cfg: BenchConfig, on_run: Callable[[str, int, dict], None] | None = None,
        progress: bool = True) -> dict:
    """Measure the base model and fine-tune + measure every method in every seed.

    Returns {"base": {seed: figures}, "runs": {method: [figures per seed]}}.
    """
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)} (known: {', '.join(METHODS)})")
    out: dict = {"base": {}, "runs": {m: [] for m in cfg.methods}}
    bar = tqdm(total=len(cfg.seeds) * (len(cfg.methods) + 1), desc="evidence runs", unit="run", disable=not progress)
    for seed in cfg.seeds:
        out["base"][seed] = evaluate(base.model, base.text, seed, cfg.evaluation, cfg.custom_prompts)
        bar.update(1)
        for name in cfg.methods:
            ft = finetune(base, METHODS[name], seed, cfg.train, progress=False)
            t0 = time.time()
            figures = evaluate(ft.model, base.text, seed, cfg.evaluation, cfg.custom_prompts)
            figures.update(seed=seed, train_seconds=round(ft.seconds, 1), eval_seconds=round(time.time() - t0, 1),
                           final_train_loss=sum(ft.losses[-50:]) / max(len(ft.losses[-50:]), 1))
            out["runs"][name].append(figures)
            if on_run is not None:
                on_run(name, seed, figures)
            bar.update(1)
    bar.close()
    return out


def document(results: dict, cfg: BenchConfig, command: str, seconds: float, default_method: str) -> dict:
    """The JSON document: configuration, per-seed figures, calibration gate and per-method verdicts."""
    runs = results["runs"]
    base_mean = {k: sum(f[k] for f in results["base"].values()) / len(results["base"])
                 for k in next(iter(results["base"].values())) if isinstance(next(iter(results["base"].values()))[k],
                                                                             (int, float))}
    counts = sample_counts(cfg.evaluation)
    doc = {
        "format": FORMAT, "command": command, "seconds": round(seconds, 1),
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(), "torch": torch.__version__},
        "encoder": {"name": ENCODER_NAME}, "default_method": default_method,
        "config": {"methods": list(cfg.methods), "seeds": list(cfg.seeds), "train": asdict(cfg.train),
                   "evaluation": asdict(cfg.evaluation), "custom_prompts": len(cfg.custom_prompts)},
        "base": {str(k): v for k, v in results["base"].items()}, "base_mean": base_mean,
        "runs": runs,
    }
    if "plain" in runs:
        doc["calibration"] = calibration(base_mean, runs)
        doc["verdicts"] = {m: judge(m, runs, counts) for m in runs if m != "plain"}
    return doc
