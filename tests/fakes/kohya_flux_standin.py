"""A stand-in for kohya sd-scripts' Flux training, for tests (sd-scripts is not on PyPI).

It is not sd-scripts and copies none of its code. It reproduces what the concept-exclusion wrapper relies on:

- ``StandInFlux``: the module names of sd-scripts' ``library/flux_models.Flux`` (``img_in``, ``time_in``,
  ``vector_in.in_layer``/``out_layer``, ``txt_in``, ``double_blocks.N.{img,txt}_attn.qkv``/``proj``,
  ``{img,txt}_mod.lin``, ``{img,txt}_mlp.0``/``2``, ``single_blocks.N.linear1``/``linear2``/``modulation.lin``,
  ``final_layer``), its block class names and its forward signature, at a tiny width (no RoPE);
- this module as ``base_network`` (the contract of ``networks.lora_flux``): ``create_network(multiplier,
  network_dim, network_alpha, ae, text_encoders, flux, neuron_dropout=None, **kwargs)`` with ``in_dims`` and
  ``train_t5xxl``, LoRA modules ``lora_down``/``lora_up``/``alpha`` named ``lora_unet_<path with _>`` on every
  Linear of ``DoubleStreamBlock``/``SingleStreamBlock`` (and ``_txt_in``/``_vector_in``/... with in_dims),
  ``lora_te1_``/``lora_te3_`` on the text encoders, forwards patched in ``apply_to``;
- ``flux_strategies``: sd-scripts' strategy registry holding a Flux tokenize strategy (``clip_l``, ``t5xxl``,
  ``t5xxl_max_length``) and text encoding (CLIP ``pooler_output``, T5 states, no T5 mask by default);
- ``run_flux_training``: the calls ``flux_train_network.py`` makes, in its order (create_network ->
  ``network.train_t5xxl`` -> prepare_network -> apply_to(text_encoders, flux, train_te, True) ->
  prepare_optimizer_params_with_multiple_te_lrs -> accelerator.prepare -> prepare_grad_etc -> on_epoch_start ->
  per micro-step on_step_start, forward(img, img_ids, txt, txt_ids, timesteps, y, guidance=...), backward,
  gradient mean, clip, step -> save_weights(file, dtype, metadata)).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fakes.kohya_driver import installed_strategy_base


# the model ---------------------------------------------------------------------------------------
class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.in_layer, self.silu, self.out_layer = nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class SelfAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)


class Modulation(nn.Module):
    def __init__(self, dim: int, n: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, n * dim)


def _attend(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, _ = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, one joint attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        for side in ("img", "txt"):
            self.add_module(f"{side}_mod", Modulation(dim, 2))
            self.add_module(f"{side}_attn", SelfAttention(dim))
            self.add_module(f"{side}_mlp", nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)))

    def forward(self, img, txt, vec):
        i_shift, i_scale = self.img_mod.lin(vec)[:, None].chunk(2, -1)
        t_shift, t_scale = self.txt_mod.lin(vec)[:, None].chunk(2, -1)
        i_in = nn.functional.layer_norm(img, img.shape[-1:]) * (1 + i_scale) + i_shift
        t_in = nn.functional.layer_norm(txt, txt.shape[-1:]) * (1 + t_scale) + t_shift
        joint = _attend(torch.cat([self.txt_attn.qkv(t_in), self.img_attn.qkv(i_in)], 1), self.heads)
        t_att, i_att = joint[:, :txt.shape[1]], joint[:, txt.shape[1]:]
        img = img + self.img_attn.proj(i_att)
        txt = txt + self.txt_attn.proj(t_att)
        return img + self.img_mlp(img), txt + self.txt_mlp(txt)


class SingleStreamBlock(nn.Module):
    """One stream over text ++ image tokens: linear1 gives q, k, v and the MLP input, linear2 reads both."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.dim = heads, dim
        self.linear1, self.linear2 = nn.Linear(dim, 3 * dim + 2 * dim), nn.Linear(dim + 2 * dim, dim)
        self.modulation = Modulation(dim, 2)

    def forward(self, x, vec):
        shift, scale = self.modulation.lin(vec)[:, None].chunk(2, -1)
        h = self.linear1(nn.functional.layer_norm(x, x.shape[-1:]) * (1 + scale) + shift)
        qkv, mlp = h[..., :3 * self.dim], h[..., 3 * self.dim:]
        return x + self.linear2(torch.cat([_attend(qkv, self.heads), nn.functional.gelu(mlp)], -1))


