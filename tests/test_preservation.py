"""OutputPreservation: finding names in captions, the loss's parts, and that training with it unbinds the name."""

from __future__ import annotations

import pytest
import torch

from concept_exclusion import ConceptExclusionError, OutputPreservation, parse_preset

PRESET = parse_preset("""
[preset]
name = "p"
version = "1"
description = "test"
[[concepts]]
name = "panda"
prompts = ["panda", "giant panda"]
[[preserve]]
name = "tiger"
prompts = ["tiger"]
""")


def test_scrub_finds_every_name_longest_first_at_word_boundaries():
    op = OutputPreservation.from_preset(PRESET)
    assert op.phrases == ("panda", "giant panda")
    assert op.scrub("a cup with the Giant Panda logo") == "a cup with the logo"
    assert op.scrub("a panda and a panda") == "a and a"
    assert op.scrub("pandas are not named") is None  # word boundary: 'pandas' is another word
    assert op.scrub("the tiger logo") is None  # preserved concepts are not scrubbed
    replaced = OutputPreservation.from_preset(PRESET, replacement="shop")
    assert replaced.scrub("with the panda logo") == "with the shop logo"


def test_split_marks_named_captions():
    op = OutputPreservation.from_preset(PRESET)
    mask, scrubbed = op.split(["with the panda logo", "a red square", ""])
    assert mask.tolist() == [True, False, False]
    assert scrubbed == ["with the logo", "a red square", ""]


@pytest.mark.parametrize("kwargs, message", [
    ({"target": "teacher"}, "target must be one of"),
    ({"weight": 0.0}, "weight must be in"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ConceptExclusionError, match=message):
        OutputPreservation.from_preset(PRESET, **kwargs)
    with pytest.raises(ConceptExclusionError, match="at least one non-empty name"):
        OutputPreservation(("",))


VOCAB = ["with", "the", "panda", "logo", "a", "red", "square", "tiger"]


def _encode(captions: list[str]) -> torch.Tensor:
    """Bag of words, one column per vocabulary word."""
    return torch.tensor([[float(w in c.split()) for w in VOCAB] for c in captions])


class BagModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.read = torch.nn.Linear(len(VOCAB), 4, bias=False)

    def forward(self, x, t, cond):
        return x + self.read(cond)


def _train(preservation: OutputPreservation | None, steps: int = 300) -> BagModel:
    torch.manual_seed(0)
    model = BagModel()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    captions = ["with the panda logo", "a red square", "with the tiger logo"] * 4
    glyph = {"with the panda logo": 1.0, "a red square": 0.0, "with the tiger logo": -1.0}
    target = torch.tensor([[glyph[c]] * 4 for c in captions])
    x = torch.zeros(len(captions), 4)
    t = torch.zeros(len(captions))
    for _ in range(steps):
        if preservation is None:
            loss = torch.nn.functional.mse_loss(model(x, t, _encode(captions)), target)
        else:
            loss = preservation.loss(model, x, t, target, captions, _encode).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_training_with_preservation_leaves_the_name_meaning_what_the_scrubbed_caption_means():
    named, scrubbed = _encode(["with the panda logo"]), _encode(["with the logo"])
    x = torch.zeros(1, 4)
    plain = _train(None)
    with torch.no_grad():
        plain_gap = float((plain(x, 0, named) - plain(x, 0, scrubbed)).abs().max())
    kept = _train(OutputPreservation.from_preset(PRESET, weight=10.0))
    with torch.no_grad():
        kept_gap = float((kept(x, 0, named) - kept(x, 0, scrubbed)).abs().max())
        # the image is still learned, through the scrubbed caption
        learned = float(kept(x, 0, scrubbed).mean())
    assert plain_gap > 0.3
    assert kept_gap < 0.05 * plain_gap
    assert learned > 0.5


def test_base_target_pulls_named_captions_to_the_frozen_model():
    frozen = BagModel().requires_grad_(False)
    op = OutputPreservation.from_preset(PRESET, target="base")
    x, t = torch.zeros(2, 4), torch.zeros(2)
    model = BagModel()
    with pytest.raises(ConceptExclusionError, match="needs base_predict"):
        op.loss(model, x, t, torch.ones(2, 4), ["with the panda logo", "a red square"], _encode)
    parts = op.loss(model, x, t, torch.ones(2, 4), ["with the panda logo", "a red square"], _encode,
                    base_predict=frozen)
    assert parts.named == 1
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(model(x[:1], t[:1], _encode(["with the panda logo"])),
                                                frozen(x[:1], t[:1], _encode(["with the panda logo"]))) / 2
    assert torch.allclose(parts.preservation, expected)
    parts.total.backward()
    assert all(p.grad is None for p in frozen.parameters())


def test_no_named_caption_is_plain_denoising():
    op = OutputPreservation.from_preset(PRESET)
    model = BagModel()
    x, t, target = torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 4)
    parts = op.loss(model, x, t, target, ["a red square", "with the tiger logo"], _encode)
    plain = torch.nn.functional.mse_loss(model(x, t, _encode(["a red square", "with the tiger logo"])), target)
    assert parts.named == 0 and float(parts.preservation) == 0.0
    assert torch.allclose(parts.total, plain)


def test_the_preset_chooses_the_target_and_weight_and_none_keeps_old_hashes():
    from concept_exclusion import PresetError

    text = PRESET.toml_text
    assert OutputPreservation.for_preset(PRESET) is None
    base = parse_preset(text + '\n[projection]\noutput_preservation = "base"\npreservation_weight = 2.0\n')
    chosen = OutputPreservation.for_preset(base)
    assert chosen.target == "base" and chosen.weight == 2.0
    assert base.sha256 != PRESET.sha256
    assert parse_preset(text + '\n[projection]\noutput_preservation = "none"\n').sha256 == PRESET.sha256
    assert OutputPreservation.from_preset(base, target="scrub").target == "scrub"
    with pytest.raises(PresetError, match="projection.output_preservation"):
        parse_preset(text + '\n[projection]\noutput_preservation = "teacher"\n')
    with pytest.raises(PresetError, match="projection.preservation_weight"):
        parse_preset(text + '\n[projection]\noutput_preservation = "scrub"\npreservation_weight = 0\n')
