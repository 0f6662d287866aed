"""region_loss: nothing inside the concept's region reaches the gradient ("ignore"); with a base prediction the
region is pulled to it; masks come to latent size without losing a sliver of the concept."""

from __future__ import annotations

import torch

from concept_exclusion.regions import latent_mask, region_loss


def test_nothing_inside_the_region_is_learned():
    pred = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randn(2, 4, 8, 8)
    concept = torch.zeros(2, 1, 8, 8)
    concept[0, :, :3, 5:] = 1
    region_loss(pred, target, concept).backward()
    inside = concept.expand_as(pred) > 0
    assert pred.grad[inside].abs().max() == 0 and pred.grad[~inside].abs().min() > 0
    outside = ~inside
    expected = (pred.detach() - target)[outside].pow(2).mean()
    assert torch.allclose(region_loss(pred.detach(), target, concept), expected)


def test_without_a_concept_it_is_the_plain_loss():
    pred, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    assert torch.allclose(region_loss(pred, target, torch.zeros(3, 1, 8, 8)),
                          torch.nn.functional.mse_loss(pred, target))


def test_base_prediction_is_the_target_inside_the_region():
    pred = torch.randn(1, 4, 8, 8, requires_grad=True)
    target, base = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    concept = torch.zeros(1, 1, 8, 8)
    concept[..., 2:4, 2:4] = 1
    region_loss(pred, target, concept, base).backward()
    expected = torch.where(concept.expand_as(pred) > 0, base, target)
    assert torch.allclose(pred.grad, 2 * (pred.detach() - expected) / pred.numel())


def test_latent_masks_keep_any_pixel_of_the_concept():
    concept = torch.zeros(1, 1, 64, 64)
    concept[..., 9, 17] = 1  # one pixel inside latent cell (1, 2)
    small = latent_mask(concept, torch.zeros(1, 4, 8, 8))
    assert small.shape == (1, 1, 8, 8) and small.sum() == 1 and small[0, 0, 1, 2] == 1
    assert torch.equal(latent_mask(concept, torch.zeros(1, 4, 64, 64)), concept)
