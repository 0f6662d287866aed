"""One subspace codec: the file, the JSON document and the header keys carry the same record."""

from __future__ import annotations

import pytest
import torch

from concept_exclusion import ConceptSubspace, SubspaceError
from concept_exclusion.concept.codec import from_json, read_file, record_of, to_header, to_json, write_file
from concept_exclusion.metadata import PREFIX, read_basis

from helpers import make_preset


@pytest.fixture
def subspace():
    g = torch.Generator().manual_seed(0)
    rows = {"context": torch.randn(12, 16, generator=g, dtype=torch.float64),
            "pooled": torch.randn(5, 8, generator=g, dtype=torch.float64)}
    return ConceptSubspace.from_rows(rows, make_preset(max_rank=4), encoder="test-encoder", clip_skip=2,
                                     sequence_length=64)


def test_file_and_json_are_bit_exact(subspace, tmp_path):
    write_file(tmp_path / "s.safetensors", record_of(subspace))
    for rec in (read_file(tmp_path / "s.safetensors"), from_json(to_json(record_of(subspace)))):
        back = ConceptSubspace(**vars(rec))
        assert back.sha256 == subspace.sha256 and back.preset.sha256 == subspace.preset.sha256
        assert (back.encoder, back.clip_skip, back.energy_kept) == ("test-encoder", 2, subspace.energy_kept)
        assert back.sequence_length == 64


def test_header_keys_hold_the_bases_in_float16(subspace):
    meta = to_header(record_of(subspace), PREFIX)
    assert all(isinstance(v, str) for v in meta.values()) and meta[PREFIX + "sequence_length"] == "64"
    for space, u in subspace.bases.items():
        back = read_basis(meta, space)
        assert back.shape == u.shape and float((back.T @ u).abs().diagonal().min()) > 1 - 1e-3


def test_json_refuses_damaged_documents(subspace):
    doc = to_json(record_of(subspace))
    with pytest.raises(SubspaceError, match="not a concept-exclusion-subspace-json/1"):
        from_json({**doc, "format": "other"})
    doc["bases"]["context"]["shape"] = [16, 3]
    with pytest.raises(SubspaceError, match="malformed subspace"):
        from_json(doc)
