"""The guarantee: after 200 AdamW steps with weight decay, ||(W_eff - W_eff0) U|| <= 1e-5 ||W_eff - W_eff0||
for full weights, PEFT LoRA and kohya-style (LyCORIS) LoRA; gradient mode leaks; refusals are clear."""

from __future__ import annotations

import pytest
import torch

from concept_exclusion import ConceptExclusion, ConceptSubspace, SubspaceError, TargetError
from concept_exclusion.model.plan import projection_of
from concept_exclusion.model.roles import head_basis
from concept_exclusion.options import AttachOptions

from helpers import make_preset
from helpers.models import context_states, lycoris_network, peft_unet, train_with_text_encoder

STEPS = 200
TOL = 1e-5


def _train(model, unet_forward, params, overrides, subspace, steps=STEPS, attach_to=None, **attach):
    """Train with the exclusion attached (``overrides`` of the preset's projection), or without it (None)."""
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1)
    exclusion = None
    if overrides is not None:
        projection = projection_of(subspace).overridden(**overrides)
        exclusion = ConceptExclusion.attach(attach_to or model, subspace, projection, optimizer=opt, **attach)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = unet_forward(g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
    return exclusion


def _sd_forward(unet, ctx):
    def forward(g):
        x = torch.randn(2, 4, 8, 8, generator=g)
        noise = torch.randn(2, 4, 8, 8, generator=g)
        return (unet(x, torch.tensor([10, 500]), encoder_hidden_states=ctx).sample - noise).pow(2).mean()
    return forward


def _ratio(delta: torch.Tensor, basis: torch.Tensor, side: str = "input") -> float:
    part = delta @ basis if side == "input" else basis.T @ delta
    return float(part.norm() / delta.norm())


def _kv_weights(unet):
    return {n: m for n, m in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))}


@pytest.mark.parametrize("mode", ["exact", "gradient"])
def test_full_weights(sd, mode, record_property):
    unet = sd.unet()
    unet.requires_grad_(False)
    for n, m in unet.named_modules():
        if "attn2" in n or n.endswith("conv_in"):
            m.requires_grad_(True)
    sub = ConceptSubspace.from_text_encoder(make_preset(), sd.tokenizer, sd.text_encoder)
    u = sub.basis().float()
    before = {n: m.weight.detach().clone() for n, m in _kv_weights(unet).items()}
    params = [p for p in unet.parameters() if p.requires_grad]
    ex = _train(unet, _sd_forward(unet, context_states(sd)), params, {"mode": mode}, sub)
    ratios = {n: _ratio(m.weight.detach() - before[n], u) for n, m in _kv_weights(unet).items()}
    worst = max(ratios.values())
    record_property(f"full_{mode}_max_leakage", worst)
    assert len(ratios) == 8  # 4 cross-attention blocks (down, mid, 2 up) x (to_k, to_v)
    assert max(ex.leakage().values()) == pytest.approx(worst, rel=1e-2, abs=1e-6)
    if mode == "exact":
        assert worst <= TOL, ratios
    else:
        assert worst > 1e-2, ratios  # Adam + weight decay: gradient-only projection leaks


def _peft_delta(module):
    a = module.lora_A["default"].weight.detach()
    b = module.lora_B["default"].weight.detach()
    return module.scaling["default"] * b @ a


@pytest.mark.parametrize("mode", ["exact", "gradient"])
def test_peft_lora(sd, mode, record_property):
    unet = peft_unet(sd)
    sub = ConceptSubspace.from_text_encoder(make_preset(), sd.tokenizer, sd.text_encoder)
    params = [p for p in unet.parameters() if p.requires_grad]
    _train(unet, _sd_forward(unet, context_states(sd)), params, {"mode": mode}, sub)
    u = sub.basis().float()
    ratios = {n: _ratio(_peft_delta(m), u) for n, m in _kv_weights(unet).items()}
    record_property(f"peft_{mode}_max_leakage", max(ratios.values()))
    if mode == "exact":
        assert max(ratios.values()) <= TOL, ratios
    else:
        assert max(ratios.values()) > 1e-2, ratios


