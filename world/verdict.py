"""The calibration gate and the bar, computed from measurements (never typed in).

Calibration (the world is an instrument only if it passes): the base model draws the public
prompts' colour and shape in at least 80% of samples; in every seed, plain training draws the
panda for name prompts at least 60 points more often than for the matched neutral prompts, and
for held-out paraphrase prompts at least 15 points more often than the base model does; the
scrub-name control stays within 10 points of its neutral rate; and data filtering draws the new
colour at least 30 points less often than plain training (it loses the co-occurring content).

The bar (each method against plain training in the same seeds, pooled): name and paraphrase
excess over the neutral rate reduced by at least 90%; held-out loss within 5% of plain; the
allowed neighbour keeps at least 80% of plain's rate; the new colour drawn at least 20 points
more often than data filtering draws it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from .stats import bootstrap, difference, ratio, reduction

BASE_FIDELITY = 0.80
NAME_MARGIN = 0.60
PARAPHRASE_MARGIN = 0.15
CONTROL_TOLERANCE = 0.10
FILTER_LOSS = 0.30
BAR = {"name_reduction": 0.90, "paraphrase_reduction": 0.90, "heldout_increase": 0.05, "allowed_kept": 0.80,
       "new_content_vs_filter": 0.20}


def calibration(base: Mapping[str, float], runs: Mapping[str, Sequence[Mapping[str, float]]],
                partial: bool = False) -> dict:
    """Every gate with its measured values and whether it holds; ``ok`` is all of them. A gate whose runs are
    missing fails, unless ``partial`` (the demo: plain training only), which leaves such gates out."""
    plain, control, filt = runs.get("plain", []), runs.get("scrub-name", []), runs.get("filter", [])
    gates = {
        "base_fidelity": {"value": base["public_fidelity"], "need": f">= {BASE_FIDELITY}",
                          "ok": base["public_fidelity"] >= BASE_FIDELITY},
        "plain_name_margin": {"per_seed": [m["leak_rate"] - m["neutral_rate"] for m in plain],
                              "need": f">= {NAME_MARGIN} in every seed"},
        "plain_paraphrase_vs_base": {"per_seed": [m["paraphrase_leak_rate"] - base["paraphrase_leak_rate"]
                                                  for m in plain], "need": f">= {PARAPHRASE_MARGIN} in every seed"},
        "control_vs_neutral": {"per_seed": [m["leak_rate"] - m["neutral_rate"] for m in control],
                               "need": f"within +-{CONTROL_TOLERANCE} in every seed"},
        "filter_loses_new_content": {"per_seed": [p["new_content_rate"] - f["new_content_rate"]
                                                  for p, f in zip(plain, filt)],
                                     "need": f">= {FILTER_LOSS} in every seed"},
    }
    gates["plain_name_margin"]["ok"] = bool(plain) and min(gates["plain_name_margin"]["per_seed"]) >= NAME_MARGIN
    para = gates["plain_paraphrase_vs_base"]["per_seed"]
    gates["plain_paraphrase_vs_base"]["ok"] = bool(para) and min(para) >= PARAPHRASE_MARGIN
    ctrl = gates["control_vs_neutral"]["per_seed"]
    gates["control_vs_neutral"]["ok"] = bool(ctrl) and max(abs(v) for v in ctrl) <= CONTROL_TOLERANCE
    lost = gates["filter_loses_new_content"]["per_seed"]
    gates["filter_loses_new_content"]["ok"] = bool(lost) and min(lost) >= FILTER_LOSS
    if partial:
        needs = {"control_vs_neutral": control, "filter_loses_new_content": filt}
        gates = {k: g for k, g in gates.items() if needs.get(k, plain)}
    return {"gates": gates, "ok": all(g["ok"] for g in gates.values())}


def judge(method: str, runs: Mapping[str, Sequence[Mapping[str, float]]], counts: Mapping[str, int]) -> dict:
    """The bar's criteria for ``method`` (point estimate and 95% bootstrap interval each) and ``meets_bar``."""
    stats = {
        "name_reduction": bootstrap(reduction(method, "leak_rate", "neutral_rate"), runs, counts),
        "paraphrase_reduction": bootstrap(reduction(method, "paraphrase_leak_rate", "paraphrase_neutral_rate"),
                                          runs, counts),
        "heldout_increase": bootstrap(lambda r: ratio(method, "heldout_loss")(r) - 1.0, runs, counts),
        "allowed_kept": bootstrap(ratio(method, "allowed_leak_rate"), runs, counts),
    }
    if "filter" in runs:
        stats["new_content_vs_filter"] = bootstrap(difference(method, "new_content_rate", "filter"), runs, counts)
    checks = {}
    for key, (point, lo, hi) in stats.items():
        ok = point <= BAR[key] if key == "heldout_increase" else point >= BAR[key]
        checks[key] = {"value": point, "ci95": [lo, hi], "need": ("<= " if key == "heldout_increase" else ">= ")
                       + str(BAR[key]), "ok": bool(ok)}
    return {"criteria": checks, "meets_bar": all(c["ok"] for c in checks.values()) and "filter" in runs}


def best_method(verdicts: Mapping[str, dict], candidates: Sequence[str]) -> str | None:
    """Among ``candidates`` that meet the bar: the largest lower 95% bound of the smaller of the two reductions
    (name, paraphrase), capped at 100% (drawing the concept less often than for a neutral word is no better than
    as often), then the smaller held-out increase; None when none meets the bar."""
    def bound(c: dict) -> float:
        lo = c["ci95"][0]
        return min(1.0, c["value"] if lo != lo else lo)  # no interval (one seed): the point estimate

    ranked = [(min(bound(v["criteria"]["name_reduction"]), bound(v["criteria"]["paraphrase_reduction"])),
               -v["criteria"]["heldout_increase"]["value"], m)
              for m, v in verdicts.items() if m in candidates and v["meets_bar"]]
    return max(ranked)[2] if ranked else None
