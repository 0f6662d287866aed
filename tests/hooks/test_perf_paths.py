"""The fast paths give the reference results: fused gradient hook, concatenated/in-place post-step
projection, one device basis per basis, no leakage snapshots where none are needed."""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

from concept_exclusion import ConceptExclusion, ConceptSubspace
from concept_exclusion.concept.preset import Projection
from concept_exclusion.hooks.gradient import WeightProjector, Constraint, project, project_grad
from concept_exclusion.model.targets import Target
from concept_exclusion.options import AttachOptions


def _basis(d: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), d=st.integers(2, 20), k=st.integers(1, 20), side=st.sampled_from(["input", "output"]),
       strength=st.sampled_from([1.0, 0.3]), n_bad=st.integers(0, 3), seed=st.integers(0, 999))
def test_project_grad_matches_masked_reference(rows, d, k, side, strength, n_bad, seed):
    """Finite entries = projection of the gradient with non-finite entries zeroed; non-finite ones unchanged."""
    k = min(k, d)
    u = _basis(d, k, seed).float()
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn((rows, d) if side == "input" else (d, rows), generator=gen)
    flat = g.view(-1)
    bad_values = (float("nan"), float("inf"), float("-inf"))
    for i in range(min(n_bad, flat.numel())):
        flat[(i * 7919 + seed) % flat.numel()] = bad_values[i % 3]
    finite = torch.isfinite(g)
    reference = torch.where(finite, project(torch.where(finite, g, torch.zeros(())), u, side, strength), g)
    out = project_grad(g, u, side, strength)
    assert torch.equal(torch.isfinite(out), finite)
    assert torch.equal(torch.isnan(out), torch.isnan(g)) and torch.equal(out[torch.isinf(g)], g[torch.isinf(g)])
    assert torch.allclose(out[finite], reference[finite], atol=1e-5)


def _constraints(shapes, side, basis, dtype=torch.float32, shared=True):
    out = []
    for i, s in enumerate(shapes):
        p = torch.nn.Parameter(torch.randn(s).to(dtype))
        b = basis if shared else basis.clone()
        out.append(Constraint(Target(f"t{i}", "key", "lora", side, p, None, basis.double()), b, None))
    return out


@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_projector_groups_match_reference(side, shared, dtype):
    """Mixed shapes sharing one basis (concatenated) or not (in place) all land on the constraint."""
    u = _basis(32, 6, seed=1).float()
    shapes = [(4, 32), (8, 32), (16, 32)] if side == "input" else [(32, 4), (32, 8), (32, 16)]
    cons = _constraints(shapes, side, u, dtype, shared)
    refs = [project(c.target.param.detach().double(), u.double(), side).to(dtype) for c in cons]
    wp = WeightProjector(cons)
    assert wp.batching[0] == (1 if shared else 0)
    wp()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for c, ref in zip(cons, refs):
        p = c.target.param.detach()
        assert p.dtype == dtype
        assert torch.allclose(p.double(), ref.double(), atol=tol)
        part = p.double() @ u.double() if side == "input" else u.double().T @ p.double()
        assert float(part.abs().max()) <= tol * max(1.0, float(p.double().abs().max()))


def test_large_groups_are_projected_in_place():
    u = _basis(16, 3).float()
    cons = _constraints([(4, 16), (4, 16)], "input", u)
    storages = [c.target.param.data_ptr() for c in cons]
    assert WeightProjector(cons).batching == (1, 0)  # 128 elements: concatenated by default
    wp = WeightProjector(cons, batch_numel=10)
    assert wp.batching == (0, 2)
    wp()
    for c, ptr in zip(cons, storages):
        assert c.target.param.data_ptr() == ptr
        assert float((c.target.param.detach() @ u).abs().max()) < 1e-5


def test_full_weight_is_restored_to_its_stored_value_in_place():
    u = _basis(16, 4, seed=2).float()
    w = torch.nn.Parameter(torch.randn(8, 16))
    stored = w.detach() @ u
    c = Constraint(Target("w", "key", "full", "input", w, None, u.double()), u, stored)
    with torch.no_grad():
        w.add_(torch.randn(8, 16))
    ptr = w.data_ptr()
    WeightProjector([c])()
    assert w.data_ptr() == ptr
    assert torch.allclose(w.detach() @ u, stored, atol=1e-5)


def _kv_model(lora: bool, rank: int = 4):
    model = torch.nn.Module()
    for blk in range(2):
        attn = torch.nn.Module()
        attn.to_k = torch.nn.Linear(24, 16 * (blk + 1), bias=False)
        attn.to_v = torch.nn.Linear(24, 16 * (blk + 1), bias=False)
        model.add_module(f"b{blk}", torch.nn.Module())
        getattr(model, f"b{blk}").attn2 = attn
    if lora:
        from peft import LoraConfig, inject_adapter_in_model

        model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_k", "to_v"]), model)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
    return model


def _subspace():
    return ConceptSubspace.from_rows({"context": torch.randn(5, 24, dtype=torch.float64)}, energy=1.0, max_rank=5)


