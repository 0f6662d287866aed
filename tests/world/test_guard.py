"""Exemplar-gradient projection (a world experiment): after every optimizer step the update has no component in
the exemplar directions, the basis holds the difference of exemplar and control gradients, and it is refreshed on
its schedule."""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model

from concept_exclusion_world.guard import ExemplarGradientGuard
from concept_exclusion_world.model import new_denoiser
from concept_exclusion_world.text import MAX_TOKENS, WIDTH
from concept_exclusion_world.train import LORA_TARGETS


def _model():
    model = new_denoiser(1).requires_grad_(False)
    torch.nn.init.normal_(model.patch_out.weight, std=0.02)  # a denoiser that predicts something
    torch.manual_seed(0)
    return inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                              target_modules=list(LORA_TARGETS)), model)


def test_every_update_loses_its_exemplar_component():
    model = _model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    guard = ExemplarGradientGuard(model, params, torch.zeros(1, MAX_TOKENS, WIDTH), seed=0, n=8, directions=3,
                                  every=2)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    bases = []
    for _ in range(4):
        loss = model(x, torch.full((4,), 500), torch.randn(4, MAX_TOKENS, WIDTH)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        guard.before_step()
        before = guard.before.clone()
        opt.step()
        raw = torch.cat([p.detach().reshape(-1) for p in params]) - before
        guard.after_step()
        update = torch.cat([p.detach().reshape(-1) for p in params]) - before
        basis = guard.basis
        bases.append(basis.clone())
        assert basis.shape[1] == 3 and torch.allclose(basis.T @ basis, torch.eye(3), atol=1e-5)
        assert (basis.T @ update).abs().max() <= 1e-6 * update.norm()  # nothing left along the exemplar directions
        assert (basis.T @ raw).abs().max() > 1e-3 * raw.norm()  # and Adam's raw step had something there
        assert torch.allclose(update, raw - basis @ (basis.T @ raw), atol=1e-7)
    assert torch.equal(bases[0], bases[1]) and not torch.equal(bases[1], bases[2])  # refreshed every 2 steps
