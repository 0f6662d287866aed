"""Models and presets that cannot be protected fail with a clear error before training starts.

No targets, a basis of the wrong width, a concept truncated away by the tokenizer, a preset whose
[[preserve]] list covers its concepts: each raises our own error naming the cause, leaves the model
untouched (no hooks, no changed weights), and through ``concept-exclusion train`` exits 2 with one line
and writes no LoRA or checkpoint.
"""

from __future__ import annotations


import pytest
import torch
from torch import nn

from concept_exclusion import ConceptExclusion, ConceptSubspace, SubspaceError, TargetError, parse_preset
from concept_exclusion.commands.main import main
from concept_exclusion.concept.preset import Projection
from concept_exclusion.model.plan import projection_of

from helpers import make_preset, message_lines, write_captioned_images

BASE = """
[preset]
name = "bad"
version = "1"
description = "a preset that cannot work"

[[concepts]]
name = "zorblax"
prompts = ["zorblax", "zorblax logo"]
templates = {templates}
"""
TRUNCATED = BASE.replace("{templates}", '["' + "a " * 80 + '{}"]')
COVERED = BASE.replace("{templates}", '["{}", "a photo of {}"]') + """
[[preserve]]
name = "the same"
prompts = ["zorblax", "zorblax logo"]
templates = ["{}", "a photo of {}"]
"""


def _untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed"
        assert not getattr(p, "_backward_hooks", None), f"{name} kept a hook from a failed attach"
        assert not getattr(p, "_post_accumulate_grad_hooks", None), f"{name} kept a hook from a failed attach"


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _subspace(dim: int) -> ConceptSubspace:
    g = torch.Generator().manual_seed(0)
    return ConceptSubspace.from_rows({"context": torch.randn(4, dim, generator=g, dtype=torch.float64)})


def test_model_without_targets():
    model = nn.Sequential(nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 4))
    before = _snapshot(model)
    with pytest.raises(TargetError, match=r"no trainable target in Sequential: searched 0 matching layer"):
        ConceptExclusion.attach(model, _subspace(32), Projection(mode="exact", targets=("kv",)))
    _untouched(model, before)


def test_frozen_unet_has_no_targets(sd):
    unet = sd.unet().requires_grad_(False)
    before = _snapshot(unet)
    with pytest.raises(TargetError, match=r"no trainable target in UNet2DConditionModel: searched \d+ matching"):
        ConceptExclusion.attach(unet, _subspace(32), Projection(mode="exact", targets=("kv",)))
    _untouched(unet, before)


def test_basis_width_does_not_match_cross_attention(sd):
    unet = sd.unet()
    before = _snapshot(unet)
    with pytest.raises(SubspaceError, match=r"attn2\.to_k: reads 32-d text embeddings but the concept basis is 48-d"):
        ConceptExclusion.attach(unet, _subspace(48), Projection(mode="exact", targets=("kv",)))
    _untouched(unet, before)


def test_basis_from_another_models_encoders(sd, sdxl):
    """An SDXL subspace (64-d context) given to an SD1-shaped UNet (32-d): refused, naming both widths."""
    sub = ConceptSubspace.from_text_encoders(make_preset(), sdxl.tokenizers, sdxl.text_encoders)
    assert sub.dim() == 64
    unet = sd.unet()
    with pytest.raises(SubspaceError, match=r"reads 32-d text embeddings but the concept basis is 64-d"):
        ConceptExclusion.attach(unet, sub, projection_of(sub).overridden(mode="exact", targets="kv"))


def test_concept_truncated_away_by_the_tokenizer(sd):
    preset = parse_preset(TRUNCATED, "truncated.toml")
    with pytest.raises(SubspaceError, match=r"zorblax: every prompt was truncated away by the tokenizer "
                                            r"\(max length 77\)"):
        ConceptSubspace.from_text_encoder(preset, sd.tokenizer, sd.text_encoder)


def test_preserve_covers_every_concept(sd):
    """Identical [[concepts]] and [[preserve]]: the residue left is below what the energy cut drops anyway."""
    preset = parse_preset(COVERED, "covered.toml")
    for tokens in ("all", "concept", "contrastive"):
        p = parse_preset(COVERED + f'\n[projection]\ntokens = "{tokens}"\n', "covered.toml")
        with pytest.raises(SubspaceError, match=r"\[\[preserve\]\] concepts cover the excluded concepts entirely"):
            ConceptSubspace.from_text_encoder(p, sd.tokenizer, sd.text_encoder)
    assert preset.preserve[0].prompts == preset.concepts[0].prompts


def test_partial_preserve_still_builds(sd):
    """Control: a preserve list that covers only part of the concept leaves a basis (the check is not blanket)."""
    text = BASE.replace("{templates}", '["{}", "a photo of {}"]') + '''
[[preserve]]
name = "logos"
prompts = ["logo", "sign"]
'''
    sub = ConceptSubspace.from_text_encoder(parse_preset(text, "partial.toml"), sd.tokenizer, sd.text_encoder)
    assert sub.rank() >= 1


# --- the same through the command line: exit 2, one line, nothing written -------------------------------
@pytest.fixture(scope="module")
def pipeline_and_data(tmp_path_factory):

    from helpers.models import build_pipeline

    root = tmp_path_factory.mktemp("model-errors")
    data = write_captioned_images(root / "data", ["a photo of a cat", "the zorblax logo"])
    return build_pipeline(root, "sd"), data


@pytest.mark.parametrize("case, message", [
    ("truncated", "every prompt was truncated away"),
    ("covered", "cover the excluded concepts entirely"),
    ("no-targets", "no trainable target"),
])
def test_train_refuses_before_training(pipeline_and_data, tmp_path, capsys, case, message):
    base, data = pipeline_and_data
    preset = tmp_path / f"{case}.toml"
    preset.write_text({"truncated": TRUNCATED, "covered": COVERED}.get(case, make_preset().toml_text))
    out = tmp_path / "out"
    argv = ["train", "--base", str(base), "--data", str(data), "--preset", str(preset), "--output", str(out),
            "--resolution", "32", "--max_steps", "2", "--rank", "2", "--sample_steps", "0"]
    if case == "no-targets":  # LoRA only on self-attention: no layer reads the text embeddings
        argv += ["--lora_targets", r".*attn1\.(to_k|to_v)$", "--targets", "kv"]
    assert main(argv) == 2
    lines = message_lines(capsys.readouterr().err)
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("concept-exclusion train: error: "), lines
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) if out.exists() else []
    assert [w for w in written if w != "train.log"] == [], f"written before the error: {written}"
