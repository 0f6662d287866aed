"""Concept embeddings and the subspace: token options, SDXL concatenation, determinism, persistence."""

from __future__ import annotations

import torch
import pytest

from concept_exclusion import ConceptSubspace, SafetensorsFileError, SubspaceError, parse_preset
from concept_exclusion.concept.embeddings import TextEncoders, concept_rows
from concept_exclusion.concept.subspace import orthonormal_basis

from helpers import make_preset


def _orthonormal(u: torch.Tensor) -> bool:
    return torch.allclose(u.T @ u, torch.eye(u.shape[1], dtype=u.dtype), atol=1e-10)


def test_basis_is_orthonormal_and_keeps_energy(sd):
    sub = ConceptSubspace.from_text_encoder(make_preset(), sd.tokenizer, sd.text_encoder)
    u = sub.basis()
    assert u.dtype == torch.float64 and u.shape[0] == 32 and _orthonormal(u)
    assert sub.energy_kept["context"] >= 0.99
    rows = concept_rows(make_preset().concepts, TextEncoders([sd.tokenizer], [sd.text_encoder]), "all")["context"]
    residual = rows - rows @ u @ u.T
    assert float(residual.square().sum() / rows.square().sum()) <= 0.01 + 1e-9


def test_rank_selection_by_energy_then_max_rank():
    torch.manual_seed(0)
    rows = torch.randn(200, 3, dtype=torch.float64) @ torch.randn(3, 16, dtype=torch.float64)
    rows += 1e-3 * torch.randn(200, 16, dtype=torch.float64)
    u, kept = orthonormal_basis(rows, energy=0.999, max_rank=64)
    assert u.shape[1] == 3 and kept >= 0.999
    u2, _ = orthonormal_basis(rows, energy=0.999, max_rank=2)
    assert u2.shape[1] == 2


def test_deterministic_bit_for_bit(sd):
    a = ConceptSubspace.from_text_encoder(make_preset(), sd.tokenizer, sd.text_encoder)
    b = ConceptSubspace.from_text_encoder(make_preset(), sd.tokenizer, sd.text_encoder)
    assert torch.equal(a.basis(), b.basis()) and a.sha256 == b.sha256


def test_token_options_differ_as_documented(sd):
    enc = TextEncoders([sd.tokenizer], [sd.text_encoder])
    concepts = make_preset().concepts
    rows = {opt: concept_rows(concepts, enc, opt)["context"] for opt in ("concept", "all", "contrastive",
                                                                            "contrastive+concept")}
    # 'all' holds the concept positions and every later position (end-of-text and padding)
    n_texts = len(concepts[0].texts())
    assert rows["all"].shape[0] > rows["concept"].shape[0] >= n_texts
    assert rows["contrastive+concept"].shape[0] == rows["contrastive"].shape[0] + rows["concept"].shape[0]
    # contrastive rows are differences: small where the prompt equals its neutral version
    assert float(rows["contrastive"].norm(dim=1).mean()) < float(rows["all"].norm(dim=1).mean())
    # raw states share a large generic component that contrastive differences cancel, so the raw
    # basis reaches the same energy with fewer directions
    raw = ConceptSubspace.from_rows({"context": rows["all"]}, energy=0.99)
    con = ConceptSubspace.from_rows({"context": rows["contrastive"]}, energy=0.99)
    assert raw.rank() < con.rank()


def test_concept_span_positions(sd):
    enc = TextEncoders([sd.tokenizer], [sd.text_encoder])
    assert enc.span("a photo of {}", "zorblax logo") == (4, 6)  # BOS, a, photo, of | zorblax, logo
    assert enc.span("{}", "zorblax") == (1, 2)


def test_clip_skip_changes_the_states(sd):
    last = ConceptSubspace.from_text_encoder(make_preset(), sd.tokenizer, sd.text_encoder)
    penult = ConceptSubspace.from_text_encoder(make_preset(), sd.tokenizer, sd.text_encoder, clip_skip=2)
    assert penult.clip_skip == 2 and not torch.equal(last.basis(), penult.basis())
    with pytest.raises(SubspaceError, match="clip_skip"):
        ConceptSubspace.from_text_encoder(make_preset(), sd.tokenizer, sd.text_encoder, clip_skip=0)


def test_sdxl_concatenates_both_encoders_and_has_pooled_basis(sdxl):
    sub = ConceptSubspace.from_text_encoders(make_preset(), sdxl.tokenizers, sdxl.text_encoders)
    assert sub.dim("context") == 64 and sub.dim("pooled") == 32
    assert _orthonormal(sub.basis("context")) and _orthonormal(sub.basis("pooled"))
    enc = TextEncoders(sdxl.tokenizers, sdxl.text_encoders, family="sdxl")
    out = enc.encode(["a photo of zorblax"])
    ids = [t(["a photo of zorblax"], padding="max_length", return_tensors="pt").input_ids for t in sdxl.tokenizers]
    h1 = sdxl.text_encoders[0](ids[0], output_hidden_states=True).hidden_states[-2]
    o2 = sdxl.text_encoders[1](ids[1], output_hidden_states=True)
    assert torch.allclose(out.hidden, torch.cat([h1, o2.hidden_states[-2]], -1).double(), atol=1e-6)
    assert torch.allclose(out.pooled, o2.text_embeds.double(), atol=1e-6)


def test_preserve_directions_are_removed(sd):
    preset = make_preset()
    enc = TextEncoders([sd.tokenizer], [sd.text_encoder])
    rows = concept_rows(preset.concepts, enc, "all")
    keep_rows = concept_rows(parse_preset(
        '[preset]\nname="k"\nversion="1"\ndescription=""\n[[concepts]]\nname="logo"\nprompts=["logo"]\n').concepts,
        enc, "all")
    sub = ConceptSubspace.from_rows(rows, preserve_rows=keep_rows, energy=0.99)
    keep_basis, _ = orthonormal_basis(keep_rows["context"], 0.99, 32)
    assert float((sub.basis().T @ keep_basis).abs().max()) < 1e-8


def test_preserve_covering_everything_is_an_error(sd):
    enc = TextEncoders([sd.tokenizer], [sd.text_encoder])
    rows = concept_rows(make_preset().concepts, enc, "concept")
    with pytest.raises(SubspaceError, match="preserve"):
        ConceptSubspace.from_rows(rows, preserve_rows=rows, energy=1.0)


def test_save_load_roundtrip(sd, tmp_path):
    sub = ConceptSubspace.from_text_encoder(make_preset(), sd.tokenizer, sd.text_encoder)
    sub.save(tmp_path / "s.safetensors")
    back = ConceptSubspace.load(tmp_path / "s.safetensors")
    assert torch.equal(back.basis(), sub.basis())
    assert back.preset.sha256 == sub.preset.sha256 and back.encoder == sub.encoder
    assert back.energy_kept == pytest.approx(sub.energy_kept)
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temporary left behind


def test_load_rejects_non_orthonormal_and_foreign_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"basis.context": torch.ones(4, 2, dtype=torch.float64)}, str(tmp_path / "x.safetensors"),
              metadata={"format": "concept-exclusion-subspace/1"})
    with pytest.raises(SafetensorsFileError, match="orthonormal"):
        ConceptSubspace.load(tmp_path / "x.safetensors")
    save_file({"w": torch.ones(2)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(SafetensorsFileError, match="not a concept subspace"):
        ConceptSubspace.load(tmp_path / "y.safetensors")
