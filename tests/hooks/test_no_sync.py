"""The hot path (gradient hooks and exact mode's post-step projection) never synchronises host and device.

Checked two ways, on CPU:
- a ``TorchDispatchMode`` that sees every aten op the hooks and ``after_optimizer_step`` run and
  fails on any op that hands a value to Python (``item``/``_local_scalar_dense``/``is_nonzero``/
  ``equal``: every op whose result is a Python number) or moves a tensor to another device;
- the same code on the ``meta`` device, where tensors have no values at all: any ``.item()``,
  ``bool(tensor)`` (a Python branch on a value), ``.tolist()`` or ``.cpu()`` raises or is recorded
  (on CPU, ``.tolist()`` and ``.cpu()`` bypass the dispatcher, hence this second check).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from concept_exclusion import ConceptExclusion, ConceptSubspace
from concept_exclusion.concept.preset import Projection
from concept_exclusion.hooks.gradient import GradientProjector, WeightProjector, Constraint, project_grad
from concept_exclusion.model.targets import Target

HOST_READS = {"_local_scalar_dense", "is_nonzero", "item", "equal", "allclose",
              # outputs whose shape depends on values: a device-to-host sync on CUDA
              "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive"}


class HostSyncGuard(TorchDispatchMode):
    """Records every aten op; ``violations`` lists those that read values to the host or change device."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.violations: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops.append(name)
        if name in HOST_READS:
            self.violations.append(f"{name} (reads a value to the host)")
        if name in ("index", "index_put", "index_put_") and any(t.dtype == torch.bool for t in _tensors(args[1:2])):
            self.violations.append(f"{name} with a boolean mask (its output shape depends on values)")
        devices_in = {a.device for a in _tensors(args) + _tensors(list(kwargs.values()))}
        target = kwargs.get("device")
        if devices_in and target is not None and torch.device(target) not in devices_in:
            self.violations.append(f"{name} moves a tensor from {devices_in} to {target}")
        out = func(*args, **kwargs)
        if isinstance(out, (bool, int, float, complex)):
            self.violations.append(f"{name} returned a Python {type(out).__name__}")
        devices_out = {t.device for t in _tensors([out])}
        if devices_in and devices_out - devices_in:
            self.violations.append(f"{name} moved a tensor from {devices_in} to {devices_out - devices_in}")
        return out


def _tensors(items) -> list[torch.Tensor]:
    found = []
    for x in items:
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, (list, tuple)):
            found.extend(_tensors(x))
    return found


def _basis(d: int, k: int, device: str = "cpu") -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, dtype=torch.float64))
    return q.to(device)


def test_guard_catches_host_reads_and_device_moves():
    """The checker itself fails on the things it is meant to catch (so the tests below can fail)."""
    x = torch.randn(4, 4)
    for bad in (lambda: x.sum().item(), lambda: bool((x > 0).any()), lambda: x[x > 0],
                lambda: torch.equal(x, x), lambda: x.to("meta")):
        with HostSyncGuard() as guard:
            bad()
        assert guard.violations, bad
    meta = torch.empty(3, 3, device="meta")
    with HostSyncGuard() as guard, pytest.raises(NotImplementedError):
        meta.to("cpu")
    assert guard.violations


def _peft_model(rank: int = 4):
    from peft import LoraConfig, inject_adapter_in_model

    model = torch.nn.Module()
    model.attn2 = torch.nn.Module()
    model.attn2.to_k = torch.nn.Linear(24, 16, bias=False)
    model.attn2.to_v = torch.nn.Linear(24, 16, bias=False)
    model.attn2.to_q = torch.nn.Linear(16, 16, bias=False)
    model.attn2.heads = 2
    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_k", "to_v"]), model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model


def _full_model():
    model = torch.nn.Module()
    model.attn2 = torch.nn.Module()
    model.attn2.to_k = torch.nn.Linear(24, 16, bias=False)
    model.attn2.to_v = torch.nn.Linear(24, 16, bias=False)
    return model


@pytest.mark.parametrize("make, mode", [(_peft_model, "exact"), (_full_model, "exact"), (_peft_model, "gradient"),
                                        (_full_model, "gradient")])
def test_hooks_and_post_step_make_no_host_reads(make, mode):
    """Real ``ConceptExclusion`` on CPU: its hooks and its post-step work run only device-side ops."""
    model = make()
    sub = ConceptSubspace.from_rows({"context": torch.randn(5, 24, dtype=torch.float64)}, energy=1.0, max_rank=5)
    ex = ConceptExclusion.attach(model, sub,
                                 Projection(mode=mode, strength=1.0 if mode == "exact" else 0.7, targets=("kv",)))
    hooks = [(list(t.param._backward_hooks.values()), t.param) for t in ex.targets]
    assert all(len(h) == 1 for h, _ in hooks)
    grads = []
    for _, p in hooks:
        g = torch.randn_like(p)
        g[0, 0] = float("nan")  # non-finite entries must not force a branch either
        grads.append(g)
    with HostSyncGuard() as guard:
        outs = [h[0](g) for (h, _), g in zip(hooks, grads)]
        with torch.no_grad():
            for t in ex.targets:
                t.param.add_(0.01)
        ex.after_optimizer_step()
    assert not guard.violations, guard.violations
    assert {"addmm", "nan_to_num"} <= set(guard.ops)
    assert not {"isfinite", "where"} & set(guard.ops), "the hook should not need isfinite/where passes"
    for out, g in zip(outs, grads):
        assert torch.isnan(out[0, 0]) and int((~torch.isfinite(out)).sum()) == 1
    assert ex.max_leakage() < 1e-5 if mode == "exact" else True


@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hot_path_runs_on_meta_tensors(side, dtype):
    """On the meta device a value read cannot even happen: any .item()/bool()/.cpu() would fail or be caught."""
    device = "meta"
    basis = _basis(24, 5, device).float()
    shapes = [(4, 24), (8, 24), (16, 24)] if side == "input" else [(24, 4), (24, 8), (24, 16)]
    params = [torch.nn.Parameter(torch.empty(s, device=device, dtype=dtype)) for s in shapes]
    lora = [Constraint(Target(f"l{i}", "key", "lora", side, p, None, None), basis, None)
            for i, p in enumerate(params[:2])]
    stored = torch.empty((16, 5) if side == "input" else (5, 16), device=device)
    full = Constraint(Target("w", "key", "full", side, params[2], None, None), basis, stored)
    with HostSyncGuard() as guard:
        GradientProjector(lora + [full], 0.5).attach()  # registering hooks is not the hot path, but costs nothing
        for p in params:
            out = project_grad(torch.empty_like(p), basis, side, 0.5)
            assert out.dtype == dtype and out.device.type == device
        WeightProjector(lora + [full])()
    assert not guard.violations, guard.violations