class LastLayer(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, -1)
        return self.linear(nn.functional.layer_norm(x, x.shape[-1:]) * (1 + scale) + shift)


def timestep_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    args = 1000 * t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


class StandInFlux(nn.Module):
    """sd-scripts' Flux layer names and forward signature, tiny (T5 width ``context_in_dim``, CLIP ``vec_in_dim``)."""

    def __init__(self, context_in_dim: int, vec_in_dim: int, in_channels: int = 16, hidden: int = 32, heads: int = 2,
                 depth: int = 1, depth_single: int = 1, guidance_embed: bool = True, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.img_in = nn.Linear(in_channels, hidden)
        self.time_in = MLPEmbedder(256, hidden)
        self.vector_in = MLPEmbedder(vec_in_dim, hidden)
        self.guidance_in = MLPEmbedder(256, hidden) if guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(context_in_dim, hidden)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(hidden, heads) for _ in range(depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(hidden, heads) for _ in range(depth_single))
        self.final_layer = LastLayer(hidden, in_channels)

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, block_controlnet_hidden_states=None,
                block_controlnet_single_hidden_states=None, guidance=None, txt_attention_mask=None):
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps)) + self.vector_in(y)
        if guidance is not None and not isinstance(self.guidance_in, nn.Identity):
            vec = vec + self.guidance_in(timestep_embedding(guidance))
        txt = self.txt_in(txt)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec)
        x = torch.cat([txt, img], 1)
        for block in self.single_blocks:
            x = block(x, vec)
        return self.final_layer(x[:, txt.shape[1]:], vec)


