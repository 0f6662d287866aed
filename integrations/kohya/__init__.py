"""kohya sd-scripts network module: ``--network_module concept_exclusion.integrations.kohya``.

sd-scripts imports the module named by ``--network_module`` and calls ``create_network`` /
``create_network_from_weights`` with ``--network_args key=value`` as string keyword arguments
(a ``--config_file``'s ``network_args = ["key=value", ...]`` arrives the same way). This module
builds the real LoRA network named by ``base_network`` (sd-scripts' ``networks.lora`` by
default, or ``lycoris.kohya``) and wraps it:

``create_network`` encodes the concept with the model's own tokenizer(s) and text encoder(s) at once, so a preset
that cannot be encoded fails before training starts; what the wrapped network does in training is
``network.ConceptExclusionNetwork``'s.

This package's ``__init__`` holds the two entry points; ``network`` the wrapped network class, ``args`` parses
``--network_args``, ``concept`` encodes the concept into its subspace and ``mmdit`` reads sd-scripts' Flux/SD3
tokenize strategies.
"""

from __future__ import annotations

from pathlib import Path

from concept_exclusion.integrations.kohya.args import DEFAULT_BASE_NETWORK, KohyaArgsError, split_network_args
from concept_exclusion.integrations.kohya.concept import encode_concept
from concept_exclusion.integrations.kohya.network import ConceptExclusionNetwork, import_base_network


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoder,
                   unet, neuron_dropout: float | None = None, **kwargs) -> ConceptExclusionNetwork:
    """sd-scripts' entry point. ``kwargs`` are ``--network_args`` (strings): ours (``concept_*``,
    ``base_network``) are taken out, the rest go to the base network's ``create_network``.
    The concept is encoded first, so a preset or tokenizer problem fails before anything is built."""
    settings, base_name, base_kwargs = split_network_args(kwargs)
    module = import_base_network(base_name)
    subspace = encode_concept(text_encoder, unet, settings)
    base = module.create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet,
                                 neuron_dropout=neuron_dropout, **base_kwargs)
    if base is None:
        raise KohyaArgsError(f"base_network={base_name}: create_network returned no network")
    return ConceptExclusionNetwork(base, subspace, unet, settings, base_name)


def create_network_from_weights(multiplier: float, file, vae, text_encoder, unet, weights_sd=None,
                                for_inference: bool = False, **kwargs):
    """sd-scripts' second entry point: the base network sized from a weights file.

    ``for_inference=True`` (merging ``--base_weights``, generation) returns the base network
    unwrapped: nothing is trained. Otherwise (``--dim_from_weights``) the network is wrapped as in
    ``create_network``. Weights files are read as safetensors only.
    """
    kwargs = dict(kwargs)
    if weights_sd is None:
        if Path(str(file)).suffix != ".safetensors":
            raise KohyaArgsError(f"{file}: concept-exclusion reads network weights from .safetensors only")
        from concept_exclusion.safeio import read_safetensors

        weights_sd, _ = read_safetensors(file)
    if for_inference:
        base_name = str(kwargs.pop("base_network", None) or DEFAULT_BASE_NETWORK)
        base_kwargs = {k: v for k, v in kwargs.items() if not k.startswith("concept_")}
        return import_base_network(base_name).create_network_from_weights(
            multiplier, file, vae, text_encoder, unet, weights_sd=weights_sd, for_inference=for_inference,
            **base_kwargs)
    settings, base_name, base_kwargs = split_network_args(kwargs)
    module = import_base_network(base_name)
    subspace = encode_concept(text_encoder, unet, settings)
    base, weights_sd = module.create_network_from_weights(
        multiplier, file, vae, text_encoder, unet, weights_sd=weights_sd, for_inference=False, **base_kwargs)
    return ConceptExclusionNetwork(base, subspace, unet, settings, base_name), weights_sd


__all__ = ["ConceptExclusionNetwork", "KohyaArgsError", "create_network", "create_network_from_weights",
           "split_network_args"]