@pytest.mark.parametrize("mode", ["exact", "gradient"])
def test_kohya_style_lycoris_lora(sd, mode, record_property, tmp_path):
    unet = sd.unet()
    unet.requires_grad_(False)
    network = lycoris_network(sd, unet, "lora", tmp_path)
    network.requires_grad_(True)
    kv = {m.lora_name: m for m in network.modules() if str(getattr(m, "lora_name", "")).endswith(("attn2_to_k",
                                                                                                  "attn2_to_v"))}
    assert kv, "lycoris created no cross-attention modules"
    sub = ConceptSubspace.from_text_encoder(make_preset(), sd.tokenizer, sd.text_encoder)
    params = list(network.parameters())
    _train(network, _sd_forward(unet, context_states(sd)), params, {"mode": mode}, sub, base_model=unet)
    u = sub.basis().float()
    ratios = {n: _ratio(m.lora_up.weight.detach() @ m.lora_down.weight.detach(), u) for n, m in kv.items()}
    record_property(f"lycoris_{mode}_max_leakage", max(ratios.values()))
    if mode == "exact":
        assert max(ratios.values()) <= TOL, ratios
    else:
        assert max(ratios.values()) > 1e-2, ratios


def test_attention_set_keeps_query_and_output_constraints(sd):
    unet = peft_unet(sd, targets=("to_q", "to_k", "to_v", "to_out.0"))
    sub = ConceptSubspace.from_text_encoder(make_preset(max_rank=3), sd.tokenizer, sd.text_encoder)
    u = sub.basis()
    params = [p for p in unet.parameters() if p.requires_grad]
    ex = _train(unet, _sd_forward(unet, context_states(sd)), params, {"targets": "attention"}, sub)
    assert {t.role for t in ex.targets} == {"query", "key", "value", "out"}
    for name, attn in unet.named_modules():
        if not name.endswith("attn2"):
            continue
        q_k = head_basis(attn.to_k.base_layer.weight, u, attn.heads)
        q_v = head_basis(attn.to_v.base_layer.weight, u, attn.heads)
        assert 0 < q_k.shape[1] < q_k.shape[0], "constraint must be partial for the test to mean anything"
        d_q, d_o = _peft_delta(attn.to_q).double(), _peft_delta(attn.to_out[0]).double()
        assert float(d_q.norm()) > 0 and float(d_o.norm()) > 0
        assert _ratio(d_q, q_k, "output") <= TOL
        assert _ratio(d_o, q_v, "input") <= TOL
        for proj in (attn.to_k, attn.to_v):
            assert _ratio(_peft_delta(proj).double(), u) <= TOL
    assert max(ex.leakage().values()) <= TOL


def test_sdxl_pooled_path_protected_on_its_columns_only(sdxl):
    unet = sdxl.unet()
    unet.requires_grad_(False)
    lin = unet.add_embedding.linear_1
    lin.requires_grad_(True)
    for n, m in unet.named_modules():
        if n.endswith(("attn2.to_k", "attn2.to_v")):
            m.requires_grad_(True)
    sub = ConceptSubspace.from_text_encoders(make_preset(), sdxl.tokenizers, sdxl.text_encoders)
    ids = [t(["a photo of zorblax", "a red circle"], padding="max_length", return_tensors="pt").input_ids
           for t in sdxl.tokenizers]
    o1 = sdxl.text_encoders[0](ids[0], output_hidden_states=True)
    o2 = sdxl.text_encoders[1](ids[1], output_hidden_states=True)
    ctx = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], -1)
    cond = {"text_embeds": o2.text_embeds, "time_ids": torch.tensor([[8, 8, 0, 0, 8, 8]] * 2, dtype=torch.float32)}

    def forward(g):
        x = torch.randn(2, 4, 8, 8, generator=g)
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=ctx, added_cond_kwargs=cond).sample.pow(2).mean()

    w0 = lin.weight.detach().clone()
    params = [p for p in unet.parameters() if p.requires_grad]
    ex = _train(unet, forward, params, {}, sub, steps=60)
    assert any(t.role == "pooled" for t in ex.targets)
    delta = lin.weight.detach() - w0
    pooled = sub.basis("pooled").float()
    assert float((delta[:, :32] @ pooled).norm()) <= TOL * float(delta.norm())
    assert float(delta[:, 32:].norm()) > 0  # time-id columns train freely
    assert max(ex.leakage().values()) <= TOL


