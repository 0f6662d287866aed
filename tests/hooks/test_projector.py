"""The projection against an independent dense reference P = I - U U^T; linearity, idempotence, non-finite safety."""

from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from concept_exclusion.hooks.gradient import WeightProjector, Constraint, _grad_hook, project
from concept_exclusion.model.targets import Target


def _basis(d: int, r: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
    return q


def test_input_side_matches_dense_reference():
    u = _basis(24, 5)
    g = torch.randn(7, 24, dtype=torch.float64)
    dense = torch.eye(24, dtype=torch.float64) - u @ u.T
    assert torch.allclose(project(g, u, "input"), g @ dense, atol=1e-12)
    assert torch.allclose(project(g, u, "input", 0.3), g @ (torch.eye(24, dtype=torch.float64) - 0.3 * u @ u.T),
                          atol=1e-12)


def test_output_side_matches_dense_reference():
    q = _basis(12, 3, seed=1)
    g = torch.randn(12, 9, dtype=torch.float64)
    assert torch.allclose(project(g, q, "output"), (torch.eye(12, dtype=torch.float64) - q @ q.T) @ g, atol=1e-12)


def test_stored_value_is_restored():
    u = _basis(10, 3)
    w0 = torch.randn(6, 10, dtype=torch.float64)
    stored = w0 @ u
    w = w0 + torch.randn(6, 10, dtype=torch.float64)
    restored = project(w, u, "input", 1.0, stored)
    assert torch.allclose(restored @ u, stored, atol=1e-12)
    assert torch.allclose((restored - w0) @ u, torch.zeros(6, 3, dtype=torch.float64), atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(d=st.integers(2, 16), r=st.integers(1, 16), rows=st.integers(1, 8), side=st.sampled_from(["input", "output"]),
       a=st.floats(-3, 3), b=st.floats(-3, 3), seed=st.integers(0, 10_000))
def test_linear_and_idempotent(d, r, rows, side, a, b, seed):
    r = min(r, d)
    u = _basis(d, r, seed)
    gen = torch.Generator().manual_seed(seed)
    shape = (rows, d) if side == "input" else (d, rows)
    x, y = (torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(2))
    px = project(x, u, side)
    assert torch.allclose(project(a * x + b * y, u, side), a * px + b * project(y, u, side), atol=1e-9)
    assert torch.allclose(project(px, u, side), px, atol=1e-9)


def test_grad_hook_keeps_nonfinite_in_place_and_spreads_nothing():
    u = _basis(8, 2).float()
    g = torch.randn(4, 8)
    g[1, 3] = float("nan")
    g[2, 5] = float("inf")
    out = _grad_hook(u, "input", 1.0)(g)
    assert torch.isnan(out[1, 3]) and torch.isinf(out[2, 5])
    finite = torch.isfinite(g)
    assert int((~torch.isfinite(out)).sum()) == 2
    clean = torch.where(finite, g, torch.zeros(()))
    assert torch.allclose(out[finite], project(clean, u, "input")[finite], atol=1e-6)


def test_grad_hook_computes_in_float32_and_returns_input_dtype():
    u = _basis(16, 4).float()
    g = torch.randn(8, 16).to(torch.bfloat16)
    out = _grad_hook(u, "input", 1.0)(g)
    assert out.dtype == torch.bfloat16
    assert float((out.float() @ u).abs().max()) < 2e-2 * float(g.float().abs().max())


def test_weight_projector_batches_lora_factors_like_the_reference():
    u = _basis(16, 4, seed=3)
    params = [torch.nn.Parameter(torch.randn(4, 16)) for _ in range(3)]
    ref = [project(p.detach().double(), u, "input") for p in params]
    targets = [Target(f"t{i}", "key", "lora", "input", p, None, u) for i, p in enumerate(params)]
    WeightProjector([Constraint(t, u.float(), None) for t in targets])()
    for p, r in zip(params, ref):
        assert torch.allclose(p.double(), r, atol=1e-5)
        assert float((p.detach().double() @ u).abs().max()) < 1e-5
