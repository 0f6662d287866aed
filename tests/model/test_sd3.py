"""SD3 / SD3.5 (diffusers ``SD3Transformer2DModel``, tiny, from configs): the joint context (CLIP-L ++ CLIP-G
zero-padded to T5's width, then T5) and the pooled CLIP-L ++ CLIP-G vector are projected in training passes, so no
gradient sees the concept; ``context_embedder`` / the pooled reader stay fixed on the basis; SD3.5's dual-attention
``attn2`` (image self-attention) is no target; the LoRA reloads in ``StableDiffusion3Pipeline``."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from helpers import WORDS, make_preset
from helpers.mmdit import READERS, add_lora, effective_delta, grads, loss_of, move_along, relative_changes, sd3_inputs
from concept_exclusion import ConceptExclusion
from concept_exclusion.integrations.diffusers import encode_prompts, save_lora, subspace_from_pipeline
from concept_exclusion.model.plan import context_readers, projection_of
from concept_exclusion.testing.tiny_mmdit import sd3_pipeline, sd3_transformer

PROMPTS = ["a photo of the zorblax logo", "a red shirt with the zorblax logo sign"]
SD3_LORA = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k", "attn.to_out.0",
            "attn.to_q", "attn.to_v"]


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3")
    pipe = sd3_pipeline(WORDS, folder / "src")
    pipe.save_pretrained(folder / "pipe")
    sub = subspace_from_pipeline(make_preset(max_rank=16, targets='["attention"]'), pipe, max_sequence_length=16)
    states, pooled = encode_prompts(pipe, PROMPTS, max_sequence_length=16)
    return SimpleNamespace(pipe=pipe, sub=sub, folder=folder, states=states.detach(), pooled=pooled.detach())


def test_joint_context_basis_is_t5_wide_and_pooled_is_clip_l_plus_g(sd3):
    assert sd3.sub.dim("context") == sd3.pipe.transformer.config.joint_attention_dim
    assert sd3.sub.dim("pooled") == sd3.pipe.transformer.config.pooled_projection_dim
    assert sd3.states.shape[-1] == sd3.sub.dim("context")


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_gradients_ignore_concept_moves_in_joint_and_pooled_states(sd3, kind):
    model = copy.deepcopy(sd3.pipe.transformer).train()
    model = add_lora(model, SD3_LORA + READERS) if kind == "lora" else model.requires_grad_(True)
    inputs = sd3_inputs(len(PROMPTS))
    moved = move_along(sd3.states, sd3.sub.basis("context")), move_along(sd3.pooled, sd3.sub.basis("pooled"))
    ex = ConceptExclusion.attach(model, sd3.sub, projection_of(sd3.sub).overridden(mode="exact"))
    assert ex.project_context
    assert sorted(n for n, _, _ in context_readers(model, sd3.sub)) == sorted(READERS)
    changes = relative_changes(grads(model, inputs, sd3.states, sd3.pooled), grads(model, inputs, *moved))
    worst = max(changes, key=changes.get)
    assert changes[worst] < 1e-4, (worst, changes[worst])
    ex.uninstall()
    plain = relative_changes(grads(model, inputs, sd3.states, sd3.pooled), grads(model, inputs, *moved))
    assert max(plain.values()) > 1e-2


def test_readers_fixed_on_basis_and_lora_reloads_in_sd3_pipeline(sd3, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    model = add_lora(copy.deepcopy(sd3.pipe.transformer).train(), SD3_LORA + READERS)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ex = ConceptExclusion.attach(model, sd3.sub, projection_of(sd3.sub).overridden(mode="exact"), optimizer=opt)
    for step in range(6):
        loss_of(model, sd3_inputs(2, seed=step), sd3.states, sd3.pooled).backward()
        opt.step()
        opt.zero_grad()
    modules = dict(model.named_modules())
    for name, space in zip(READERS, ("context", "pooled")):
        delta = effective_delta(modules[name], None).detach().double()
        assert float((delta @ sd3.sub.basis(space)).norm() / delta.norm()) < 1e-5
    path = save_lora(model, tmp_path / "pytorch_lora_weights.safetensors", ex)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3.folder / "pipe")
    pipe.load_lora_weights(str(path))
    inputs = sd3_inputs(2, seed=9)
    with torch.no_grad():
        want = loss_of(model.eval(), inputs, sd3.states, sd3.pooled)
        got = loss_of(pipe.transformer.eval(), inputs, sd3.states, sd3.pooled)
    assert abs(float(got - want)) < 1e-5 * float(want)
    ex.uninstall()


def test_sd35_dual_attention_attn2_is_image_self_attention_not_a_target(sd3):
    dual = sd3_transformer(joint_attention_dim=sd3.sub.dim("context"), pooled_projection_dim=sd3.sub.dim("pooled"),
                           dual_attention_layers=(0,))
    assert any(".attn2.to_k" in n for n, _ in dual.named_modules())
    add_lora(dual, SD3_LORA + ["attn2.to_k", "attn2.to_v", "attn2.to_q", "attn2.to_out.0"] + READERS)
    ex = ConceptExclusion.attach(dual, sd3.sub, projection_of(sd3.sub).overridden(mode="exact", targets="attention"))
    assert {t.name for t in ex.targets} == set(READERS)
    ex.uninstall()