def test_one_device_basis_for_all_key_value_targets():
    ex = ConceptExclusion.attach(_kv_model(lora=True), _subspace(), Projection(mode="exact", targets=("kv",)))
    held = ex.memory()
    assert held["constraints"] == 4
    assert held["device_bases"] == ex.subspace.basis().float().nbytes  # one float32 copy of the basis for all four


def test_strength_zero_installs_no_hooks():
    model = _kv_model(lora=True)
    ConceptExclusion.attach(model, _subspace(), Projection(mode="gradient", strength=0.0, targets=("kv",)))
    assert all(not p._backward_hooks for p in model.parameters() if p.requires_grad)


def _train(model, ex, steps=5):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ex.register_optimizer(opt)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = sum((m(torch.randn(3, 24, generator=gen)) ** 2).mean() for n, m in model.named_modules()
                   if n.endswith(("to_k", "to_v")))
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_lora_starting_at_zero_keeps_no_snapshot_and_reports_the_same_leakage():
    model = _kv_model(lora=True)
    ex = ConceptExclusion.attach(model, _subspace(), Projection(mode="gradient", strength=0.5, targets=("kv",)))
    assert ex.memory()["snapshots"] == 0  # PEFT's lora_B starts at 0
    _train(model, ex)
    u = ex.subspace.basis()
    for t in ex.targets:
        delta = (t.other.detach() @ t.param.detach()).double()
        expected = float((delta @ u).norm() / delta.norm())
        assert ex.leakage()[t.name] == pytest.approx(expected, rel=1e-4)
        assert expected > 1e-3  # gradient mode at strength 0.5 leaks: the comparison means something
    state = ex.state_dict()
    assert not any(k.startswith("initial.") for k in state)
    assert all(f"initial_zero.{t.name}" in state for t in ex.targets)
    # resuming: the adapter is no longer 0, so a fresh attach snapshots it; the saved state says it was 0
    again = ConceptExclusion.attach(model, ex.subspace, Projection(mode="gradient", strength=0.5, targets=("kv",)))
    assert all(f"initial.{t.name}" in again.state_dict() for t in again.targets)
    again.load_state_dict(state)
    assert again.leakage() == pytest.approx(ex.leakage(), rel=1e-6)


def test_lora_not_starting_at_zero_keeps_its_snapshot():
    model = _kv_model(lora=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    ex = ConceptExclusion.attach(model, _subspace(), Projection(mode="gradient", strength=0.5, targets=("kv",)))
    assert ex.memory()["snapshots"] == sum((t.param.numel() + t.other.numel()) * 4 for t in ex.targets)
    initial = {t.name: (t.other.detach() @ t.param.detach()).double() for t in ex.targets}
    _train(model, ex)
    u = ex.subspace.basis()
    for t in ex.targets:
        delta = (t.other.detach() @ t.param.detach()).double() - initial[t.name]
        assert ex.leakage()[t.name] == pytest.approx(float((delta @ u).norm() / delta.norm()), rel=1e-4)
    state = ex.state_dict()
    assert all(f"initial.{t.name}" in state and f"initial_other.{t.name}" in state for t in ex.targets)


@pytest.mark.parametrize("mode", ["exact", "gradient"])
def test_full_weights_without_snapshots(mode):
    model = _kv_model(lora=False)
    ex = ConceptExclusion.attach(model, _subspace(),
                                 Projection(mode=mode, strength=1.0 if mode == "exact" else 0.3, targets=("kv",)),
                                 options=AttachOptions(leakage_snapshots=False))
    assert ex.memory()["snapshots"] == 0
    before = {t.name: t.param.detach().clone() for t in ex.targets}
    _train(model, ex)
    u = ex.subspace.basis().float()
    leak = ex.leakage()
    for t in ex.targets:
        s0 = before[t.name] @ u
        expected = float((t.param.detach() @ u - s0).norm() / s0.norm())
        assert leak[t.name] == pytest.approx(expected, rel=1e-3, abs=1e-7)
    if mode == "exact":
        assert max(leak.values()) < 1e-5
    else:
        assert max(leak.values()) > 1e-3
    state = ex.state_dict()
    assert not any(k.startswith(("initial.", "initial_zero.")) for k in state)
    assert all(f"stored.{t.name}" in state for t in ex.targets)
    ex.load_state_dict(state)


def test_benchmark_writes_the_promised_json(tmp_path, monkeypatch):
    """benchmarks/overhead.py runs from a checkout and writes rows with case / naive_over_ours."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "overhead.py"
    spec = importlib.util.spec_from_file_location("overhead_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.json"
    assert bench.main(["--quick", "--only", "sd15-lora16", "--budget", "0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["case"] for r in rows] == ["sd15-lora16-k32"]
    row = rows[0]
    assert row["targets"] == 32 and row["naive_over_ours"] > 1.0
    assert row["max_rel_diff_vs_naive"] < 1e-3 and row["max_leakage_after_step"] < 1e-5
    assert row["memory"]["snapshots"] == 0 and row["extra_bytes"] == 768 * 32 * 4
    assert row["machine"]["torch"] == torch.__version__
