"""The role registry: one table decides which layers are targets, which read text, and their bases."""

from __future__ import annotations

import re

import pytest
import torch

from concept_exclusion import ConceptExclusion, ConceptSubspace, TargetError
from concept_exclusion.options import AttachOptions
from concept_exclusion.model.roles import (ROLES, Role, add_role, attention_path, basis_for, reads_text, role_of,
                                           roles_in, target_sets)
from concept_exclusion.concept.preset import Projection
from concept_exclusion.model.plan import context_readers, find_targets

from helpers import make_preset
from helpers.models import peft_unet, train_with_text_encoder

NAMES = {
    "key": ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"],
    "value": ["mid_block.attentions.0.transformer_blocks.0.attn2.to_v", "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v"],
    "query": ["up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q",
              "lora_unet_output_blocks_3_1_transformer_blocks_0_attn2_to_q"],
    "out": ["up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0",
            "lora_unet_output_blocks_3_1_transformer_blocks_0_attn2_to_out_0"],
    "pooled": ["add_embedding.linear_1", "lora_unet_add_embedding_linear_1", "lora_unet_label_emb_0_0"],
    None: ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k", "add_embedding.linear_2",
           "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "time_embedding.linear_1"],
}


@pytest.mark.parametrize("role", list(NAMES))
def test_every_naming_scheme_maps_to_its_role(role):
    for name in NAMES[role]:
        assert role_of(name) == role, name
        assert sum(bool(r.pattern.search(name)) for r in ROLES.values()) == (role is not None), name


def test_rows_say_what_reads_text_and_what_each_set_holds():
    readers = {r for r in ROLES if reads_text(r)}
    assert {"key", "value", "pooled"} <= readers and not readers & {"query", "out"}
    assert target_sets() == ("kv", "attention")
    assert {"key", "value", "pooled"} <= roles_in(("kv",)) and not roles_in(("kv",)) & {"query", "out"}
    assert roles_in(("attention",)) == roles_in(("kv",)) | {"query", "out"}
    with pytest.raises(TargetError, match="unknown target set 'qkv'"):
        roles_in(("qkv",))
    assert attention_path("query", NAMES["query"][0]) == "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    assert attention_path("out", NAMES["out"][1]) == "lora_unet_output_blocks_3_1_transformer_blocks_0_attn2"


def test_basis_shapes():
    u = torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64))[0]
    p = torch.linalg.qr(torch.randn(4, 2, dtype=torch.float64))[0]
    assert basis_for("key", "k", {"context": u}, 8) == ("input", u)
    side, padded = basis_for("pooled", "add_embedding.linear_1", {"context": u, "pooled": p}, 10)
    assert side == "input" and padded.shape == (10, 2) and torch.equal(padded[:4], p) and not padded[4:].any()
    with pytest.raises(Exception, match="reads 6-d text embeddings"):
        basis_for("value", "v", {"context": u}, 6)
    attn = torch.nn.Module()
    attn.heads, attn.to_k = 2, torch.nn.Linear(8, 4, bias=False)
    side, q = basis_for("query", "a.attn2.to_q", {"context": u}, 4, {"a.attn2": attn})
    assert side == "output" and q.shape[0] == 4
    side2, q2 = basis_for("query", "a.attn2.to_q", {"context": u}, 4, lambda path: attn)  # a lookup function
    assert torch.equal(q, q2)
    with pytest.raises(TargetError, match="needs the attention module"):
        basis_for("query", "b.attn2.to_q", {"context": u}, 4, {})


def test_adding_a_row_adds_an_architecture(sd):
    """A new text reader is one row: find_targets and the context readers pick it up."""
    row = Role("test_reader", re.compile(r"(^|[._])text_in$"), "context", "input", "exact", True, ("kv",), "text_in")
    add_role(row)
    try:
        with pytest.raises(TargetError, match="already registered"):
            add_role(row)
        model = torch.nn.Module()
        model.text_in = torch.nn.Linear(32, 16)
        sub = ConceptSubspace.from_text_encoder(make_preset(), sd.tokenizer, sd.text_encoder)
        (t,) = find_targets(model, sub, Projection(targets=("kv",)))
        assert t.role == "test_reader" and t.side == "input" and t.basis is sub.basis()
        assert [name for name, _, _ in context_readers(model, sub)] == ["text_in"]
    finally:
        del ROLES["test_reader"]


def test_reencoding_refreshes_query_and_out_bases(sd):
    """allow_text_encoder_training with the 'attention' set: every target, query/out included, gets the
    bases the registry gives for the re-encoded concept, and the constraints hold against them."""
    from transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(sd.root / "text_encoder")
    te.requires_grad_(True)
    sub = ConceptSubspace.from_text_encoder(make_preset(targets='["attention"]'), sd.tokenizer, te)
    unet = peft_unet(sd, ("to_q", "to_k", "to_v", "to_out.0"))
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad] + list(te.parameters()), lr=1e-2)
    ex = ConceptExclusion.attach(unet, sub, optimizer=opt, text_encoder=te,
                                 options=AttachOptions(allow_text_encoder_training=True, reencode_every=2))
    first = {t.name: t.basis.clone() for t in ex.targets}
    assert {t.role for t in ex.targets} == {"key", "value", "query", "out"}
    train_with_text_encoder(sd, unet, te, opt, 2)
    fresh = {t.name: t.basis for t in find_targets(unet, ex.subspace, Projection(targets=("attention",)))}
    for t in ex.targets:
        assert not torch.equal(t.basis, first[t.name]), t.name  # nothing keeps a stale basis
        torch.testing.assert_close(t.basis, fresh[t.name], rtol=0, atol=1e-12)
        u = t.basis.float()
        w = t.param.detach()
        part = w @ u if t.side == "input" else u.T @ w
        assert float(part.abs().max()) < 1e-5, t.name
