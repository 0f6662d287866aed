"""Multi-process training on CPU with gloo: DDP and FSDP2 keep the exclusion, and equal a single process.

Two real processes are started by ``torch.distributed.run`` (torchrun) running tests/ddp_worker.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fakes import ddp_worker
from concept_exclusion import ConceptExclusion, TargetError
from concept_exclusion.hooks.dtensor import is_sharded, local_tensor
from concept_exclusion.model.plan import check_sharded, plan_exclusion, projection_of

WORKER = Path(__file__).parents[1] / "fakes" / "ddp_worker.py"


_SINGLE: dict[str, dict] = {}


def single_run(lora: bool, context: bool = False) -> dict:
    """The single-process reference with the same global batch (full weights, or PEFT LoRA; context projected)."""
    key = "none-lora" if lora else ("none-context" if context else "none")
    if key not in _SINGLE:
        torch.set_num_threads(1)
        _SINGLE[key] = ddp_worker.train(key, rank=0, world=1)
    return _SINGLE[key]


@pytest.fixture(scope="module")
def single():
    return single_run(lora=False)


def _launch(wrap: str, out: Path) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), "--wrap", wrap, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) | {"weights": load_file(out / f"rank{r}.safetensors")}
            for r in range(2)]


def _check_invariant(weights: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> float:
    """Largest |dW_eff U| over to_k/to_v: full weights W - W0, LoRA up @ down (up starts at 0)."""
    basis = ddp_worker.subspace().basis().float()
    worst = 0.0
    for name, w0 in initial.items():
        if ".lora_B." in name or ("lora_A" in name and "to_out" in name) or "to_out" in name:
            continue
        if ".lora_A." in name:
            up = weights[name.replace(".lora_A.", ".lora_B.")]
            assert float(up.abs().max()) > 1e-5, f"{name}: the LoRA did not train"
            delta = up @ weights[name]
            worst = max(worst, float((weights[name] @ basis).abs().max()))
        else:
            delta = weights[name] - w0
            assert float(delta.abs().max()) > 1e-5, f"{name} did not train"
        worst = max(worst, float((delta @ basis).abs().max()))
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("wrap", ["ddp", "ddp-context", "fsdp", "fsdp-lora"])
def test_two_processes_match_single_process(wrap, tmp_path):
    single = single_run(lora=wrap.endswith("-lora"), context=wrap.endswith("-context"))
    if wrap.endswith("-context"):  # the projected context changes what is learnt, on every rank alike
        plain = single_run(lora=False)["weights"]
        assert max(float((single["weights"][n] - plain[n]).abs().max()) for n in plain) > 1e-4
    ranks = _launch(wrap, tmp_path)
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["pid"] != ranks[1]["pid"]
    assert ranks[0]["targets"] == ranks[1]["targets"] == single["targets"] == 8
    assert ranks[0]["steps"] == ranks[1]["steps"] == ddp_worker.STEPS
    w0, w1, ref = ranks[0]["weights"], ranks[1]["weights"], single["weights"]
    assert w0.keys() == w1.keys() == ref.keys()
    for name in ref:
        assert torch.equal(w0[name], w1[name]), f"{name} differs between ranks"
    worst = max(float((w0[n] - ref[n]).abs().max()) for n in ref)
    assert worst <= 1e-5, f"{wrap}: largest difference from the single-process run {worst:.3e}"
    moved = max(float((ref[n] - single["initial"][n]).abs().max()) for n in single["initial"])
    assert moved > 1e-4, "the constrained weights did not train"
    assert len(single["initial"]) == (24 if wrap.endswith("-lora") else 8)
    for weights in (w0, w1):
        assert _check_invariant(weights, single["initial"]) <= 1e-6
    # leakage() is relative to ||dW|| (~1e-3 after 3 steps); the float32 floor of W (|W| ~ 3) is ~1e-7 absolute
    assert ranks[0]["max_leakage"] == ranks[1]["max_leakage"] <= 1e-3


def test_single_process_keeps_invariant(single):
    assert _check_invariant(single["weights"], single["initial"]) <= 1e-6


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_output_side_targets_are_refused_when_sharded(one_rank_group):
    """to_q's constraint U^T dW = 0 mixes rows of several ranks: attach must refuse it, not train without it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from concept_exclusion.model.targets import Target

    mesh = init_device_mesh("cpu", (1,))
    w = nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
    basis = torch.linalg.qr(torch.randn(8, 2, dtype=torch.float64))[0]
    assert is_sharded(w) and local_tensor(w).shape == (8, 4)
    out_side = Target("x.attn2.to_q", "query", "full", "output", w, None, basis)
    with pytest.raises(TargetError, match="output side"):
        check_sharded([out_side])
    cols = nn.Parameter(distribute_tensor(torch.randn(4, 8), mesh, [Shard(1)]))
    basis_in = torch.linalg.qr(torch.randn(8, 2, dtype=torch.float64))[0]
    col_sharded = Target("x.attn2.to_k", "key", "full", "input", cols, None, basis_in)
    with pytest.raises(TargetError, match="dim 0"):
        check_sharded([col_sharded])


def test_fsdp1_wrapper_is_refused(sd):
    """The legacy FullyShardedDataParallel wrapper is refused by attach with a TargetError naming it."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    class Wrapped(FullyShardedDataParallel):  # an instance check only: no process group is built
        def __init__(self):
            nn.Module.__init__(self)
            self._fsdp_wrapped_module = nn.Linear(2, 2)

    from concept_exclusion import ConceptSubspace

    sub = ConceptSubspace.from_rows({"context": torch.randn(3, 32, dtype=torch.float64)})
    holder = nn.Module()
    holder.inner = Wrapped()
    with pytest.raises(TargetError, match="inner is wrapped by FullyShardedDataParallel"):
        plan_exclusion(holder, sub)
    unet = sd.unet()
    unet.add_module("fsdp_marker", Wrapped())
    with pytest.raises(TargetError, match="FSDP1"):
        ConceptExclusion.attach(unet, sub, projection_of(sub).overridden(mode="exact", targets="kv"))


def test_zero3_partitioned_parameters_are_refused(sd):
    """DeepSpeed is not installed here: a MOCK ZeRO-3 parameter (the ``ds_id`` attribute DeepSpeed sets)."""
    from concept_exclusion import ConceptSubspace

    unet = sd.unet()
    for name, p in unet.named_parameters():
        if name.endswith("attn2.to_k.weight"):
            p.ds_id = 7
    sub = ConceptSubspace.from_rows({"context": torch.randn(3, 32, dtype=torch.float64)})
    with pytest.raises(TargetError, match="ZeRO-3"):
        ConceptExclusion.attach(unet, sub, projection_of(sub).overridden(mode="exact", targets="kv"))


def test_sharded_projection_in_process(one_rank_group):
    """The DTensor path on a 1-rank mesh: post-accumulate hook projects .grad (inf/nan kept), step re-projects."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from concept_exclusion.hooks.gradient import Constraint, constraint_value
    from concept_exclusion.hooks.sharded import ShardedGradientProjector, ShardedWeightProjector
    from concept_exclusion.model.targets import Target

    mesh = init_device_mesh("cpu", (1,))
    torch.manual_seed(0)
    w = nn.Parameter(distribute_tensor(torch.randn(6, 8), mesh, [Shard(0)]))
    basis64 = torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64))[0]
    basis = basis64.float()
    stored = constraint_value(local_tensor(w), basis, "input")
    c = Constraint(Target("b.attn2.to_k", "key", "full", "input", w, None, basis64), basis, stored)
    grads = ShardedGradientProjector([c], 1.0).attach()
    g = torch.randn(6, 8)
    g[2, 5] = float("inf")
    g[4, 1] = float("nan")
    (w * distribute_tensor(g, mesh, [Shard(0)])).sum().backward()
    out = local_tensor(w.grad)
    bad = ~torch.isfinite(g)
    assert torch.equal(~torch.isfinite(out), bad)
    clean = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
    assert torch.allclose(out[~bad], (clean - clean @ basis @ basis.T)[~bad], atol=1e-6)
    w0 = local_tensor(w).detach().clone()
    with torch.no_grad():
        local_tensor(w).add_(torch.randn(6, 8))  # an unconstrained update, as an optimizer step would make
    ShardedWeightProjector([c])()
    assert float(((local_tensor(w).detach() - w0) @ basis).abs().max()) <= 1e-5
    grads.detach()
    w.grad = None
    (w * distribute_tensor(g, mesh, [Shard(0)])).sum().backward()
    after = local_tensor(w.grad)  # hooks removed: the raw gradient, untouched
    assert torch.equal(after.isnan(), g.isnan()) and torch.equal(torch.nan_to_num(after), torch.nan_to_num(g))
