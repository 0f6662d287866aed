"""Flux (diffusers ``FluxTransformer2DModel``, tiny, from configs): context projection keeps every gradient blind to
the concept's directions in the T5 states and the pooled CLIP vector; exact mode holds ``context_embedder`` and the
pooled reader on the basis under AdamW with weight decay; the saved LoRA reloads in ``FluxPipeline``; what is not
guaranteed is refused in one line naming the layer."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from helpers import WORDS, make_preset
from helpers.mmdit import (FLUX_LORA, READERS, add_lora, effective_delta, flux_inputs, grads, loss_of, move_along,
                          relative_changes)
from concept_exclusion import ConceptExclusion, ConceptSubspace
from concept_exclusion.errors import ConceptExclusionError, SubspaceError, TargetError
from concept_exclusion.integrations.diffusers import encode_prompts, save_lora, subspace_from_pipeline
from concept_exclusion.metadata import PREFIX
from concept_exclusion.model.plan import context_readers, projection_of
from concept_exclusion.testing.tiny_mmdit import flux_pipeline

PROMPTS = ["a photo of the zorblax logo", "a red shirt with the zorblax logo sign"]


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux")
    pipe = flux_pipeline(WORDS, folder / "src")
    pipe.save_pretrained(folder / "pipe")
    sub = subspace_from_pipeline(make_preset(max_rank=16), pipe, max_sequence_length=16)
    states, pooled = encode_prompts(pipe, PROMPTS, max_sequence_length=16)
    return SimpleNamespace(pipe=pipe, sub=sub, folder=folder, states=states.detach(), pooled=pooled.detach())


def _model(flux, kind: str):
    model = copy.deepcopy(flux.pipe.transformer).train()
    if kind == "lora":
        return add_lora(model, FLUX_LORA + READERS)
    return model.requires_grad_(True)


def test_subspace_has_t5_context_and_clip_pooled_bases(flux):
    assert flux.sub.dim("context") == flux.pipe.text_encoder_2.config.d_model
    assert flux.sub.dim("pooled") == flux.pipe.text_encoder.config.hidden_size
    assert 0 < flux.sub.rank("context") <= 16 and 0 < flux.sub.rank("pooled") <= 16


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_gradients_ignore_concept_moves_in_t5_and_pooled_states(flux, kind):
    model = _model(flux, kind)
    inputs = flux_inputs(len(PROMPTS))
    moved = move_along(flux.states, flux.sub.basis("context")), move_along(flux.pooled, flux.sub.basis("pooled"))
    ex = ConceptExclusion.attach(model, flux.sub, projection_of(flux.sub).overridden(mode="exact"))
    assert ex.project_context  # on by default for an MMDiT
    assert sorted(n for n, _, _ in context_readers(model, flux.sub)) == sorted(READERS)
    g0 = grads(model, inputs, flux.states, flux.pooled)
    g1 = grads(model, inputs, *moved)
    assert len(g0) == sum(p.requires_grad for p in model.parameters())
    changes = relative_changes(g0, g1)
    worst = max(changes, key=changes.get)
    assert changes[worst] < 1e-4, (worst, changes[worst])
    ex.uninstall()
    plain = relative_changes(grads(model, inputs, flux.states, flux.pooled), grads(model, inputs, *moved))
    assert max(plain.values()) > 1e-2
    assert sum(v > 1e-3 for v in plain.values()) > len(plain) // 2  # the move reaches most parameters


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_readers_stay_fixed_on_the_basis_under_adamw_weight_decay(flux, kind):
    def train(attach: bool) -> dict[str, float]:
        model = _model(flux, kind)
        modules = dict(model.named_modules())
        w0 = {n: getattr(modules[n], "base_layer", modules[n]).weight.detach().clone() for n in READERS}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
        ex = ConceptExclusion.attach(model, flux.sub, projection_of(flux.sub).overridden(mode="exact"),
                                     optimizer=opt) if attach else None
        for step in range(8):
            inputs = flux_inputs(len(PROMPTS), seed=step)
            loss_of(model, inputs, flux.states, flux.pooled).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
        out = {}
        for n, space in zip(READERS, ("context", "pooled")):
            delta = effective_delta(modules[n], w0[n]).detach().double()
            out[n] = float((delta @ flux.sub.basis(space)).norm() / delta.norm())
        if ex is not None:
            assert {t.name.split(":")[0] for t in ex.targets} == set(READERS)
            assert ex.max_leakage() < 1e-5
        return out

    held = train(attach=True)
    assert max(held.values()) < 1e-5, held
    loose = train(attach=False)
    assert min(loose.values()) > 1e-2, loose


def test_saved_lora_carries_metadata_and_reloads_in_flux_pipeline(flux, tmp_path):
    from diffusers import FluxPipeline

    model = _model(flux, "lora")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ex = ConceptExclusion.attach(model, flux.sub, projection_of(flux.sub).overridden(mode="exact"), optimizer=opt)
    for step in range(3):
        loss_of(model, flux_inputs(2, seed=step), flux.states, flux.pooled).backward()
        opt.step()
        opt.zero_grad()
    path = save_lora(model, tmp_path / "pytorch_lora_weights.safetensors", ex)
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert any("context_embedder" in k for k in keys)
    assert meta[PREFIX + "mode"] == "exact" and meta[PREFIX + "project_context"] == "true"
    pipe = FluxPipeline.from_pretrained(flux.folder / "pipe")
    pipe.load_lora_weights(str(path))
    inputs = flux_inputs(2, seed=9)
    model.eval()
    pipe.transformer.eval()
    with torch.no_grad():
        want = loss_of(model, inputs, flux.states, flux.pooled)
        got = loss_of(pipe.transformer, inputs, flux.states, flux.pooled)
        base = loss_of(flux.pipe.transformer.eval(), inputs, flux.states, flux.pooled)
    assert abs(float(got - want)) < 1e-5 * float(want)
    assert abs(float(base - want)) > 1e-4 * float(want)  # the LoRA changed the model, and the reload carries it
    with pytest.raises(ConceptExclusionError, match="kohya"):
        save_lora(model, tmp_path / "k.safetensors", ex, format="kohya")
    ex.uninstall()


def test_refusals_are_one_line_and_name_the_layer(flux):
    model = _model(flux, "lora")
    t5 = copy.deepcopy(flux.pipe.text_encoder_2).requires_grad_(True)
    with pytest.raises(TargetError, match="text encoder") as err:
        ConceptExclusion.attach(model, flux.sub, projection_of(flux.sub).overridden(mode="exact"),
                                text_encoder=[flux.pipe.text_encoder, t5])
    assert "\n" not in str(err.value)
    t5_only = ConceptSubspace.from_text_encoder(make_preset(max_rank=8), flux.pipe.tokenizer_2,
                                                flux.pipe.text_encoder_2)
    with pytest.raises(SubspaceError, match=r"time_text_embed\.text_embedder\.linear_1") as err:
        ConceptExclusion.attach(model, t5_only, projection_of(t5_only).overridden(mode="exact"))
    assert "\n" not in str(err.value)
    blocks_only = add_lora(copy.deepcopy(flux.pipe.transformer), FLUX_LORA)
    with pytest.raises(TargetError, match="project_context") as err:
        ConceptExclusion.attach(blocks_only, flux.sub,
                                projection_of(flux.sub).overridden(mode="exact", project_context=False))
    assert "\n" not in str(err.value)
    assert not any(hasattr(m, "_forward_pre_hooks") and m._forward_pre_hooks for m in model.modules())


def test_default_lora_without_reader_layers_is_protected_by_context_projection_alone(flux):
    model = add_lora(copy.deepcopy(flux.pipe.transformer), FLUX_LORA)
    ex = ConceptExclusion.attach(model, flux.sub, projection_of(flux.sub).overridden(mode="exact"))
    assert ex.targets == [] and ex.project_context
    inputs = flux_inputs(2)
    moved = move_along(flux.states, flux.sub.basis("context")), move_along(flux.pooled, flux.sub.basis("pooled"))
    changes = relative_changes(grads(model, inputs, flux.states, flux.pooled), grads(model, inputs, *moved))
    assert max(changes.values()) < 1e-4
    ex.uninstall()


@pytest.mark.parametrize("layers", ["readers", "blocks only"])
def test_find_targets_is_what_attach_constrains(flux, layers):
    """The public finder and attach share one plan: on a Flux LoRA without reader layers both find nothing to
    constrain (context projection carries the guarantee) instead of the finder refusing what attach accepts."""
    from concept_exclusion.model.plan import find_targets

    model = add_lora(copy.deepcopy(flux.pipe.transformer), FLUX_LORA + (READERS if layers == "readers" else []))
    found = find_targets(model, flux.sub)
    ex = ConceptExclusion.attach(model, flux.sub)
    assert [(t.name, t.side) for t in found] == [(t.name, t.side) for t in ex.targets]
    assert bool(found) == (layers == "readers")
    ex.uninstall()
