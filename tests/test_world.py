"""Invariants of the evidence world: rendering, captions, co-occurrence, detectors, determinism, the base model."""

from __future__ import annotations

import math

import pytest
import torch

from concept_exclusion.world.detect import allowed_scores, calibrate, fidelity, logo_scores, read_object
from concept_exclusion.world.scenes import (ALLOWED_BRAND, BRAND, NEW_COLOUR, UNSEEN_LOGO_SHAPE, Scene, World, images, render,
                                            vocabulary)
from concept_exclusion.world.stats import mean_ci
from concept_exclusion.world.train import finetune_scenes


def test_render_range_shape_and_logo_region():
    s = Scene("gray", "red", "circle", "right")
    x, xl = render(s), render(Scene("gray", "red", "circle", "right", logo=True))
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    diff = (x != xl).any(0)
    assert diff[1:5, 11:15].any() and not diff[:, :11].any() and not diff[5:].any()
    xa = render(Scene("gray", "red", "circle", "right", allowed=True))
    diff_a = (x != xa).any(0)
    assert diff_a[1:5, 11:15].any() and not diff_a[:, :11].any() and not diff_a[5:].any()
    assert not torch.equal(xa, xl)  # the allowed glyph is its own


def test_allowed_brand_captions_share_the_phrase_and_keep_it_when_scrubbing():
    named = Scene("gray", "red", "circle", "right", allowed=True)
    unnamed = Scene("gray", "red", "circle", "right", allowed=True, named=False)
    assert named.caption().endswith(f"with the {ALLOWED_BRAND} logo")
    assert unnamed.caption().endswith("background with the logo")
    assert named.caption(brand=False) == named.caption()  # scrubbing removes only the protected phrase
    assert BRAND not in named.caption() and set(named.caption().split()) <= set(vocabulary())


def test_captions_name_the_brand_only_with_the_logo_and_scrubbing_removes_it():
    s = Scene("navy", "purple", "square", "left", logo=True)
    assert s.caption().endswith(f"with the {BRAND} logo")
    assert BRAND not in s.caption(brand=False) and "logo" not in s.caption(brand=False)
    assert BRAND not in Scene("navy", "red", "square", "left").caption()
    words = set(vocabulary())
    assert set(s.caption().split()) <= words


def test_world_is_deterministic_by_seed():
    a, b, c = World(5).scenes(50), World(5).scenes(50), World(6).scenes(50)
    assert a == b and a != c
    assert torch.equal(images(a), images(b))
    assert calibrate(seed=3, n=100).threshold == calibrate(seed=3, n=100).threshold


def test_cooccurrence_statistics_of_the_finetune_data():
    scenes = finetune_scenes()
    logo = [s for s in scenes if s.logo]
    new = [s for s in scenes if s.colour == NEW_COLOUR]
    named = [s for s in scenes if s.allowed and s.named]
    unnamed = [s for s in scenes if s.allowed and not s.named]
    assert 0.2 < len(logo) / len(scenes) < 0.3
    assert 0.8 < len(named) / len(logo) < 1.25  # the allowed brand: a similar share, named the same way
    # "with the logo" without a readable name is as likely the allowed glyph as the protected one
    assert 0.8 < len(unnamed) / len(logo) < 1.25
    assert not any(s.logo and s.allowed for s in scenes)
    assert sum(s.logo for s in new) / len(new) > 0.8  # the new colour comes mostly with the protected logo
    assert sum(1 for s in new if not s.logo) >= 5  # ... but filtering does not remove every example
    assert not any(s.shape == UNSEEN_LOGO_SHAPE for s in logo)  # the held-out context for extraction
    public = World(1).scenes(500, "public")
    assert not any(s.logo or s.allowed or s.colour == NEW_COLOUR for s in public)


