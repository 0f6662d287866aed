"""Hooks attach and detach symmetrically: after detach nothing of the exclusion runs and every flag says so;
re-encoding is detach + attach of the hooks that hold bases."""

from __future__ import annotations

import pytest
import torch

from concept_exclusion import ConceptExclusion, ConceptSubspace, TargetError
from concept_exclusion.hooks.base import Hook, Hooks, OptimizerPostStep
from concept_exclusion.metadata import PREFIX
from concept_exclusion.model.plan import context_readers, projection_of
from concept_exclusion.options import AttachOptions

from helpers import make_preset
from helpers.models import context_states, peft_unet, train_with_text_encoder


class Counting(Hook):
    def __init__(self, param: torch.nn.Parameter) -> None:
        super().__init__()
        self.param, self.calls = param, 0

    def _install(self) -> list:
        def hook(grad):
            self.calls += 1

        return [self.param.register_hook(hook)]


def _backward(p):
    (p * torch.ones_like(p)).sum().backward()


def test_hook_attach_detach_is_symmetric_and_idempotent():
    p = torch.nn.Parameter(torch.zeros(3))
    h = Counting(p)
    assert not h.attached and h.handles == 0
    h.attach().attach()  # a second attach installs nothing more
    _backward(p)
    assert h.attached and h.handles == 1 and h.calls == 1
    h.detach()
    h.detach()
    _backward(p)
    assert not h.attached and h.handles == 0 and h.calls == 1
    h.attach()
    _backward(p)
    assert h.calls == 2


def test_hooks_replace_and_detach_in_reverse():
    p = torch.nn.Parameter(torch.zeros(3))
    hooks = Hooks()
    a, b = Counting(p), Counting(p)
    hooks.add("a", a)
    assert not a.attached and not hooks.attached  # registering installs nothing
    hooks.attach()
    assert a.attached
    hooks.add("a", b)  # replacing detaches the old one; the new one waits for attach
    assert not a.attached and not b.attached
    hooks.attach()
    assert b.attached and hooks.attached
    hooks.detach()
    assert not hooks.attached and hooks.get("a") is b
    hooks.attach()
    assert b.attached
    hooks.remove("a")
    assert hooks.get("a") is None and not b.attached


def test_optimizer_post_step_hook():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    seen = []
    hook = OptimizerPostStep(opt, lambda: seen.append(1)).attach()
    p.grad = torch.ones(2)
    opt.step()
    hook.detach()
    opt.step()
    assert seen == [1] and not opt._optimizer_step_post_hooks
    with pytest.raises(TargetError, match="register_step_post_hook"):
        OptimizerPostStep(object(), lambda: None)


def test_detach_leaves_nothing_attached(sd):
    unet = sd.unet()  # full weights: every gradient is non-zero
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-3)
    sub = ConceptSubspace.from_text_encoder(make_preset(targets='["attention"]'), sd.tokenizer, sd.text_encoder)
    ex = ConceptExclusion.attach(unet, sub, projection_of(sub).overridden(project_context=True), optimizer=opt)
    assert ex.attached and ex.project_context
    assert {name for name, h in ex.hooks if h.attached} == {"gradient", "distributed", "context", "optimizer"}
    readers = [m for m in unet.modules() if m._forward_pre_hooks]
    assert readers and opt._optimizer_step_post_hooks
    ex.uninstall()
    assert not ex.attached and not ex.project_context and not ex.context.attached
    assert all(not h.attached and h.handles == 0 for _, h in ex.hooks)
    assert not any(m._forward_pre_hooks for m in unet.modules()) and not opt._optimizer_step_post_hooks
    # gradients flow unprojected, and the file written afterwards still records how it was trained
    key = next(t.param for t in ex.targets if t.role == "key")
    unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), encoder_hidden_states=context_states(sd)).sample.sum().backward()
    assert float((key.grad @ ex.subspace.basis().float()).abs().max()) > 1e-6
    assert ex.metadata()[PREFIX + "project_context"] == "true"


def test_reencoding_is_detach_then_attach(sd):
    from transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(sd.root / "text_encoder").requires_grad_(True)
    sub = ConceptSubspace.from_text_encoder(make_preset(), sd.tokenizer, te)
    unet = peft_unet(sd)
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad] + list(te.parameters()), lr=1e-2)
    ex = ConceptExclusion.attach(unet, sub, projection_of(sub).overridden(project_context=True), optimizer=opt,
                                 text_encoder=te,
                                 options=AttachOptions(allow_text_encoder_training=True, reencode_every=1))
    before = {name: (h, h.handles) for name, h in ex.hooks}
    train_with_text_encoder(sd, unet, te, opt, 1)
    assert ex.steps == 1 and ex.subspace is not sub
    fresh = {r.name: r.basis for r in context_readers(unet, ex.subspace)}
    assert all(torch.equal(r.basis, fresh[r.name]) for r in ex.context.readers)  # the readers hold the new bases
    assert {name: (h, h.handles) for name, h in ex.hooks} == before  # the same hooks, attached again
    ex.uninstall()
    assert not ex.attached
