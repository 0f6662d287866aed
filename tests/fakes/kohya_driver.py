"""A stand-in for kohya sd-scripts' ``train_network.py``, for tests (sd-scripts is not on PyPI).

It is not sd-scripts and copies none of its code. It drives a kohya network module through the
calls ``train_network.py`` makes, in the same order and with the same signatures, so a module
that survives this driver meets the contract it relies on:

    network_args "k=v" strings -> dict (split at the first '=', as the trainer does; a
    --config_file's ``network_args = [...]`` list arrives the same way) ->
    create_network(1.0, dim, alpha, vae, text_encoder, unet, neuron_dropout=..., dropout=..., **kwargs)
    -> prepare_network(args) if present -> apply_to(text_encoder, unet, train_te, train_unet)
    -> load_weights(network_weights) when resuming
    -> prepare_optimizer_params_with_multiple_te_lrs(...) if present, else prepare_optimizer_params(...)
    -> accelerator.prepare(network, optimizer, dataloader, lr_scheduler)
    -> unwrap(network).prepare_grad_etc(text_encoder, unet)
    -> per epoch: on_epoch_start(text_encoder, unet); per micro-step inside accelerator.accumulate:
       on_step_start(text_encoder, unet) -> forward -> accelerator.backward -> on sync steps an explicit
       gradient mean over processes (the trainer's all_reduce_network) and
       clip_grad_norm_(get_trainable_params(), max_grad_norm) -> optimizer.step -> lr step -> zero_grad;
       after the accumulate block apply_max_norm_regularization when scale_weight_norms is set
    -> save_weights(file, dtype, metadata with ss_* and modelspec.* keys) on the main process.

Run as a script under ``torch.distributed.run`` (see ``_worker``) it trains on several CPU
processes with gloo, the network wrapped in DDP by accelerate.

Text for the UNet is encoded the way sd-scripts' strategies do it (SD1: ``clip_skip`` with the
final layer norm; SDXL: penultimate states of both encoders concatenated, the second encoder's
projected pooled output, six time ids). ``StandInStrategies`` installs a stand-in
``library.strategy_base`` module holding the tokenizer(s) and clip_skip, as train_network.py sets
sd-scripts' strategy objects before it creates the network.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def parse_network_args(items: list[str] | None) -> dict[str, str]:
    """``["k=v", ...]`` -> {k: v}, values kept as strings."""
    out: dict[str, str] = {}
    for item in items or []:
        key, value = item.split("=", 1)
        out[key] = value
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A kohya-style --config_file: TOML whose tables are flattened into one namespace of arguments."""
    doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


@contextlib.contextmanager
def StandInStrategies(tokenizers: list, clip_skip: int | None) -> Iterator[None]:
    """Install a stand-in ``library.strategy_base`` (sd-scripts' strategy registry) for the duration."""

    class TokenizeStrategy:
        _strategy = None

        @classmethod
        def set_strategy(cls, strategy):
            cls._strategy = strategy

        @classmethod
        def get_strategy(cls):
            return cls._strategy

    class TextEncodingStrategy(TokenizeStrategy):
        _strategy = None

    if len(tokenizers) == 2:
        tokenize = types.SimpleNamespace(tokenizer1=tokenizers[0], tokenizer2=tokenizers[1])
    else:
        tokenize = types.SimpleNamespace(tokenizer=tokenizers[0])
    TokenizeStrategy.set_strategy(tokenize)
    TextEncodingStrategy.set_strategy(types.SimpleNamespace(clip_skip=clip_skip))
    strategy_base = types.ModuleType("library.strategy_base")
    strategy_base.TokenizeStrategy = TokenizeStrategy
    strategy_base.TextEncodingStrategy = TextEncodingStrategy
    with installed_strategy_base(strategy_base):
        yield


@contextlib.contextmanager
def installed_strategy_base(strategy_base: types.ModuleType) -> Iterator[None]:
    """``strategy_base`` importable as sd-scripts' ``library.strategy_base`` for the duration; the modules it
    replaced (or their absence) are restored afterwards."""
    library = types.ModuleType("library")
    library.strategy_base = strategy_base
    saved = {k: sys.modules.get(k) for k in ("library", "library.strategy_base")}
    sys.modules["library"], sys.modules["library.strategy_base"] = library, strategy_base
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


