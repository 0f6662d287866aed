"""attach = validate -> plan -> install: one walk of the model, nothing installed until ``install``, every refusal
before any hook or weight changes, and ``install``/``uninstall`` as one symmetric pair."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

from helpers import make_preset
from concept_exclusion import ConceptExclusion, ConceptSubspace, TargetError
from concept_exclusion.model.plan import find_targets, plan_exclusion, projection_of
from concept_exclusion.options import AttachOptions
from helpers.models import context_states, lycoris_network, train_with_text_encoder


class CountingUNet(UNet2DConditionModel):
    """The real UNet class, counting the walks of its module tree (every ``modules``/``parameters`` walk
    starts with ``named_modules`` on the root)."""

    walks = 0

    def named_modules(self, *args, **kwargs):
        if not args and not kwargs.get("memo"):  # the root call of a walk, not torch's recursion into children
            type(self).walks += 1
        return super().named_modules(*args, **kwargs)


def _counting_unet(sd) -> CountingUNet:
    unet = CountingUNet.from_pretrained(sd.root / "unet")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return unet


def _subspace(sd, encoder=None, targets='["attention"]') -> ConceptSubspace:
    return ConceptSubspace.from_text_encoder(make_preset(targets=targets), sd.tokenizer, encoder or sd.text_encoder)


def _loss(unet, ctx, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    return unet(x, torch.tensor([10, 500]), encoder_hidden_states=ctx).sample.pow(2).mean()


def _target_grads(unet, ctx, targets) -> dict[str, torch.Tensor]:
    for t in targets:
        t.param.grad = None
    _loss(unet, ctx).backward()
    return {t.name: t.param.grad.detach().clone() for t in targets}


def _concept_part(grads, targets) -> float:
    """The largest share of a target's gradient that lies on its constraint."""
    worst = 0.0
    for t in targets:
        g, u = grads[t.name].double(), t.basis
        part = g @ u if t.side == "input" else u.T @ g
        worst = max(worst, float(part.norm() / g.norm()))
    return worst


def test_attach_walks_the_model_once_and_reencoding_never(sd):
    from transformers import CLIPTextModel

    unet = _counting_unet(sd)
    te = CLIPTextModel.from_pretrained(sd.root / "text_encoder").requires_grad_(True)
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad] + list(te.parameters()), lr=1e-3)
    sub = _subspace(sd, te)
    projection = projection_of(sub).overridden(project_context=True)
    CountingUNet.walks = 0
    ex = ConceptExclusion.attach(unet, sub, projection, optimizer=opt, text_encoder=te,
                                 options=AttachOptions(allow_text_encoder_training=True, reencode_every=1))
    assert CountingUNet.walks == 1
    assert {t.role for t in ex.targets} == {"key", "value", "query", "out"} and ex.context is not None
    CountingUNet.walks = 0
    train_with_text_encoder(sd, unet, te, opt, 2)  # two steps, two re-encodings: the plan is rebased, not rebuilt
    assert ex.steps == 2 and CountingUNet.walks == 0


def test_plan_installs_nothing_until_install_and_uninstall_restores(sd):
    unet = _counting_unet(sd)
    sub = _subspace(sd)
    ctx = context_states(sd).detach()
    weights = {n: p.detach().clone() for n, p in unet.named_parameters()}
    reference = _loss(unet, ctx).detach()
    plan = plan_exclusion(unet, sub, projection_of(sub).overridden(project_context=True))
    ex = ConceptExclusion(plan, sub)
    assert not ex.attached and not ex.project_context
    assert all(torch.equal(p, weights[n]) for n, p in unet.named_parameters())  # exact mode has not projected yet
    assert torch.equal(_loss(unet, ctx).detach(), reference)  # the text states reach the readers unprojected
    assert _concept_part(_target_grads(unet, ctx, plan.targets), plan.targets) > 1e-2

    ex.install()
    assert ex.attached and ex.project_context
    assert not torch.equal(_loss(unet, ctx).detach(), reference)
    assert _concept_part(_target_grads(unet, ctx, plan.targets), plan.targets) < 1e-6

    installed = _loss(unet, ctx).detach()
    ex.uninstall()
    assert not ex.attached and not ex.project_context
    assert _concept_part(_target_grads(unet, ctx, plan.targets), plan.targets) > 1e-2
    assert not torch.equal(_loss(unet, ctx).detach(), installed)  # same weights, the context hooks are gone
    ex.install()
    assert torch.equal(_loss(unet, ctx).detach(), installed)


def test_a_refusal_leaves_the_model_as_it_was(sd, tmp_path):
    """The last check of the plan (no text reader in a kohya network) fails after the targets were found: still
    nothing was projected, no gradient hook and no forward hook runs."""
    unet = sd.unet().requires_grad_(False)
    network = lycoris_network(sd, unet, "lora", tmp_path)
    with torch.no_grad():
        for n, p in network.named_parameters():
            if "lora_up" in n:
                p.normal_()  # a non-zero adapter, so an attach-time projection would show
    sub = _subspace(sd)
    before = {n: p.detach().clone() for n, p in network.named_parameters()}
    ctx = context_states(sd).detach()
    reference = _loss(unet, ctx).detach()
    targets = find_targets(network, sub, projection_of(sub).overridden(targets="kv"), base_model=unet)
    grads = _target_grads(unet, ctx, targets)
    with pytest.raises(TargetError, match="base_model"):
        ConceptExclusion.attach(network, sub, projection_of(sub).overridden(targets="kv", project_context=True))
    assert all(torch.equal(p, before[n]) for n, p in network.named_parameters())
    assert torch.equal(_loss(unet, ctx).detach(), reference)
    after = _target_grads(unet, ctx, targets)
    assert all(torch.equal(after[name], g) for name, g in grads.items())


def test_find_targets_is_the_plan_attach_installs(sd, tmp_path):
    unet = sd.unet().requires_grad_(False)
    network = lycoris_network(sd, unet, "lora", tmp_path)
    sub = _subspace(sd)
    found = find_targets(network, sub, base_model=unet)
    ex = ConceptExclusion.attach(network, sub, base_model=unet)
    assert [(t.name, t.side) for t in found] == [(t.name, t.side) for t in ex.targets]
    assert all(torch.equal(a.basis, b.basis) for a, b in zip(found, ex.targets))
