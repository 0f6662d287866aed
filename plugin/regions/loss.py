"""The training loss with the concept's region taken out of what is learned.

Invariant: with ``region="ignore"`` no element inside the mask contributes to the loss or its gradient (the loss
is the mean over the elements outside it, so images with and without the concept weigh the same per element);
with ``base_prediction`` given, the region's target is the frozen base model's prediction instead of the image,
so the model is taught to draw there what it drew before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def latent_mask(concept: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``concept`` [n, 1, H, W] brought to ``like``'s spatial size [.., h, w]: a cell is the concept's when any of
    its pixels is (adaptive max pooling, so a VAE latent never keeps a sliver of the concept)."""
    if concept.shape[-2:] == like.shape[-2:]:
        return concept.to(like.dtype)
    return F.adaptive_max_pool2d(concept.float(), like.shape[-2:]).to(like.dtype)


def region_loss(pred: torch.Tensor, target: torch.Tensor, concept: torch.Tensor,
                base_prediction: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of ``pred`` against ``target`` where ``concept`` (broadcast to ``pred``, 1 inside) is 0;
    inside it, against ``base_prediction`` when given, else nothing."""
    concept = concept.to(pred.dtype).expand_as(pred)
    if base_prediction is not None:
        return F.mse_loss(pred, torch.where(concept > 0, base_prediction.detach().to(pred.dtype), target))
    keep = 1.0 - concept
    return ((pred - target).pow(2) * keep).sum() / keep.sum().clamp_min(1.0)