@dataclass
class RunResult:
    network: Any
    file: Path
    metadata: dict[str, str]
    losses: list[float] = field(default_factory=list)
    optimizer_steps: int = 0
    calls: list[str] = field(default_factory=list)
    world: int = 1
    rank: int = 0


class _Recorder:
    """Wraps a method so the driver can report which trainer calls it made, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def call(self, obj, name: str, *args, **kwargs):
        self.calls.append(name)
        return getattr(obj, name)(*args, **kwargs)


def _encode(text_encoders: list, tokenizers: list, captions: list[str], clip_skip: int | None):
    """(context [B, L, d], added_cond_kwargs or None) as sd-scripts' SD / SDXL strategies produce them."""
    with torch.no_grad():
        if len(text_encoders) == 1:
            tok, enc = tokenizers[0], text_encoders[0]
            ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            if clip_skip in (None, 1):
                return enc(ids)[0], None
            out = enc(ids, output_hidden_states=True)
            return enc.text_model.final_layer_norm(out.hidden_states[-clip_skip]), None
        states, pooled = [], None
        for tok, enc in zip(tokenizers, text_encoders):
            ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out = enc(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = getattr(out, "text_embeds", None)
        time_ids = torch.tensor([[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]]).repeat(len(captions), 1)
        return torch.cat(states, dim=-1), {"text_embeds": pooled, "time_ids": time_ids}


def run_training(network_module: str, *, unet, text_encoders: list, tokenizers: list, out_file: str | Path,
                 network_args: list[str] | None = None, network_dim: int = 4, network_alpha: float = 2.0,
                 steps: int = 3, gradient_accumulation_steps: int = 2, learning_rate: float = 1e-2,
                 max_grad_norm: float = 1.0, clip_skip: int | None = None, scale_weight_norms: float | None = None,
                 captions: tuple[str, ...] = ("a photo of the zorblax logo", "zorblax logo on a red shirt"),
                 save_dtype: torch.dtype | None = torch.float32, train_text_encoder: bool = False,
                 seed: int = 0, save_model_as: str = "safetensors",
                 network_weights: str | Path | None = None) -> RunResult:
    """Train ``steps`` optimizer steps the way train_network.py does and save the network once."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    rec = _Recorder()
    module = importlib.import_module(network_module)
    text_encoder = text_encoders if len(text_encoders) > 1 else text_encoders[0]
    net_kwargs: dict[str, Any] = parse_network_args(network_args)
    if "dropout" not in net_kwargs:
        net_kwargs["dropout"] = None  # what the trainer passes for LyCORIS' sake
    rec.calls.append("create_network")
    network = module.create_network(1.0, network_dim, network_alpha, None, text_encoder, unet, neuron_dropout=None,
                                    **net_kwargs)
    args = argparse.Namespace(clip_skip=clip_skip, save_model_as=save_model_as, network_args=network_args)
    if hasattr(network, "prepare_network"):
        rec.call(network, "prepare_network", args)
    rec.call(network, "apply_to", text_encoder, unet, train_text_encoder, True)
    if network_weights is not None:
        rec.call(network, "load_weights", str(network_weights))
    if hasattr(network, "prepare_optimizer_params_with_multiple_te_lrs"):
        results = rec.call(network, "prepare_optimizer_params_with_multiple_te_lrs", None, learning_rate,
                           learning_rate)
    else:
        results = rec.call(network, "prepare_optimizer_params", None, learning_rate, learning_rate)
    params = results[0] if isinstance(results, tuple) else results
    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    unet.requires_grad_(False)
    for t in text_encoders:
        t.requires_grad_(False)
    latents = torch.randn(steps * gradient_accumulation_steps, 4, unet.config.sample_size, unet.config.sample_size)
    data = [(latents[i:i + 1], captions[i % len(captions)]) for i in range(latents.shape[0])]
    loader = torch.utils.data.DataLoader(data, batch_size=1, shuffle=False, collate_fn=lambda b: b[0])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    accelerator = Accelerator(gradient_accumulation_steps=gradient_accumulation_steps, cpu=True)
    if any(p.requires_grad for p in unet.parameters()):
        unet = accelerator.prepare(unet)
    else:  # a frozen UNet: accelerate does not wrap it on GPUs; on CPU (gloo) it would, and DDP refuses it
        unet.to(accelerator.device)
    network, optimizer, loader, scheduler = accelerator.prepare(network, optimizer, loader, scheduler)
    net = accelerator.unwrap_model(network)
    rec.call(net, "prepare_grad_etc", text_encoder, unet)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    metadata = {"ss_network_module": network_module, "ss_network_dim": str(network_dim),
                "ss_network_alpha": str(network_alpha), "ss_learning_rate": str(learning_rate),
                "ss_network_args": json.dumps(net_kwargs), "ss_clip_skip": str(clip_skip),
                "ss_tag_frequency": json.dumps({"1_zorblax": {"zorblax": 2}}),
                "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": "stable-diffusion-v1/lora",
                "modelspec.implementation": "diffusers", "modelspec.title": "stand-in run",
                "modelspec.resolution": "64x64"}
    result = RunResult(net, Path(out_file), dict(metadata))
    rec.call(net, "on_epoch_start", text_encoder, unet)
    on_step_start = net.on_step_start if hasattr(net, "on_step_start") else (lambda *a, **k: None)
    for latent, caption in loader:
        with accelerator.accumulate(network):
            rec.calls.append("on_step_start")
            on_step_start(text_encoder, unet)
            context, added = _encode(text_encoders, tokenizers, [caption], clip_skip)
            device = accelerator.device
            latent, context = latent.to(device), context.to(device)
            if added is not None:
                added = {k: v.to(device) for k, v in added.items()}
            noise = torch.randn_like(latent)
            t = torch.randint(0, 1000, (1,), device=device)
            noisy = noise_scheduler.add_noise(latent, noise, t)
            kwargs = {"added_cond_kwargs": added} if added is not None else {}
            pred = unet(noisy, t, context, **kwargs).sample
            loss = torch.nn.functional.mse_loss(pred, noise)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                for p in network.parameters():  # the trainer's all_reduce_network: an explicit gradient mean
                    if p.grad is not None:
                        p.grad = accelerator.reduce(p.grad, reduction="mean")
                if max_grad_norm != 0.0:
                    accelerator.clip_grad_norm_(net.get_trainable_params(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(float(loss.detach()))
        if accelerator.sync_gradients:
            result.optimizer_steps += 1
        if scale_weight_norms:
            rec.call(net, "apply_max_norm_regularization", scale_weight_norms, accelerator.device)
    metadata["ss_steps"] = str(result.optimizer_steps)
    result.metadata = dict(metadata)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        rec.call(net, "save_weights", str(out_file), save_dtype, metadata)
    result.calls = rec.calls
    result.world = accelerator.num_processes
    result.rank = accelerator.process_index
    return result


def _worker(argv: list[str] | None = None) -> None:
    """Entry point for ``torchrun --nproc_per_node N tests/kohya_driver.py ROOT PRESET OUT``: each rank trains
    the tiny SD1 model from ROOT with the concept-exclusion module; rank files describe what each rank ended with."""
    import os

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("preset")
    parser.add_argument("out")
    ns = parser.parse_args(argv)
    root, out = Path(ns.root), Path(ns.out)
    tok = CLIPTokenizer.from_pretrained(root / "tokenizer")
    te = CLIPTextModel.from_pretrained(root / "text_encoder").eval()
    rank = int(os.environ.get("RANK", "0"))
    result = run_training("concept_exclusion.integrations.kohya", unet=UNet2DConditionModel.from_pretrained(root / "unet"),
                          text_encoders=[te], tokenizers=[tok], out_file=out / "lora.safetensors",
                          network_args=[f"concept_preset={ns.preset}", "base_network=lycoris.kohya", "algo=lora",
                                        "preset=attn-mlp", f"concept_tokenizer={root}"],
                          steps=4, seed=rank)
    net = result.network
    net.on_step_start(te, None)  # ranks that did not save put their last step on the constraint here
    params = torch.cat([p.detach().reshape(-1) for p in net.base_network.parameters()])
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world": result.world, "rank": result.rank, "steps": net.exclusion.steps,
        "optimizer_steps": result.optimizer_steps, "param_sum": float(params.double().sum()),
        "param_abs_sum": float(params.double().abs().sum()), "max_leakage": net.exclusion.max_leakage()}))


if __name__ == "__main__":
    _worker()