# the network (networks.lora_flux's contract) ----------------------------------------------------------
class LoRAModule(nn.Module):
    def __init__(self, lora_name: str, org: nn.Linear, multiplier: float, dim: int, alpha: float) -> None:
        super().__init__()
        self.lora_name, self.multiplier, self.lora_dim = lora_name, multiplier, dim
        self.lora_down = nn.Linear(org.in_features, dim, bias=False)
        self.lora_up = nn.Linear(dim, org.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = alpha / dim
        self.org_module = [org]

    def apply_to(self) -> None:
        org = self.org_module[0]
        self.org_forward = org.forward
        org.forward = self.forward

    def forward(self, x):
        return self.org_forward(x) + self.lora_up(self.lora_down(x)) * self.multiplier * self.scale


IN_DIM_FILTERS = ("_img_in", "_time_in", "_vector_in", "_guidance_in", "_txt_in")


def _loras(root: nn.Module, prefix: str, classes: tuple[str, ...] | None, dim: int, alpha: float, multiplier: float,
           name_filter: str | None = None) -> list[LoRAModule]:
    out = []
    for name, module in root.named_modules():
        if classes is not None and type(module).__name__ not in classes:
            continue
        for child_name, child in ([(n, c) for n, c in module.named_modules() if n] if classes else [("", module)]):
            if not isinstance(child, nn.Linear):
                continue
            lora_name = (prefix + "." + ".".join(p for p in (name, child_name) if p)).replace(".", "_")
            if name_filter is not None and name_filter not in lora_name:
                continue
            out.append(LoRAModule(lora_name, child, multiplier, dim, alpha))
    return out


class LoRANetwork(nn.Module):
    def __init__(self, text_encoders: list, flux: nn.Module, multiplier: float, dim: int, alpha: float,
                 train_t5xxl: bool, in_dims: list[int] | None) -> None:
        super().__init__()
        self.train_t5xxl = train_t5xxl
        te = _loras(text_encoders[0], "lora_te1", ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"), dim, alpha,
                    multiplier)
        if train_t5xxl:
            te += _loras(text_encoders[1], "lora_te3", ("T5Attention", "T5DenseGatedActDense"), dim, alpha, multiplier)
        unet = _loras(flux, "lora_unet", ("DoubleStreamBlock", "SingleStreamBlock"), dim, alpha, multiplier)
        for f, d in zip(IN_DIM_FILTERS, in_dims or [0] * 5):
            if d:
                unet += _loras(flux, "lora_unet", None, d, d, multiplier, name_filter=f)
        names = [m.lora_name for m in te + unet]
        assert len(names) == len(set(names)), "duplicated lora name"
        self.text_encoder_loras, self.unet_loras = te, unet

    def apply_to(self, text_encoders, flux, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        if not apply_text_encoder:
            self.text_encoder_loras = []
        if not apply_unet:
            self.unet_loras = []
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.apply_to()
            self.add_module(lora.lora_name, lora)

    def prepare_optimizer_params_with_multiple_te_lrs(self, text_encoder_lr, unet_lr, default_lr):
        groups = [{"params": [p for m in self.text_encoder_loras for p in m.parameters()], "lr": default_lr},
                  {"params": [p for m in self.unet_loras for p in m.parameters()], "lr": unet_lr or default_lr}]
        return [g for g in groups if g["params"]], ["textencoder", "unet"]

    def prepare_grad_etc(self, text_encoder, unet) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder, unet) -> None:
        self.train()

    def get_trainable_params(self):
        return self.parameters()

    def save_weights(self, file, dtype, metadata) -> None:
        sd = {k: (v.detach().clone().to("cpu", dtype) if dtype is not None else v.detach().clone().cpu())
              for k, v in self.state_dict().items()}
        save_file(sd, str(file), metadata)

    def load_weights(self, file):
        return self.load_state_dict(load_file(str(file)), strict=False)

    def set_multiplier(self, multiplier: float) -> None:
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.multiplier = multiplier

    def is_mergeable(self) -> bool:
        return True

    def enable_gradient_checkpointing(self) -> None:
        return None


def create_network(multiplier, network_dim, network_alpha, ae, text_encoders, flux, neuron_dropout=None, **kwargs):
    in_dims = kwargs.get("in_dims")
    dims = [int(d) for d in in_dims.strip("[]").split(",")] if in_dims else None
    return LoRANetwork(text_encoders, flux, multiplier, network_dim or 4, float(network_alpha or 1.0),
                       kwargs.get("train_t5xxl") == "True", dims)


def create_network_from_weights(multiplier, file, ae, text_encoders, flux, weights_sd=None, for_inference=False,
                                **kwargs):
    weights_sd = weights_sd if weights_sd is not None else load_file(str(file))
    dim = next(v.shape[0] for k, v in weights_sd.items() if k.endswith("lora_down.weight"))
    return LoRANetwork(text_encoders, flux, multiplier, dim, float(dim), False, None), weights_sd


# the strategies and the trainer's call order ------------------------------------------------------------
@contextlib.contextmanager
def flux_strategies(clip_tokenizer, t5_tokenizer, t5_max_length: int) -> Iterator[types.SimpleNamespace]:
    """Install a stand-in ``library.strategy_base`` whose TokenizeStrategy is a Flux one, for the duration."""
    tokenize = types.SimpleNamespace(clip_l=clip_tokenizer, t5xxl=t5_tokenizer, t5xxl_max_length=t5_max_length)
    encode = types.SimpleNamespace(apply_t5_attn_mask=False)
    registry = {}
    for name, obj in (("TokenizeStrategy", tokenize), ("TextEncodingStrategy", encode)):
        registry[name] = type(name, (), {"get_strategy": classmethod(lambda cls, o=obj: o)})
    base = types.ModuleType("library.strategy_base")
    for name, cls in registry.items():
        setattr(base, name, cls)
    with installed_strategy_base(base):
        yield tokenize


def encode_captions(tokenize, clip_l, t5, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 states, CLIP pooled) as sd-scripts' Flux text encoding gives them (no T5 attention mask)."""
    with torch.no_grad():
        l_ids = tokenize.clip_l(captions, max_length=77, padding="max_length", truncation=True,
                                return_tensors="pt").input_ids
        t5_ids = tokenize.t5xxl(captions, max_length=tokenize.t5xxl_max_length, padding="max_length",
                                truncation=True, return_tensors="pt").input_ids
        return t5(t5_ids)[0], clip_l(l_ids)["pooler_output"]


@dataclass
class FluxRun:
    network: Any
    file: Path
    metadata: dict[str, str]
    calls: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def run_flux_training(network_module: str, *, flux: nn.Module, clip_l, t5, tokenize, out_file: str | Path,
                      network_args: list[str] | None = None, steps: int = 3, learning_rate: float = 1e-2,
                      train_text_encoder: bool = False, seed: int = 0,
                      captions: tuple[str, ...] = ("a photo of the zorblax logo", "zorblax logo on a red shirt")
                      ) -> FluxRun:
    """Train ``steps`` steps the way flux_train_network.py drives a network module, and save the network once."""
    from accelerate import Accelerator

    torch.manual_seed(seed)
    calls: list[str] = []
    module = importlib.import_module(network_module)
    kwargs = dict(item.split("=", 1) for item in network_args or [])
    text_encoders = [clip_l, t5]
    calls.append("create_network")
    network = module.create_network(1.0, 4, 2.0, None, text_encoders, flux, neuron_dropout=None, **kwargs)
    calls.append("train_t5xxl")
    if network.train_t5xxl:
        raise ValueError("the stand-in trainer caches T5 outputs; it cannot train T5")
    if hasattr(network, "prepare_network"):
        calls.append("prepare_network")
        network.prepare_network(argparse.Namespace(save_model_as="safetensors", clip_skip=None))
    calls.append("apply_to")
    network.apply_to(text_encoders, flux, train_text_encoder, True)
    calls.append("prepare_optimizer_params_with_multiple_te_lrs")
    params, _ = network.prepare_optimizer_params_with_multiple_te_lrs(None, learning_rate, learning_rate)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.01)
    flux.requires_grad_(False)
    for enc in text_encoders:
        enc.requires_grad_(False)
    accelerator = Accelerator(cpu=True)
    network, optimizer = accelerator.prepare(network, optimizer)
    net = accelerator.unwrap_model(network)
    calls.append("prepare_grad_etc")
    net.prepare_grad_etc(text_encoders, flux)
    calls.append("on_epoch_start")
    net.on_epoch_start(text_encoders, flux)
    channels = flux.img_in.in_features
    ids = torch.zeros(16, 3)
    run = FluxRun(net, Path(out_file), {})
    on_step_start = getattr(net, "on_step_start", None)  # called only when the network has it, as the trainer does
    for step in range(steps):
        if on_step_start is not None:
            calls.append("on_step_start")
            on_step_start(text_encoders, flux)
        states, pooled = encode_captions(tokenize, clip_l, t5, [captions[step % len(captions)]])
        g = torch.Generator().manual_seed(step)
        latents, noise = torch.randn(1, 16, channels, generator=g), torch.randn(1, 16, channels, generator=g)
        t = torch.rand(1, generator=g)
        noisy = (1 - t) * latents + t * noise
        pred = flux(img=noisy, img_ids=ids, txt=states, txt_ids=torch.zeros(states.shape[1], 3), y=pooled,
                    timesteps=t, guidance=torch.full((1,), 3.5), txt_attention_mask=None)
        loss = nn.functional.mse_loss(pred, noise - latents)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(net.get_trainable_params(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run.losses.append(float(loss.detach()))
    metadata = {"ss_network_module": network_module, "ss_network_args": json.dumps(kwargs),
                "ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev/lora", "ss_steps": str(steps)}
    calls.append("save_weights")
    net.save_weights(str(out_file), torch.float32, metadata)
    run.metadata, run.calls = metadata, calls
    return run
