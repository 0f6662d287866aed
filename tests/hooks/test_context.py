"""Context projection: in training passes no layer can learn from the concept's directions, the model is
unchanged for sampling, and it works on full weights, PEFT LoRA, a kohya-style (LyCORIS) network and SDXL."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from concept_exclusion import ConceptExclusion, ConceptSubspace, TargetError, parse_preset
from concept_exclusion.metadata import PREFIX
from concept_exclusion.model.plan import projection_of

from helpers import make_preset
from helpers.models import context_states, lycoris_network


def _grads(unet, ctx, seed=0, **forward_kwargs):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    unet.zero_grad(set_to_none=True)
    unet(x, torch.tensor([10, 500]), encoder_hidden_states=ctx, **forward_kwargs).sample.pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}


def _along(ctx, basis, seed=1):
    """A perturbation of ``ctx`` that lies entirely in span(basis), as large as ctx itself."""
    z = torch.randn(*ctx.shape[:-1], basis.shape[1], generator=torch.Generator().manual_seed(seed))
    return (z @ basis.T.float()) * ctx.norm() / (z @ basis.T.float()).norm()


def _peft_unet(sd):
    unet = sd.unet().requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "conv1"]))
    return unet


@pytest.mark.parametrize("kind", ["full", "peft"])
def test_no_gradient_depends_on_the_concept_directions(sd, kind):
    """Every trainable tensor, not only the key/value layers, gets the same gradient whatever the context
    holds along the basis; without context projection the downstream gradients do depend on it."""
    unet = sd.unet() if kind == "full" else _peft_unet(sd)
    sub = ConceptSubspace.from_text_encoder(make_preset(targets='["attention"]'), sd.tokenizer, sd.text_encoder)
    ctx = context_states(sd).detach()
    moved = ctx + _along(ctx, sub.basis())
    ex = ConceptExclusion.attach(unet, sub, projection_of(sub).overridden(project_context=False))
    before, after = _grads(unet, ctx), _grads(unet, moved)
    assert max(float((before[n] - after[n]).norm()) for n in before) > 1e-3  # the concept signal is learnable
    ex.uninstall()
    ex = ConceptExclusion.attach(unet, sub, projection_of(sub).overridden(project_context=True))
    assert ex.project_context and ex.metadata()[PREFIX + "project_context"] == "true"
    before, after = _grads(unet, ctx), _grads(unet, moved)
    for name in before:
        assert torch.allclose(before[name], after[name], atol=1e-6, rtol=1e-4), name


def test_sampling_sees_the_model_unchanged_and_detach_restores_it(sd):
    unet = _peft_unet(sd)
    sub = ConceptSubspace.from_text_encoder(make_preset(), sd.tokenizer, sd.text_encoder)
    ctx = context_states(sd).detach()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500])
    unet.eval()
    with torch.no_grad():
        reference = unet(x, t, encoder_hidden_states=ctx).sample
    ex = ConceptExclusion.attach(unet, sub, projection_of(sub).overridden(project_context=True))
    with torch.no_grad():
        assert torch.equal(unet(x, t, encoder_hidden_states=ctx).sample, reference)  # eval + no grad
        unet.train()
        projected = unet(x, t, encoder_hidden_states=ctx).sample  # train mode: a training pass
    assert not torch.allclose(projected, reference)
    ex.uninstall()
    with torch.no_grad():
        assert torch.equal(unet(x, t, encoder_hidden_states=ctx).sample, reference)


def test_kohya_network_projects_the_unet_it_patches(sd, tmp_path):
    """A kohya-style network is not the module that runs forward: the readers are found in base_model."""
    unet = sd.unet().requires_grad_(False)
    network = lycoris_network(sd, unet, "lora", tmp_path)
    sub = ConceptSubspace.from_text_encoder(make_preset(), sd.tokenizer, sd.text_encoder)
    before = {n: p.detach().clone() for n, p in network.named_parameters()}
    with pytest.raises(TargetError, match="base_model"):
        ConceptExclusion.attach(network, sub, projection_of(sub).overridden(project_context=True))
    # refused before anything was written: exact mode's attach-time projection of the factors did not run
    assert all(torch.equal(p, before[n]) for n, p in network.named_parameters())
    assert not any(m._forward_pre_hooks for m in unet.modules())
    ConceptExclusion.attach(network, sub, projection_of(sub).overridden(project_context=True), base_model=unet)
    ctx = context_states(sd).detach()
    seen = []
    for name, m in unet.named_modules():
        if name.endswith("attn2.to_k"):
            m.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    unet.train()
    unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), encoder_hidden_states=ctx)
    assert seen and all(float((s @ sub.basis().float()).norm()) <= 1e-5 * float(s.norm()) for s in seen)


def test_sdxl_pooled_input_projected_on_its_columns_only(sdxl):
    unet = sdxl.unet().requires_grad_(False)
    unet.add_embedding.linear_1.requires_grad_(True)
    sub = ConceptSubspace.from_text_encoders(make_preset(), sdxl.tokenizers, sdxl.text_encoders)
    ex = ConceptExclusion.attach(unet, sub, projection_of(sub).overridden(project_context=True))
    assert any("add_embedding" in reader.name for reader in ex.context.readers)
    seen = []
    unet.add_embedding.linear_1.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    pooled = torch.randn(2, 32)
    time_ids = torch.tensor([[8.0, 8, 0, 0, 8, 8]] * 2)
    unet.train()
    unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), encoder_hidden_states=torch.randn(2, 5, 64),
         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
    u = sub.basis("pooled").float()
    got = seen[0]
    assert torch.allclose(got[:, :32], pooled - (pooled @ u) @ u.T, atol=1e-5)
    assert torch.equal(got[:, 32:], unet.add_time_proj(time_ids.flatten()).reshape(2, -1))


def test_preset_key_sets_the_default_and_keeps_old_hashes():
    text = make_preset().toml_text
    on = parse_preset(text.replace('mode = "exact"', 'mode = "exact"\nproject_context = true'))
    off = parse_preset(text.replace('mode = "exact"', 'mode = "exact"\nproject_context = false'))
    assert on.projection.project_context and not off.projection.project_context
    assert off.sha256 == make_preset().sha256 != on.sha256
    with pytest.raises(Exception, match=r"projection\.project_context: must be true or false"):
        parse_preset(text.replace('mode = "exact"', 'mode = "exact"\nproject_context = "yes"'))


def test_preset_default_is_used_by_attach(sd):
    text = make_preset().toml_text.replace('mode = "exact"', 'mode = "exact"\nproject_context = true')
    sub = ConceptSubspace.from_text_encoder(parse_preset(text), sd.tokenizer, sd.text_encoder)
    assert ConceptExclusion.attach(_peft_unet(sd), sub).project_context
    assert not ConceptExclusion.attach(_peft_unet(sd), sub,
                                       projection_of(sub).overridden(project_context=False)).project_context
