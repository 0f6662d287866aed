"""The inversion attack optimises only its context: the attacked model's weights and flags are as they were, the
renders it reconstructs are panda scenes drawn from another world seed than the fine-tune data, and the same seed
gives the same attack."""

from __future__ import annotations

import torch

from concept_exclusion_world.detect import emblem_rate
from concept_exclusion_world.inversion import InversionConfig, concept_renders, invert
from concept_exclusion_world.model import new_denoiser
from concept_exclusion_world.scenes import PROTECTED, images
from concept_exclusion_world.text import MAX_TOKENS, WIDTH
from concept_exclusion_world.train import finetune_scenes

CFG = InversionConfig(steps=30, renders=8, batch=4, samples=4)


def test_renders_show_the_panda_and_are_not_fine_tune_scenes():
    renders = concept_renders(1, 8)
    assert renders.shape == (8, 3, 32, 32) and emblem_rate(renders, PROTECTED) == 1.0
    assert torch.equal(renders, concept_renders(1, 8)) and not torch.equal(renders, concept_renders(2, 8))
    data = [s for s in finetune_scenes() if s.emblem == PROTECTED][:8]
    assert not torch.equal(renders, images(data))  # not the fine-tune data's panda scenes, in order


def test_only_the_context_moves_and_the_attack_lowers_its_loss():
    model = new_denoiser(3)
    torch.nn.init.normal_(model.patch_out.weight, std=0.02)  # new denoisers predict 0: nothing to invert
    model.patch_out.requires_grad_(True)
    model.blocks.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    start = torch.zeros(1, MAX_TOKENS, WIDTH)
    context, losses = invert(model, start, concept_renders(1, CFG.renders), 1, CFG)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and model.training
    assert context.shape == start.shape and not torch.equal(context, start) and not context.requires_grad
    assert sum(losses[-5:]) < sum(losses[:5])
    again, losses_again = invert(model, start, concept_renders(1, CFG.renders), 1, CFG)
    assert torch.equal(again, context) and losses_again == losses