def test_detach_removes_hooks(sd):
    unet = peft_unet(sd)
    sub = ConceptSubspace.from_text_encoder(make_preset(), sd.tokenizer, sd.text_encoder)
    layer = next(iter(_kv_weights(unet).values()))
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # B starts at zero, which would make grad(A) zero
    ex = ConceptExclusion.attach(unet, sub)
    a = layer.lora_A["default"].weight
    _sd_forward(unet, context_states(sd))(torch.Generator().manual_seed(0)).backward()
    u = sub.basis().float()
    assert float((a.grad @ u).abs().max()) < 1e-6
    a.grad = None
    ex.uninstall()
    _sd_forward(unet, context_states(sd))(torch.Generator().manual_seed(0)).backward()
    assert float((a.grad @ u).abs().max()) > 1e-6


def test_manual_after_optimizer_step_without_optimizer(sd):
    unet = peft_unet(sd)
    sub = ConceptSubspace.from_text_encoder(make_preset(), sd.tokenizer, sd.text_encoder)
    ex = ConceptExclusion.attach(unet, sub)
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.5)
    for i in range(5):
        _sd_forward(unet, context_states(sd))(torch.Generator().manual_seed(i)).backward()
        opt.step()
        opt.zero_grad()
        ex.after_optimizer_step()
    assert ex.max_leakage() <= TOL and ex.steps == 5


def test_refusals(sd, tmp_path):
    from peft import LoraConfig

    sub = ConceptSubspace.from_text_encoder(make_preset(), sd.tokenizer, sd.text_encoder)
    frozen = sd.unet().requires_grad_(False)
    with pytest.raises(TargetError, match="no trainable target.*attn2"):
        ConceptExclusion.attach(frozen, sub)
    dora = sd.unet().requires_grad_(False)
    dora.add_adapter(LoraConfig(r=4, use_dora=True, target_modules=["to_k", "to_v"]))
    with pytest.raises(TargetError, match="DoRA"):
        ConceptExclusion.attach(dora, sub)
    loha = lycoris_network(sd, sd.unet().requires_grad_(False), "loha", tmp_path)
    with pytest.raises(TargetError, match="LoHa"):
        ConceptExclusion.attach(loha, sub)
    te = sd.text_encoder
    te.requires_grad_(True)
    try:
        with pytest.raises(TargetError, match="text encoder"):
            ConceptExclusion.attach(peft_unet(sd), sub, text_encoder=te)
    finally:
        te.requires_grad_(False)


def test_dimension_mismatch_is_an_error(sd, sdxl):
    sub = ConceptSubspace.from_text_encoder(make_preset(), sd.tokenizer, sd.text_encoder)  # 32-d
    unet = sdxl.unet().requires_grad_(False)  # reads 64-d context
    for n, m in unet.named_modules():
        if n.endswith("attn2.to_k"):
            m.requires_grad_(True)
    with pytest.raises(SubspaceError, match="reads 64-d text embeddings but the concept basis is 32-d"):
        ConceptExclusion.attach(unet, sub)


def test_text_encoder_training_allowed_reencodes(sd):
    from transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(sd.root / "text_encoder")
    te.requires_grad_(True)
    sub = ConceptSubspace.from_text_encoder(make_preset(), sd.tokenizer, te)
    unet = peft_unet(sd)
    params = [p for p in unet.parameters() if p.requires_grad] + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    ex = ConceptExclusion.attach(unet, sub, optimizer=opt, text_encoder=te,
                                 options=AttachOptions(allow_text_encoder_training=True, reencode_every=2))
    first = ex.subspace.basis().clone()
    train_with_text_encoder(sd, unet, te, opt, 4)
    assert ex.steps == 4 and not torch.equal(first, ex.subspace.basis())
    u = ex.subspace.basis().float()
    for m in _kv_weights(unet).values():
        assert float((m.lora_A["default"].weight.detach() @ u).abs().max()) < 1e-5


def test_existing_adapter_loses_concept_components_at_attach(sd):
    """A LoRA that already learned something (resumed, downloaded) is projected at attach; training from
    there keeps the invariant relative to the projected weights."""
    unet = peft_unet(sd)
    for m in _kv_weights(unet).values():
        with torch.no_grad():
            m.lora_B["default"].weight.normal_()
    sub = ConceptSubspace.from_text_encoder(make_preset(), sd.tokenizer, sd.text_encoder)
    u = sub.basis().float()
    assert max(_ratio(_peft_delta(m), u) for m in _kv_weights(unet).values()) > 0.1
    params = [p for p in unet.parameters() if p.requires_grad]
    ex = _train(unet, _sd_forward(unet, context_states(sd)), params, {}, sub, steps=20)
    assert max(_ratio(_peft_delta(m), u) for m in _kv_weights(unet).values()) <= TOL
    assert ex.max_leakage() <= TOL
