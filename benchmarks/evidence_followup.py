"""World-2 follow-up table: the gap to the scrub-name control closed per seed, for basis variants whose runs
live in benchmarks/evidence-w2-lora-s*/results.json and benchmarks/evidence-w2-extra-*-s*.json. Prints markdown.

Usage (from a checkout): python benchmarks/evidence_followup.py"""

import json, glob, statistics as st
methods = ['exact-attention', 'exact-attention-contrastive+concept', 'exact-attention-contexts', 'exact-attention-contexts-preserve']
rows = {m: [] for m in methods}
for seed in (0, 1, 2):
    base = {r['method']: r for r in json.load(open(f'benchmarks/evidence-w2-lora-s{seed}/results.json'))['runs']}
    extra = {}
    for f in glob.glob(f'benchmarks/evidence-w2-extra-*-s{seed}.json'):
        for r in json.load(open(f))['runs']:
            extra[r['method']] = r
    p, c = base['plain']['probe']['mean'], base['scrub-name']['probe']['mean']
    pa = base['plain']['allowed_probe']['mean']
    for m in methods:
        r = base.get(m) or extra.get(m)
        if r is None:
            continue
        rows[m].append(dict(seed=seed, gap=(p - r['probe']['mean']) / (p - c), kept=r['allowed_probe']['mean'] / pa,
                            held=r['heldout_loss'] / base['plain']['heldout_loss'] - 1, rank=r['subspace_rank'],
                            wl=r['max_weight_leakage']))
print("| method | seeds | rank | gap to control closed, per seed | mean | allowed probe kept, per seed | held-out vs plain, per seed | weight leakage (max) |")
print("|---|---|---|---|---|---|---|---|")
for m in methods:
    rs = rows[m]
    if not rs:
        continue
    f = lambda k, fmt: " / ".join(format(r[k], fmt) for r in rs)
    print(f"| {m} | {len(rs)} | {rs[0]['rank']} | {f('gap', '+.0%')} | {st.mean(r['gap'] for r in rs):+.0%} | {f('kept', '.0%')} | {f('held', '+.0%')} | {max(r['wl'] for r in rs):.1e} |")
