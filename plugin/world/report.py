"""RESULTS-evidence.md: the benchmark's table, the bar, the grid and the machine, with the command that made it."""

from __future__ import annotations

import math
from pathlib import Path

from ..safeio import write_text
from .bench import excess, machine, table
from .train import DEFAULT_METHOD, METHODS


def _runs_table(results: dict) -> str:
    head = ["kind", "method", "seed", "leak", "seen", "unseen", "empty", "excess", "held-out", "new-content",
            "probe", "TI", "LoRA-atk", "w-leak"]
    world2 = any("allowed_probe" in r for r in results["runs"])
    if world2:
        head[-1:-1] = ["allowed", "allowed empty", "allowed probe", "generic probe"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["runs"]:
        pct = lambda k: f"{r[k] * 100:.0f}%" if k in r else ""
        if r["method"] == "base":
            lines.append(f"| {r['kind']} | base | {r['seed']} |  |  |  |  |  |  |  |  | {pct('attack_ti')} | "
                         f"{pct('attack_lora')} | {'|  ' * 4 if world2 else ''}|")
            continue
        w2 = ""
        if world2:
            pr = lambda k: f"{r[k]['mean']:+.3f}" if k in r else ""
            w2 = f"{pct('allowed_leak_rate')} | {pct('allowed_empty_rate')} | {pr('allowed_probe')} | {pr('generic_probe')} | "
        wl = f"{r['max_weight_leakage']:.1e}" if "max_weight_leakage" in r else ""
        lines.append(f"| {r['kind']} | {r['method']} | {r['seed']} | {pct('leak_rate')} | {pct('leak_rate_seen')} | "
                     f"{pct('leak_rate_unseen')} | {pct('empty_prompt_rate')} | {excess(r) * 100:+.0f} pp | "
                     f"{r['heldout_loss']:.4f} | {pct('new_content_fidelity')} | {r['probe']['mean']:+.3f} | "
                     f"{pct('attack_ti')} | {pct('attack_lora')} | {w2}{wl} |")
    return "\n".join(lines)


def _allowed_detector(cal: dict) -> str:
    t = cal.get("allowed_threshold")
    if t is None or (isinstance(t, float) and math.isnan(t)):
        return ""
    return (f" Allowed-logo detector (the negative glyph): threshold {t:.3f}, precision "
            f"{cal['allowed_precision']:.3f}, recall {cal['allowed_recall']:.3f} on the same draw.")


def _world2_columns(rows: list[dict]) -> str:
    if not any("allowed_probe" in r for r in rows):
        return ""
    return """

World 2 columns. Gap to control closed: (probe(plain) - probe(method)) / (probe(plain) - probe(scrub-name)),
per seed and pooled; the scrub-name control sees exactly the data a perfect exclusion of the name would leave,
so 100% = the control's level, 0% = plain training; where a scrub-name run exists, the verdict uses this
instead of the probe reduction. Allowed leak / allowed empty: the allowed (quendor) detector's rate on prompts
naming quendor / on empty prompts. Allowed probe: the probe for "with the quendor logo" and the quendor glyph;
kept = allowed probe / plain's (per seed). Generic probe: "with the logo" (no name), protected glyph's score.
Name probe: probe minus generic probe, what the name adds beyond the nameless phrase (same noise); about 0 for a
model that never read the name (the control, filtering). Name probe reduction: 1 - name probe(method) / name
probe(plain), per seed and pooled: sampling-free and needs no control run (the demo's headline)."""


def write_results(path: str | Path, results: dict, rows: list[dict], command: str, grid_name: str,
                  wall_seconds: float, extra_sections: str = "") -> None:
    """Write the Markdown report (atomically)."""
    cal = results["calibration"]
    cfg = results["config"]
    verdicts = []
    for r in rows:
        if "meets_bar" in r:
            parts = ", ".join(f"{k}: {'yes' if v else ('no' if v is False else 'n/a')}" for k, v in r["bar_parts"].items())
            word = "meets the bar" if r["meets_bar"] else "misses the bar"
            if r["judged_on"] != "reduction>=90%":  # sampled extraction unreadable: judged by the probe
                what = {"control_gap_closed>=90%": "the probe's gap to the scrub-name control",
                        "name_probe_reduction>=90%": "the name probe"}.get(r["judged_on"], "the probe")
                word = (f"meets the bar on {what} (sampling inconclusive)" if r["meets_bar"]
                        else f"misses the bar (judged on {what}; sampling inconclusive)")
            gap = (f", pooled gap to the control closed {r['control_gap_closed_pooled'] * 100:.0f}%"
                   if "control_gap_closed_pooled" in r else "")
            if "name_probe_reduction_pooled" in r:
                gap += f", pooled name-probe reduction {r['name_probe_reduction_pooled'] * 100:.0f}%"
            verdicts.append(f"- {r['kind']} / `{r['method']}`: **{word}** (pooled sampled reduction "
                            f"{r['reduction_pooled'] * 100:.0f}%, pooled probe reduction "
                            f"{r['probe_reduction_pooled'] * 100:.0f}%{gap}; {parts})")
    methods = "\n".join(f"- `{m.name}`: {m.description}" for m in METHODS.values() if m.name in cfg["methods"])
    text = f"""# Evidence: concept extraction in the evidence world

Made by:

```
{command}
```

Machine: {machine()}. Wall time {wall_seconds / 60:.1f} min. Base model: {results['base_source']}.

Fine-tune seeds {cfg['seeds']} (same data order, steps and evaluation prompts/noise for every method within a seed).
LoRA: {cfg['lora']}. Full fine-tuning: {cfg['full']}{' (methods: ' + ', '.join(cfg['full_methods']) + ')' if cfg.get('full_methods') else ''}.
Evaluation: {cfg['evaluation']}. Attacks: {cfg['attacks']} on {cfg['attack_methods']} and on the base model.

Logo detector: light-minus-dark contrast of the glyph in its region, threshold {cal['threshold']:.3f} (calibrated
on rendered images with and without the logo, pixel noise std {cal['noise']}); on a fresh draw of {cal['n']} images
precision {cal['precision']:.3f}, recall {cal['recall']:.3f}.{_allowed_detector(cal)} Subspace ranks by token option: {results['subspace_ranks']}.

## Methods

{methods}

## Summary (mean ± 95% t-interval half-width over seeds)

Leak rate: share of samples for prompts naming the brand (half in caption contexts seen in training, half unseen:
the held-out shape with the logo and bare prompts) in which the detector finds the logo. Excess = leak rate minus
the empty-prompt rate; reduction = 1 - excess(method) / excess(plain), per seed and pooled over seeds (sum of
excesses). Held-out loss: denoising loss on scenes without the logo ("vs plain": relative change). Content
fidelity: colour and shape right on prompts of public scenes. New-content fidelity: the co-occurring new colour
(purple) drawn when prompted without the brand. Probe: mean logo-score shift of the predicted x0 when the
caption names the brand (noisy clean scenes, t = 250/500/750); 0 = the name moves nothing. TI / LoRA attack:
leak rate after textual inversion / an 8-image rank-4 LoRA attack (compare with the base model's row).
Probe reduction = 1 - probe(method)/probe(plain) (per seed, and pooled). Where plain
training's excess over the empty prompt is not distinguishable from zero (its 95% interval reaches 0), the
sampled reduction cannot be read and the verdict below is taken on the probe reduction instead.{_world2_columns(rows)}

{table(rows)}

## The bar

Our default (`{DEFAULT_METHOD}`) must cut the prompt extraction excess by at least 90% versus plain training, keep
held-out loss within 5% of plain training, and draw the co-occurring new colour clearly better than data
filtering (difference > max(10 pp, the intervals' half-widths)).

{chr(10).join(verdicts)}

## Samples (first seed)

Rows: methods; columns: two seen-context brand prompts, two unseen ones (held-out shape, bare prompt), two empty
prompts, a public scene, two scenes in the new colour.

![grid]({grid_name})

{extra_sections}
## Every run

{_runs_table(results)}
"""
    write_text(path, text)