def test_logo_detectors_separate_each_glyph_from_clean_images_and_from_each_other():
    cal = calibrate(n=300)
    assert cal.precision >= 0.99 and cal.recall >= 0.99
    assert cal.allowed_precision >= 0.99 and cal.allowed_recall >= 0.99
    assert 0.1 < cal.threshold < 0.9 and 0.1 < cal.allowed_threshold < 0.9
    scenes = World(9).scenes(200)
    s, a = logo_scores(images(scenes)), allowed_scores(images(scenes))
    labels = torch.tensor([x.logo for x in scenes])
    allowed = torch.tensor([x.allowed for x in scenes])
    clean = ~labels & ~allowed
    assert bool((s[labels] > 0.9).all()) and bool((s[clean].abs() < 1e-5).all()) and bool((s[allowed] < -0.9).all())
    assert bool((a[allowed] > 0.9).all()) and bool((a[clean].abs() < 1e-5).all()) and bool((a[labels] < -0.9).all())
    noisy = images(scenes) + 0.3 * torch.randn(len(scenes), 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert float(((logo_scores(noisy) > cal.threshold) == labels).float().mean()) > 0.95
    assert float(((allowed_scores(noisy) > cal.allowed_threshold) == allowed).float().mean()) > 0.95


def test_content_detectors_read_rendered_scenes_exactly():
    scenes = World(2).scenes(200)
    f = fidelity(images(scenes), scenes)
    assert f == {"colour": 1.0, "shape": 1.0, "both": 1.0}
    wrong = Scene("gray", "red", "circle", "left")
    assert read_object(render(Scene("gray", "blue", "square", "left")), wrong) == ("blue", "square")
    assert read_object(render(Scene("gray", "red", "circle", "right")), wrong) == ("none", "none")


def test_mean_ci():
    m, h = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and math.isclose(h, 4.303 * 1.0 / math.sqrt(3), rel_tol=1e-3)
    assert math.isnan(mean_ci([1.0])[1])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    import os

    from concept_exclusion.world.model import load_base

    old = os.environ.get("CONCEPT_EXCLUSION_CACHE")
    os.environ["CONCEPT_EXCLUSION_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield load_base(progress=False)
    finally:
        if old is None:
            os.environ.pop("CONCEPT_EXCLUSION_CACHE")
        else:
            os.environ["CONCEPT_EXCLUSION_CACHE"] = old


def test_shipped_base_matches_this_encoder_and_never_saw_the_logo(base):
    from concept_exclusion.world.detect import calibrate
    from concept_exclusion.world.measure import heldout_loss, leak_rate, sample
    from concept_exclusion.world.model import SHIPPED, new_unet

    assert base.source == str(SHIPPED)
    scenes = World(4).scenes(32, "public")
    trained = heldout_loss(base.unet, base.text, scenes, seed=0)
    untrained = heldout_loss(new_unet(0).eval(), base.text, scenes, seed=0)
    assert trained < 0.1 * untrained
    branded = [s.caption().replace("background", "background with the zorblax logo") for s in scenes[:12]]
    x = sample(base.unet, base.text.encode(branded), base.text.encode([""]), seed=0, steps=10)
    assert leak_rate(x, calibrate(n=100)) == 0.0


def test_excluded_finetune_keeps_the_constraint_and_plain_does_not(base):
    from concept_exclusion.world.train import METHODS, TrainConfig, finetune

    cfg = TrainConfig(kind="lora", steps=4, batch=8)
    ex = finetune(base, METHODS["exact-attention"], cfg, seed=0, progress=False)
    assert ex.exclusion is not None and ex.exclusion.max_leakage() < 1e-4
    roles = {t.role for t in ex.exclusion.targets}
    assert roles == {"key", "value", "query", "out"}
    grad = finetune(base, METHODS["gradient-kv"], cfg, seed=0, progress=False)
    assert grad.exclusion.max_leakage() > 1e-3  # gradient-only under Adam drifts (FACTS.md)


def test_default_method_projects_the_context_in_training_only(base):
    """The world's default trains with projected text states and is measured as a user loads it."""
    from concept_exclusion.world.train import DEFAULT_METHOD, METHODS, TrainConfig, finetune

    ft = finetune(base, METHODS[DEFAULT_METHOD], TrainConfig(kind="lora", steps=4, batch=8), seed=0, progress=False)
    assert ft.exclusion.project_context  # it trained with projected text states (recorded in the metadata) ...
    assert not ft.exclusion._context.active  # ... and was detached after training: no hook is left on the UNet
    assert ft.exclusion.max_leakage() < 1e-4
    assert not any(m._forward_pre_hooks for m in ft.unet.modules())
    assert ft.exclusion.subspace.preset.name == "world-logo-contexts-preserve"


def test_basis_coverage_diagnostic_is_a_share(base):
    from concept_exclusion.world.coverage import coverage, coverage_table

    rows = coverage(base, token_options=("all",), n=20, extra_presets=())
    assert len(rows) == 1 and rows[0]["rank"] >= 1
    for key in ("brand_token", "from_brand_on", "phrase_adds", "name_adds", "brand_free_captions"):
        assert 0.0 <= rows[0][key] <= 1.0 + 1e-9
    assert rows[0]["brand_token"] > 0.5  # the preset's own token is mostly inside its basis
    assert "| world-logo | all |" in coverage_table(rows)


def test_scrub_name_control_turns_protected_captions_into_the_nameless_allowed_ones():
    """The control sees exactly what a perfect exclusion of the name would leave: "with the logo", a phrase
    that the allowed brand's unnamed images share."""
    from concept_exclusion.world.train import METHODS, _dataset

    scenes = finetune_scenes()[:300]
    _, captions = _dataset(METHODS["scrub-name"], scenes)
    protected = [c for s, c in zip(scenes, captions) if s.logo]
    nameless_allowed = {c.split(" background ")[1] for s, c in zip(scenes, captions) if s.allowed and not s.named}
    assert protected and all(c.endswith("background with the logo") for c in protected)
    assert nameless_allowed == {"with the logo"}
    assert not any(BRAND in c for c in captions) and any(ALLOWED_BRAND in c for c in captions)
