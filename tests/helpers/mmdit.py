"""Shared pieces of the Flux / SD3 tests: one training loss per family, gradients, moves along a basis."""

from __future__ import annotations

import torch
from torch import nn

# train_dreambooth_lora_flux.py's / _sd3.py's default LoRA layers, plus the text readers (so exact mode holds them)
FLUX_LORA = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
             "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
             "ff_context.net.2"]
READERS = ["context_embedder", "time_text_embed.text_embedder.linear_1"]


def flux_inputs(batch: int, channels: int = 16, side: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Packed latents, ids, timestep and target of a Flux training pass (text states are added by the caller)."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.meshgrid(torch.zeros(1), torch.arange(side * 1.0), torch.arange(side * 1.0), indexing="ij")
    ids = torch.stack(grid, -1)
    return {"hidden_states": torch.randn(batch, side * side, channels, generator=g),
            "img_ids": ids.reshape(-1, 3), "timestep": torch.rand(batch, generator=g),
            "target": torch.randn(batch, side * side, channels, generator=g)}


def sd3_inputs(batch: int, channels: int = 4, side: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Latents, timestep and target of an SD3 training pass."""
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, channels, side, side, generator=g),
            "timestep": torch.rand(batch, generator=g) * 1000,
            "target": torch.randn(batch, channels, side, side, generator=g)}


def loss_of(model: nn.Module, inputs: dict[str, torch.Tensor], states: torch.Tensor, pooled: torch.Tensor
            ) -> torch.Tensor:
    """Flow-matching MSE of a Flux or SD3 transformer on ``inputs`` with these text states and pooled vector."""
    kwargs = {k: v for k, v in inputs.items() if k != "target"}
    if "img_ids" in inputs:
        kwargs["txt_ids"] = torch.zeros(states.shape[1], 3)
    out = model(encoder_hidden_states=states, pooled_projections=pooled, **kwargs).sample
    return (out - inputs["target"]).pow(2).mean()


def grads(model: nn.Module, inputs: dict, states: torch.Tensor, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradient of every trainable parameter for one pass."""
    model.zero_grad(set_to_none=True)
    loss_of(model, inputs, states, pooled).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def move_along(x: torch.Tensor, basis: torch.Tensor, scale: float = 3.0, seed: int = 5) -> torch.Tensor:
    """``x`` plus a random combination of the basis columns in every row (size ``scale`` x the rows' RMS)."""
    g = torch.Generator().manual_seed(seed)
    u = basis.to(x.dtype)
    coef = torch.randn(*x.shape[:-1], u.shape[1], generator=g, dtype=x.dtype)
    return x + scale * x.pow(2).mean().sqrt() * coef @ u.T


def relative_changes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per parameter: ||a - b|| / max(||a||, tiny)."""
    return {n: float((a[n] - b[n]).norm() / a[n].norm().clamp_min(1e-30)) for n in a}


def effective_delta(module: nn.Module, w0: torch.Tensor) -> torch.Tensor:
    """A layer's weight change: full weight W - W0, or PEFT LoRA scaling * B A (its base frozen)."""
    if hasattr(module, "lora_A"):
        return module.scaling["default"] * (module.lora_B["default"].weight @ module.lora_A["default"].weight)
    return module.weight.detach() - w0


def add_lora(model: nn.Module, layers: list[str], rank: int = 4, seed: int = 1) -> nn.Module:
    """PEFT LoRA on ``layers`` (base frozen), with B randomised so that every factor has a gradient at once."""
    from peft import LoraConfig

    model.requires_grad_(False)
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=layers))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return model
