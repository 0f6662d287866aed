"""``float32_compute``: a text encoder kept in bf16/fp16 computes exactly what its float32 copy computes, and every
tensor is back in its own storage afterwards (dtype, bits and memory)."""

from __future__ import annotations

import copy

import pytest
import torch

from concept_exclusion.concept.precision import float32_compute
from concept_exclusion.testing.tiny import clip_text_encoder
from concept_exclusion.testing.tiny_mmdit import t5_encoder


@pytest.mark.parametrize("build", [lambda: t5_encoder(60), lambda: clip_text_encoder(60)], ids=["t5", "clip"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_encoder_reads_like_its_float32_copy_and_is_restored(build, dtype):
    low = build().to(dtype)
    before = {k: v.clone() for k, v in low.state_dict().items()}
    storage = {n: p.data_ptr() for n, p in low.named_parameters()}
    ids = torch.randint(0, 60, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = low(ids).last_hidden_state.float()
        exact = copy.deepcopy(low).float()(ids).last_hidden_state
        with torch.autocast("cpu", dtype=torch.bfloat16), float32_compute(low):  # a trainer's autocast too
            upcast = low(ids).last_hidden_state
            inside = {p.dtype for p in low.parameters()}
    after = low.state_dict()
    assert upcast.dtype == torch.float32 and torch.equal(upcast, exact)
    assert float((plain - exact).abs().max()) > 1e-3  # what the low-precision pass would have read instead
    assert dtype in inside  # the layers are cast only while they run: no float32 copy of the whole model
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)
    assert storage == {n: p.data_ptr() for n, p in low.named_parameters()}  # its own memory, not a copy
