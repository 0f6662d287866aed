"""The evidence benchmark: fine-tune by each method, measure, summarise over seeds, draw the grid.

Invariants: within a seed, every method starts from the same base with the same data order,
steps and evaluation prompts/noise; reductions are computed against the plain run of the same
seed and kind; every number in a summary comes from ``runs`` (nothing is typed in by hand).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .attacks import AttackConfig, lora_attack, textual_inversion
from .detect import calibrate
from .measure import EvalConfig, evaluate
from .model import Base
from .stats import fmt, mean_ci
from .train import DEFAULT_METHOD, METHODS, WORLD_PRESET, TrainConfig, finetune, finetune_scenes, subspace_for

log = logging.getLogger(__name__)


@dataclass
class BenchConfig:
    methods: tuple[str, ...] = tuple(METHODS)
    kinds: tuple[str, ...] = ("lora",)
    seeds: tuple[int, ...] = (0, 1, 2)
    lora: TrainConfig = field(default_factory=lambda: TrainConfig(kind="lora"))
    full: TrainConfig = field(default_factory=lambda: TrainConfig(kind="full"))
    full_methods: tuple[str, ...] | None = None  # None: the same methods as LoRA
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    attacks: AttackConfig | None = None
    attack_methods: tuple[str, ...] = ("plain", "scrub", "scrub-name", DEFAULT_METHOD)

    def train_config(self, kind: str) -> TrainConfig:
        return self.lora if kind == "lora" else self.full

    def methods_for(self, kind: str) -> tuple[str, ...]:
        if kind == "full" and self.full_methods is not None:
            return self.full_methods
        return self.methods


def run(base: Base, cfg: BenchConfig, on_run: Callable[[dict], None] | None = None,
        keep: Callable[[object], None] | None = None, progress: bool = True) -> dict:
    """Run every (kind, seed, method); returns a JSON-able dict with the calibration, runs and the grid samples."""
    calibration = calibrate()
    scenes = finetune_scenes()
    subspaces = {}
    runs, grid = [], {}
    t_start = time.time()
    for kind in cfg.kinds:
        tc = cfg.train_config(kind)
        for seed in cfg.seeds:
            if cfg.attacks is not None and kind == cfg.kinds[0]:  # the base model's attacks, once per seed
                t0 = time.time()
                entry = {"kind": kind, "seed": seed, "method": "base", "train_seconds": 0.0,
                         "attack_ti": textual_inversion(base.unet, base.text, calibration, seed, cfg.attacks),
                         "attack_lora": lora_attack(base.unet, base.text, calibration, seed, cfg.attacks)}
                entry["attack_seconds"] = time.time() - t0
                runs.append(entry)
            for name in cfg.methods_for(kind):
                method = METHODS[name]
                tokens = method.tokens if method.preset == WORLD_PRESET else f"{method.preset}:{method.tokens}"
                if method.mode is not None and tokens not in subspaces:
                    subspaces[tokens] = subspace_for(base, method.tokens, method.preset)
                ft = finetune(base, method, tc, seed, scenes, subspaces.get(tokens), progress=progress)
                t0 = time.time()
                first = seed == cfg.seeds[0]
                metrics = evaluate(ft.unet, base.text, calibration, seed, cfg.evaluation, keep_samples=first)
                samples = metrics.pop("_samples", None)
                if samples is not None:
                    grid[(kind, name)] = samples
                entry = {"kind": kind, "seed": seed, "method": name, "train_seconds": ft.seconds,
                         "eval_seconds": time.time() - t0, "final_train_loss": sum(ft.losses[-20:]) / max(
                             len(ft.losses[-20:]), 1), **metrics}
                if ft.exclusion is not None:
                    entry["max_weight_leakage"] = ft.exclusion.max_leakage()
                    entry["subspace_rank"] = ft.exclusion.subspace.rank()
                if cfg.attacks is not None and name in cfg.attack_methods:
                    t0 = time.time()
                    entry["attack_ti"] = textual_inversion(ft.unet, base.text, calibration, seed, cfg.attacks)
                    entry["attack_lora"] = lora_attack(ft.unet, base.text, calibration, seed, cfg.attacks)
                    entry["attack_seconds"] = time.time() - t0
                runs.append(entry)
                if keep is not None:
                    keep(ft)
                if on_run is not None:
                    on_run(entry)
                log.info("%s %s seed %d: leak %.3f empty %.3f heldout %.4f (%.0f s)", kind, name, seed,
                         entry["leak_rate"], entry["empty_prompt_rate"], entry["heldout_loss"], ft.seconds)
    return {
        "calibration": asdict(calibration),
        "config": {"methods": list(cfg.methods), "kinds": list(cfg.kinds), "seeds": list(cfg.seeds),
                   "lora": asdict(cfg.lora), "full": asdict(cfg.full),
                   "full_methods": list(cfg.full_methods) if cfg.full_methods else None,
                   "evaluation": asdict(cfg.evaluation),
                   "attacks": asdict(cfg.attacks) if cfg.attacks else None,
                   "attack_methods": list(cfg.attack_methods)},
        "subspace_ranks": {str(k): v.rank() for k, v in subspaces.items()},
        "base_source": base.source,
        "runs": runs,
        "seconds": time.time() - t_start,
        "_grid": grid,
    }


def excess(entry: dict) -> float:
    return entry["leak_rate"] - entry["empty_prompt_rate"]


def name_probe(entry: dict) -> float:
    """What the protected *name* adds: probe("with the zorblax logo") - probe("with the logo"), same noise.

    Sampling-free and control-free: about 0 for a model that never read the name (the scrub-name
    control, filtering), positive for one that bound it. World 2 runs only (they carry the generic probe).
    """
    return entry["probe"]["mean"] - entry["generic_probe"]["mean"]


def summarize(results: dict) -> list[dict]:
    """Per (kind, method): means and 95% t-intervals over seeds, and the reduction against same-seed plain."""
    runs = [r for r in results["runs"] if r["method"] != "base"]
    plain = {(r["kind"], r["seed"]): r for r in runs if r["method"] == "plain"}
    rows = []
    keys = []
    for r in runs:
        if (r["kind"], r["method"]) not in keys:
            keys.append((r["kind"], r["method"]))
    base_attacks = {(r["kind"], r["seed"]): r for r in results["runs"] if r["method"] == "base"}
    for kind, method in keys:
        group = [r for r in runs if r["kind"] == kind and r["method"] == method]
        row = {"kind": kind, "method": method, "seeds": len(group)}
        for key in ("leak_rate", "leak_rate_seen", "leak_rate_unseen", "empty_prompt_rate", "heldout_loss",
                    "content_fidelity", "new_content_fidelity", "train_seconds", "attack_ti", "attack_lora",
                    "allowed_leak_rate", "allowed_empty_rate", "protected_rate_allowed_prompts"):
            vals = [r[key] for r in group if key in r]
            if vals:
                row[key] = mean_ci(vals)
        row["probe"] = mean_ci([r["probe"]["mean"] for r in group])
        for key in ("allowed_probe", "generic_probe"):  # world 2 only
            vals = [r[key]["mean"] for r in group if key in r]
            if vals:
                row[key] = mean_ci(vals)
        kept = [r["allowed_probe"]["mean"] / plain[(kind, r["seed"])]["allowed_probe"]["mean"] for r in group
                if "allowed_probe" in r and (kind, r["seed"]) in plain
                and plain[(kind, r["seed"])]["allowed_probe"]["mean"] > 0]
        if kept:
            row["allowed_probe_kept"] = mean_ci(kept)
        reductions, ratios, pooled_m, pooled_p = [], [], 0.0, 0.0
        for r in group:
            p = plain.get((kind, r["seed"]))
            if p is None:
                continue
            if excess(p) > 0:
                reductions.append(1 - excess(r) / excess(p))
            ratios.append(r["heldout_loss"] / p["heldout_loss"] - 1)
            pooled_m += excess(r)
            pooled_p += excess(p)
        probe_red, probe_m, probe_p = [], 0.0, 0.0
        for r in group:
            p = plain.get((kind, r["seed"]))
            if p is not None and p["probe"]["mean"] > 0:
                probe_red.append(1 - r["probe"]["mean"] / p["probe"]["mean"])
                probe_m += r["probe"]["mean"]
                probe_p += p["probe"]["mean"]
        names = [(r, plain.get((kind, r["seed"]))) for r in group if "generic_probe" in r]
        if names:
            row["name_probe"] = mean_ci([name_probe(r) for r, _ in names])
            paired = [(name_probe(r), name_probe(p)) for r, p in names if p is not None and name_probe(p) > 0]
            if paired:
                row["name_probe_reduction"] = mean_ci([1 - m / p for m, p in paired])
                row["name_probe_reduction_pooled"] = 1 - sum(m for m, _ in paired) / sum(p for _, p in paired)
        control = {(r["kind"], r["seed"]): r for r in runs if r["method"] == "scrub-name"}
        closed, gap_m, gap_p = [], 0.0, 0.0
        for r in group:  # share of plain training's lead over the control (no readable name) that the method removes
            p, c = plain.get((kind, r["seed"])), control.get((kind, r["seed"]))
            if p is None or c is None or p["probe"]["mean"] - c["probe"]["mean"] <= 0:
                continue
            closed.append((p["probe"]["mean"] - r["probe"]["mean"]) / (p["probe"]["mean"] - c["probe"]["mean"]))
            gap_m += p["probe"]["mean"] - r["probe"]["mean"]
            gap_p += p["probe"]["mean"] - c["probe"]["mean"]
        if closed:
            row["control_gap_closed"] = mean_ci(closed)
            row["control_gap_closed_pooled"] = gap_m / gap_p
        row["probe_reduction"] = mean_ci(probe_red)
        row["probe_reduction_pooled"] = 1 - probe_m / probe_p if probe_p > 0 else float("nan")
        row["reduction"] = mean_ci(reductions)
        row["reduction_pooled"] = 1 - pooled_m / pooled_p if pooled_p > 0 else float("nan")
        row["heldout_vs_plain"] = mean_ci(ratios)
        row["excess"] = mean_ci([excess(r) for r in group])
        rows.append(row)
    for kind in {k for k, _ in keys}:
        base_rows = [r for (k, _), r in base_attacks.items() if k == kind]
        if base_rows:
            rows.append({"kind": kind, "method": "base (no fine-tune)", "seeds": len(base_rows),
                         "attack_ti": mean_ci([r["attack_ti"] for r in base_rows]),
                         "attack_lora": mean_ci([r["attack_lora"] for r in base_rows])})
    _judge(rows)
    return rows


def _judge(rows: list[dict]) -> None:
    """The bar: reduction >= 90%, held-out loss within 5% of plain, new content learnt clearly better than filter.

    The reduction is the sampled one where plain training's excess over the empty prompt is measurable;
    otherwise the probe's: the gap to the scrub-name control where one was run, else the name probe, else
    the raw probe (``judged_on`` names the part used)."""
    filt = {r["kind"]: r for r in rows if r["method"] == "filter"}
    for r in rows:
        if "reduction" not in r or r["method"] in ("plain", "filter", "scrub", "scrub-name"):
            continue
        f = filt.get(r["kind"])
        red = r["reduction_pooled"]
        held = r["heldout_vs_plain"][0]
        better = None
        if f is not None:
            m, h = r["new_content_fidelity"]
            fm, fh = f["new_content_fidelity"]
            spread = max(0.0 if math.isnan(h) else h, 0.0 if math.isnan(fh) else fh)
            better = m - fm > max(0.1, spread)
        plain = next((p for p in rows if p["kind"] == r["kind"] and p["method"] == "plain"), None)
        measurable = plain is not None and not math.isnan(plain["excess"][1]) and \
            plain["excess"][0] - plain["excess"][1] > 0
        r["bar_parts"] = {"reduction>=90%": bool(red >= 0.9), "heldout<=+5%": bool(held <= 0.05),
                          "new_content>filter": better,
                          "probe_reduction>=90%": bool(r["probe_reduction_pooled"] >= 0.9),
                          **({"control_gap_closed>=90%": bool(r["control_gap_closed_pooled"] >= 0.9)}
                             if "control_gap_closed_pooled" in r else {}),
                          **({"name_probe_reduction>=90%": bool(r["name_probe_reduction_pooled"] >= 0.9)}
                             if "name_probe_reduction_pooled" in r else {}),
                          "plain_excess_measurable": measurable}
        r["judged_on"] = "reduction>=90%" if measurable else next(
            k for k in ("control_gap_closed>=90%", "name_probe_reduction>=90%", "probe_reduction>=90%")
            if k in r["bar_parts"])
        r["meets_bar"] = bool(r["bar_parts"][r["judged_on"]] and held <= 0.05 and better is not False)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    import diffusers
    import peft
    import transformers

    return (f"{cpu}, {os.cpu_count()} logical CPUs visible, torch {torch.__version__} "
            f"({torch.get_num_threads()} thread(s)), diffusers {diffusers.__version__}, "
            f"transformers {transformers.__version__}, peft {peft.__version__}, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


def table(rows: list[dict], markdown: bool = True) -> str:
    """The results table (percentages for rates; mean ± 95% t-interval half-width over seeds)."""
    head = ["kind", "method", "seeds", "leak rate", "empty-prompt rate", "reduction (pooled)", "reduction (per-seed)",
            "held-out loss", "vs plain", "content fid.", "new-content fid.", "probe", "probe reduction", "TI attack", "LoRA attack",
            "train s", "bar"]
    allowed = any("allowed_probe" in r for r in rows)
    if allowed:  # world 2: the allowed brand's binding, and the generic phrase's pull towards the protected logo
        head[-2:-2] = ["gap to control closed (pooled)", "(per-seed)", "name probe", "name probe reduction (pooled)",
                       "(per-seed)", "allowed leak", "allowed empty", "allowed probe", "allowed probe kept",
                       "generic probe"]
    lines = []
    for r in rows:
        g = lambda k, pct=True, d=2: fmt(*r[k], digits=d, pct=pct) if k in r else ""
        bar = ""
        if "meets_bar" in r:
            missed = [k for k, v in r["bar_parts"].items() if v is False and k in (
                r["judged_on"], "heldout<=+5%", "new_content>filter")]
            bar = "yes" if r["meets_bar"] else "no (" + ", ".join(missed) + ")"
        red_pooled = f"{r['reduction_pooled'] * 100:.0f}%" if "reduction_pooled" in r and not math.isnan(
            r["reduction_pooled"]) else ""
        lines.append([r["kind"], r["method"], str(r["seeds"]), g("leak_rate"), g("empty_prompt_rate"), red_pooled,
                      g("reduction"), g("heldout_loss", False, 4), g("heldout_vs_plain"), g("content_fidelity"),
                      g("new_content_fidelity"), g("probe", False, 3), g("probe_reduction"), g("attack_ti"), g("attack_lora"),
                      *([f"{r['control_gap_closed_pooled'] * 100:.0f}%" if "control_gap_closed_pooled" in r else "",
                         g("control_gap_closed"), g("name_probe", False, 3),
                         f"{r['name_probe_reduction_pooled'] * 100:.0f}%" if "name_probe_reduction_pooled" in r else "",
                         g("name_probe_reduction"), g("allowed_leak_rate"), g("allowed_empty_rate"), g("allowed_probe", False, 3),
                         g("allowed_probe_kept"), g("generic_probe", False, 3)] if allowed else []),
                      g("train_seconds", False, 0), bar])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


GRID_COLUMNS = (("concept_seen", 0), ("concept_seen", 1), ("concept_unseen", 0), ("concept_unseen", -1),
                ("empty", 0), ("empty", 1), ("content", 0), ("new_content", 0), ("new_content", 1))


def grid_png(grid: dict, path: str | Path, scale: int = 4) -> None:
    """Rows: methods (first seed); columns: concept prompts (seen, unseen), empty prompt, content, new colour."""
    from PIL import Image, ImageDraw

    from ..safeio import atomic_path

    labels = [f"{k}/{m}" for k, m in grid]
    label_w, cell, pad = 6 * max(len(s) for s in labels) + 8 if labels else 80, 16 * scale, 2
    header = 14
    width = label_w + len(GRID_COLUMNS) * (cell + pad)
    height = header + len(grid) * (cell + pad)
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for j, (group, _) in enumerate(GRID_COLUMNS):
        draw.text((label_w + j * (cell + pad) + 2, 1), group.replace("concept_", "c-")[:10], fill=(0, 0, 0))
    for i, ((kind, method), samples) in enumerate(grid.items()):
        y = header + i * (cell + pad)
        draw.text((2, y + cell // 2 - 5), f"{kind}/{method}", fill=(0, 0, 0))
        for j, (group, index) in enumerate(GRID_COLUMNS):
            x = samples[group][index]
            arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr).resize((cell, cell), Image.NEAREST)
            img.paste(tile, (label_w + j * (cell + pad), y))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def write_json(results: dict, rows: list[dict], path: str | Path, extra: dict | None = None) -> dict:
    """Write runs, summary and calibration as JSON; per method also the flat keys the demo promises."""
    from ..safeio import write_text

    methods = {}
    for r in rows:
        if "leak_rate" not in r:
            continue
        key = r["method"] if r["kind"] == "lora" else f"{r['method']} ({r['kind']})"
        methods[key] = {k: (v[0] if isinstance(v, tuple) else v) for k, v in r.items()
                        if k not in ("kind", "method")}
        methods[key]["kind"] = r["kind"]
        methods[key]["ci95"] = {k: v[1] for k, v in r.items() if isinstance(v, tuple)}
    default = methods.get(DEFAULT_METHOD, {})
    doc = {"leak_reduction": default.get("reduction_pooled"),
           "name_probe_reduction": default.get("name_probe_reduction_pooled"), "default_method": DEFAULT_METHOD,
           "methods": methods, "calibration": results["calibration"], "config": results["config"],
           "subspace_ranks": results["subspace_ranks"], "base_source": results["base_source"],
           "runs": results["runs"], "seconds": results["seconds"], "machine": machine(), **(extra or {})}
    write_text(path, json.dumps(_clean(doc), indent=2, default=_nan_safe, allow_nan=False) + "\n")
    return doc


def _nan_safe(value):
    return str(value)


def _clean(obj):
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj
