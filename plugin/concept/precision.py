"""A text encoder run in float32 whatever dtype its weights are kept in, without a float32 copy of the whole model.

Why: the concept's rows decide the basis, and a bf16 forward pass perturbs them by about 1e-2 (differently on
different kernels), enough to turn the weakest kept directions of a basis: a trainer holding T5 in bf16 and an
audit holding it in float32, or on another machine, read different subspaces from the same weights. In float32
they read the same one wherever the weights are the same (bf16, fp16 and fp8 values are exactly float32 values).

Invariant: inside ``float32_compute(model)`` every floating-point parameter and buffer is float32 while the layer
that owns it runs (the tensors outside the model's layer lists for the whole block, each listed layer only during
its own forward call), with autocast off; on leaving, every tensor holds its own storage again (same dtype, same
bits, same memory). Extra memory: the tensors outside the layer lists and one layer, in float32.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class _Upcast:
    """Float tensors of some modules given float32 data, each one's own storage kept to be put back (not a
    converted copy: the original bits, and no second allocation of the model)."""

    def __init__(self) -> None:
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def up(self, tensors) -> None:
        for t in tensors:
            if t.is_floating_point() and t.dtype != torch.float32 and t.device.type != "meta" \
                    and id(t) not in self.kept:
                self.kept[id(t)] = (t, t.data)
                t.data = t.data.float()

    def down(self, tensors) -> None:
        for t in tensors:
            found = self.kept.pop(id(t), None)
            if found is not None:
                t.data = found[1]


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


@contextlib.contextmanager
def float32_compute(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in float32 inside the block (see the module's invariant); a float32 model is left untouched."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    nested = {id(inner) for outer in lists for inner in outer.modules() if inner is not outer}
    layers = [layer for outer in lists if id(outer) not in nested for layer in outer]
    in_layers = {id(t) for layer in layers for t in _tensors(layer)}
    outside = [t for t in _tensors(model) if id(t) not in in_layers]
    cast, hooks = _Upcast(), []
    try:
        cast.up(outside)
        for layer in layers:
            hooks.append(layer.register_forward_pre_hook(lambda m, _args: cast.up(_tensors(m))))
            hooks.append(layer.register_forward_hook(lambda m, _args, _out: cast.down(_tensors(m))))
        device = next((t.device.type for t in _tensors(model) if t.device.type != "meta"), "cpu")
        with torch.autocast(device_type=device, enabled=False):  # a caller's autocast would bring bf16 back
            yield
    finally:
        for hook in hooks:
            hook.remove()
        for t, original in list(cast.kept.values()):
            t.data = original
        cast.kept.clear()
