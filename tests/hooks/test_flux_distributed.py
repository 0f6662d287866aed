"""Flux on two CPU processes (DDP, gloo) with exact mode and context projection equals one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fakes import ddp_flux_worker

WORKER = Path(__file__).parents[1] / "fakes" / "ddp_flux_worker.py"


@pytest.mark.slow
def test_two_process_ddp_flux_equals_one_process(tmp_path):
    single = ddp_flux_worker.train(rank=0, world=1)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    weights = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    assert all(r["world"] == 2 and r["project_context"] and r["targets"] == single["targets"] == 2 for r in ranks)
    assert max(r["max_leakage"] for r in ranks) < 1e-5 and single["max_leakage"] < 1e-5
    assert set(weights[0]) == set(single["weights"])
    for name, w in single["weights"].items():
        assert torch.equal(weights[0][name], weights[1][name]), name
        assert torch.allclose(weights[0][name], w, atol=2e-6, rtol=1e-4), name
    from helpers.mmdit import FLUX_LORA, READERS, add_lora

    from concept_exclusion.testing.tiny_mmdit import flux_transformer

    model = flux_transformer(joint_attention_dim=ddp_flux_worker.T5, pooled_projection_dim=ddp_flux_worker.POOLED)
    start = add_lora(model, FLUX_LORA + READERS)
    initial = {n: p.detach() for n, p in start.named_parameters() if p.requires_grad}
    assert max(float((single["weights"][n] - w).abs().max()) for n, w in initial.items()) > 1e-3  # it trained
