"""Printing audit reports and file metadata for a terminal.

Invariant: every string that came from a file (metadata values, tensor names, the file's own path) passes
through ``clean`` before it is printed: control and format characters (newlines, escape codes, bidi
overrides) are shown as escapes and lone surrogates as U+FFFD, so a file cannot forge a line of output.
"""

from __future__ import annotations

import unicodedata
from typing import Any

from concept_exclusion.audit.behaviour.report import INCOMPLETE, LEARNED, MEANING
from concept_exclusion.audit.report import AuditReport, LayerReport

_HIDDEN = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
_MAX_LISTED = 40


def clean(value: Any, limit: int | None = 200) -> str:
    """One printable line: hidden characters escaped, lone surrogates replaced, cut to ``limit`` characters."""
    text = value if isinstance(value, str) else repr(value)
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat == "Cs":
            out.append("\ufffd")
        elif cat in _HIDDEN and ch != " ":
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else (f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"))
        else:
            out.append(ch)
    shown = "".join(out)
    if limit is not None and len(shown) > limit:
        shown = shown[:limit] + f"... ({len(shown)} chars)"
    return shown


def _status(r: LayerReport, report: AuditReport) -> str:
    if r.blocking:
        return "NOT MEASURED"
    if r.over(report.threshold):
        return "OVER" if report.verified else "over (claim)"
    if r.share is not None:
        return ("ok" if report.verified else "ok (claim)") if r.checked else "info"
    return "listed"


def _measured_rows(report: AuditReport) -> list[str]:
    rows = [r for r in report.layers if r.role not in ("elsewhere", "text-encoder") or r.blocking]
    if not rows:
        return ["(no layer that reads the text states, nor any query/output layer, is changed)"]
    width = min(max(len(clean(r.name, 90)) for r in rows), 90)
    lines = [f"{'layer':<{width}}  {'role':<11}  {'|dW U|/|dW|':>12}  {'|dW c|/|W0 c|':>14}  status"]
    for r in rows:
        share = "-" if r.share is None else f"{r.share:.3e}"
        change = "-" if r.concept_change is None else f"{r.concept_change:.3e}"
        why = r.blocking or r.note
        lines.append(f"{clean(r.name, 90):<{width}}  {r.role:<11}  {share:>12}  {change:>14}  {_status(r, report)}"
                     + (f"  ({clean(why, 300)})" if why else ""))
    return lines


def _listing(title: str, names: list[str]) -> list[str]:
    if not names:
        return []
    lines = [f"{title} ({len(names)}):"]
    lines += [f"  {clean(n, 160)}" for n in names[:_MAX_LISTED]]
    if len(names) > _MAX_LISTED:
        lines.append(f"  ... and {len(names) - _MAX_LISTED} more (--json lists all)")
    return lines


def format_report(report: AuditReport) -> str:
    verdict = report.verdict()
    preset = report.preset
    lines = [f"file:      {clean(report.file, 300)}", f"layout:    {report.layout}",
             f"preset:    {clean(preset['name'])} sha256 {preset['sha256']} ({clean(preset['source'], 300)})"
             if preset else "preset:    none given (--preset): nothing trusted to check against",
             f"base:      {clean(report.base['source'], 300)} ({report.base['kind']})" if report.base else
             "base:      none given (--base): the verdict cannot be verified",
             (f"clip_skip: {', '.join(map(str, report.clip_skips))} (worst case counts)" if report.clip_skips else
              "clip_skip: -") + (f"   T5 length: {report.sequence_length}" if report.sequence_length else ""),
             f"targets:   {', '.join(report.target_sets)}   threshold: {report.threshold:g}"
             + (f"   rank: {', '.join(f'{s} {r}' for s, r in report.ranks.items())}" if report.ranks else "")]
    if report.claims:
        lines.append("the file claims (not trusted): " + "; ".join(f"{k}={clean(v, 80)}"
                                                                   for k, v in sorted(report.claims.items())))
    lines += ["", *_measured_rows(report), ""]
    elsewhere = [r.name for r in report.layers if r.role == "elsewhere" and not r.blocking]
    lines += _listing("changes elsewhere (layers that do not read the text states, not measured)", elsewhere)
    lines += _listing("text-encoder layers changed", [r.name for r in report.text_encoder_layers])
    lines += _listing("NOT UNDERSTOOD (tensors no loader convention explains)", report.unknown_keys)
    lines += [f"note: {clean(n, 400)}" for n in report.notes]
    lines.append(_summary(report, verdict))
    lines += ["", *_behaviour(report)]
    return "\n".join(lines)


def _behaviour(report: AuditReport) -> list[str]:
    b = report.behaviour
    if b is None:
        return [report.behaviour_note or "behavioural check not run"]
    controls = f"{b.controls} control image(s)" if b.controls else "the rest of each image"
    lines = ["behavioural check (what the file makes the base draw; separate from the weight check above):",
             f"  exemplars: {clean(b.source, 300)}; concept located in {b.located}; compared with {controls}; "
             f"file applied on {b.applied} layer(s)",
             "  figure = how much more the file lowers the base's denoising loss where the concept is than elsewhere "
             "(0: no more)",
             f"  {'family':<12} {'figure':>8}  {'95% interval':<18}  meaning"]
    for name, f in b.figures.items():
        lines.append(f"  {name:<12} {f.value:>+8.3f}  [{f.low:+.3f}, {f.high:+.3f}]  {MEANING.get(name, name)}")
    lines += [f"  not applied: {clean(k, 120)} ({clean(v, 200)})" for k, v in list(b.skipped.items())[:_MAX_LISTED]]
    lines += [f"  note: {clean(n, 400)}" for n in b.notes]
    name, f = b.largest
    verdict = b.verdict()
    if verdict == LEARNED:
        lines.append(f"LEARNED: under {name} the file lowers the loss where the concept is {f.value:.3f} more than "
                     f"elsewhere (threshold {b.threshold:g}): it has learned to draw the concept")
    elif verdict == INCOMPLETE and not b.conclusive:
        lines.append(f"INCOMPLETE: no figure over {b.threshold:g} (largest {f.value:+.3f}), but these images cannot "
                     "show that a file did not learn the concept; give --exemplars DIR; this is not a NOT LEARNED")
    elif verdict == INCOMPLETE:
        lines.append(f"INCOMPLETE: {len(b.skipped)} layer(s) of the file could not be applied, so its behaviour was "
                     "not measured as a loader uses it; this is not a NOT LEARNED")
    else:
        lines.append(f"NOT LEARNED: every figure <= {b.threshold:g} (largest {f.value:+.3f}, {name}): with this "
                     "file the base is no better at the concept than at the rest")
    return lines


def _summary(report: AuditReport, verdict: str) -> str:
    checked = len(report.checked)
    blocking = len(report.blocking) + len(report.unknown_keys)
    if verdict == "FLAGGED":
        line = (f"FLAGGED: {len(report.flagged)} of {checked} checked layer(s) put more than {report.threshold:g} of "
                f"their change on the concept subspace (max {report.max_share:.3e})")
        passing = [k for k, v in report.by_clip_skip.items() if v <= report.threshold]
        if passing:
            per = ", ".join(f"clip_skip {k}: max {v:.3e}" for k, v in report.by_clip_skip.items())
            line += (f"; {per}: if the file is only ever used with clip_skip {passing[0]}, audit again with "
                     f"--clip-skip {passing[0]}")
        return line
    if verdict == "UNVERIFIED":
        if not report.verified:
            why = "no trusted base model (--base) and preset (--preset)"
        elif blocking:
            why = f"{blocking} layer(s) or tensor(s) not measured or not understood"
        else:
            why = ("0 layers checked: the file changes no layer that reads the text, so its weights cannot show "
                   "whether it learned the concept")
        return f"UNVERIFIED: {why}; this is not a pass"
    tail = (f"{checked} checked layer(s), max share on the concept subspace {report.max_share:.3e} <= "
            f"{report.threshold:g} (where the weights point, not whether the file draws the concept)")
    if verdict == "PASS-APPROXIMATE":
        return f"PASS-APPROXIMATE: {tail}; the file also trains {len(report.text_encoder_layers)} text-encoder " \
               f"layer(s), so the guarantee is approximate"
    return f"PASS: {tail}"


def format_inspect(info: dict[str, Any]) -> str:
    """``inspect``'s text: provenance (the preset TOML indented) and the host trainer's metadata, all cleaned."""
    out = [f"file:    {clean(info['file'], 300)}", f"tensors: {info['tensors']} ({info['layout']} layout)", ""]
    ours = dict(info["concept_exclusion"])
    if ours:
        toml = ours.pop("preset_toml", None)
        out.append("concept-exclusion provenance (claims of the file):")
        out += [f"  {clean(k, 60):<16} {clean(v or '-', 120)}" for k, v in ours.items()]
        if toml:
            out.append("  preset TOML:")
            out += ["    " + clean(line, 300) for line in toml.rstrip().splitlines()[:500]]
    else:
        out.append("concept-exclusion provenance: none (not written by concept-exclusion)")
    out += ["", f"other metadata ({len(info['host'])} keys):"]
    out += [f"  {clean(k, 80)}: {clean(v, 120)}" for k, v in info["host"].items()]
    return "\n".join(out)
