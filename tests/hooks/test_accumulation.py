"""Gradient accumulation and clipping: the projection sits in the tensor hooks, before both.

- accelerate's ``accumulate()`` with 4 micro-batches of 1 equals one batch of 4 (to float rounding);
- ``clip_grad_norm_`` measures, and scales, the already projected gradient.
"""

from __future__ import annotations

import copy

import pytest
import torch

from concept_exclusion import ConceptExclusion, ConceptSubspace
from concept_exclusion.hooks.gradient import project
from concept_exclusion.model.plan import projection_of

DIM = 32
STEPS = 2


def _subspace() -> ConceptSubspace:
    g = torch.Generator().manual_seed(11)
    return ConceptSubspace.from_rows({"context": torch.randn(5, DIM, generator=g, dtype=torch.float64)},
                                     energy=0.95, max_rank=4)


def _data(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(4, 4, 8, 8, generator=g), torch.randint(0, 1000, (4,), generator=g),
            torch.randn(4, 6, DIM, generator=g), torch.randn(4, 4, 8, 8, generator=g))


def _loss(unet, x, t, ctx, y):
    return torch.nn.functional.mse_loss(unet(x, t, encoder_hidden_states=ctx).sample, y)


@pytest.fixture(scope="module")
def base_unet():
    from concept_exclusion.testing.tiny import unet_sd

    return unet_sd(cross_attention_dim=DIM, seed=0)


def test_accumulate_4x1_equals_batch_4(base_unet):
    from accelerate import Accelerator

    sub = _subspace()
    # one batch of 4
    big = copy.deepcopy(base_unet)
    opt_big = torch.optim.SGD(big.parameters(), lr=0.1, momentum=0.9)
    ex_big = ConceptExclusion.attach(big, sub, projection_of(sub).overridden(mode="exact", targets="kv"),
                                     optimizer=opt_big)
    for step in range(STEPS):
        _loss(big, *_data(step)).backward()
        torch.nn.utils.clip_grad_norm_(big.parameters(), 1.0)
        opt_big.step()
        opt_big.zero_grad()
    # accelerate, 4 micro-batches of 1
    small = copy.deepcopy(base_unet)
    accelerator = Accelerator(gradient_accumulation_steps=4, cpu=True)
    opt_small = torch.optim.SGD(small.parameters(), lr=0.1, momentum=0.9)
    small, opt_small = accelerator.prepare(small, opt_small)
    ex_small = ConceptExclusion.attach(small, sub, projection_of(sub).overridden(mode="exact", targets="kv"),
                                       optimizer=opt_small)
    for step in range(STEPS):
        x, t, ctx, y = _data(step)
        for i in range(4):
            with accelerator.accumulate(small):
                accelerator.backward(_loss(small, x[i:i + 1], t[i:i + 1], ctx[i:i + 1], y[i:i + 1]))
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(small.parameters(), 1.0)
                opt_small.step()
                opt_small.zero_grad()
    assert ex_big.steps == ex_small.steps == STEPS, "post-step work must run on real steps only"
    unwrapped = accelerator.unwrap_model(small)
    worst = max(float((a - b).detach().abs().max()) for a, b in zip(big.parameters(), unwrapped.parameters()))
    assert worst <= 1e-5, f"accumulation differs from the full batch by {worst:.3e}"
    basis = sub.basis().float()
    initial = dict(base_unet.named_parameters())
    for t in ex_small.targets:
        delta = t.param.detach() - initial[t.name + ".weight"].detach()
        assert float(delta.abs().max()) > 1e-5, t.name
        assert float((delta @ basis).abs().max()) <= 1e-6, t.name


def test_clipping_sees_projected_gradient(base_unet):
    """The total norm clip_grad_norm_ reports is that of the projected gradients, and they stay projected."""
    sub = _subspace()
    basis = sub.basis().float()
    data = _data(0)
    plain = copy.deepcopy(base_unet)
    _loss(plain, *data).backward()
    raw = {n: p.grad.detach().clone() for n, p in plain.named_parameters()}

    guarded = copy.deepcopy(base_unet)
    exclusion = ConceptExclusion.attach(guarded, sub, projection_of(sub).overridden(mode="exact", targets="kv"))
    target_names = {t.name + ".weight" for t in exclusion.targets}
    assert len(target_names) == 8
    _loss(guarded, *data).backward()
    expected = {n: project(g, basis, "input") if n in target_names else g for n, g in raw.items()}
    # clip over the constrained weights only (a LoRA run's trainable set): there the projection matters
    want_norm = torch.sqrt(sum(expected[n].double().pow(2).sum() for n in target_names))
    raw_norm = torch.sqrt(sum(raw[n].double().pow(2).sum() for n in target_names))
    assert float(raw_norm) - float(want_norm) > 1e-3 * float(raw_norm), "projection removed nothing to measure"
    params = dict(guarded.named_parameters())
    max_norm = float(want_norm) / 4
    total = torch.nn.utils.clip_grad_norm_([params[n] for n in sorted(target_names)], max_norm)
    assert abs(float(total) - float(want_norm)) <= 1e-5 * float(want_norm), (float(total), float(want_norm),
                                                                            float(raw_norm))
    coef = max_norm / (float(total) + 1e-6)
    for n in target_names:
        g = params[n].grad
        assert torch.allclose(g, expected[n] * coef, rtol=1e-4, atol=1e-9), n
        assert float((g @ basis).abs().max()) <= 1e-6 * float(g.abs().max()), n
