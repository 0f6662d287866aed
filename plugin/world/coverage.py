"""How much of the brand's text-encoder signal the concept basis covers (a sampling-free diagnostic).

For the fine-tune data's logo captions: the share of squared norm inside span(U) of (a) the brand
token's state, (b) every state from the brand on, (c) the caption's states minus those of the same
caption with "with the <brand> logo" removed (what the phrase adds, position by position), (d) the
caption with only the name removed ("with the logo"), and (e) captions without the brand at all.
(c) below 1 means part of what the phrase adds lies outside the basis and stays learnable;
a large (e) means the basis also covers generic caption content.
"""

from __future__ import annotations

import torch

from .model import Base
from .scenes import BRAND
from .train import finetune_scenes, subspace_for


@torch.no_grad()
def coverage(base: Base, token_options=("all", "concept", "contrastive", "contrastive+concept"),
             n: int = 200, extra_presets=(("world-logo-phrase", "all"),)) -> list[dict]:
    scenes = [s for s in finetune_scenes() if s.logo][:n]
    tok = base.text.tokenizer
    with_brand = base.text.encode([s.caption() for s in scenes]).double()
    without = base.text.encode([s.caption(brand=False) for s in scenes]).double()
    name_only = base.text.encode([s.caption().replace(f" {BRAND} ", " ") for s in scenes]).double()
    ids = base.text.ids([scenes[0].caption()])[0].tolist()
    pos = next(i for i, t in enumerate(ids) if tok.convert_ids_to_tokens(t).startswith(BRAND))
    rows = []
    for preset, tokens in [("world-logo", t) for t in token_options] + list(extra_presets):
        u = subspace_for(base, tokens, preset).basis()

        def share(h: torch.Tensor) -> float:
            return float((h @ u).square().sum() / h.square().sum())

        rows.append({"preset": preset, "tokens": tokens, "rank": u.shape[1], "brand_token": share(with_brand[:, pos]),
                     "from_brand_on": share(with_brand[:, pos:]), "phrase_adds": share(with_brand - without),
                     "name_adds": share(with_brand - name_only), "brand_free_captions": share(without)})
    return rows


def coverage_table(rows: list[dict]) -> str:
    head = "| preset | tokens | rank | brand token | states from the brand on | what the phrase adds | what the name adds | brand-free captions |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['tokens']} | {r['rank']} | {r['brand_token']:.0%} | {r['from_brand_on']:.0%} | "
                     f"{r['phrase_adds']:.0%} | {r['name_adds']:.0%} | {r['brand_free_captions']:.0%} |")
    return "\n".join(lines)
