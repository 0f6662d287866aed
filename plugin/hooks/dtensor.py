"""DTensor helpers (FSDP2 / tensor-parallel parameters), usable where torch has no distributed support.

Invariant: on a plain tensor every helper is the identity, so callers need no special case.
"""

from __future__ import annotations

import torch

try:  # DTensor is public from torch 2.4; older torch simply has no sharded parameters to handle
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed support
    DTensor = None  # type: ignore[assignment,misc]


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a DTensor (an FSDP2 / tensor-parallel parameter or gradient)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (sharing its storage); any other tensor unchanged."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an all-gather for a DTensor (every rank must call it), else unchanged."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor
