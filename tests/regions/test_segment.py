"""SegmenterLocator: a CLIPSeg saved to a folder is loaded back as a user's download would be (safetensors only,
nothing fetched), prompted with the preset's names and exemplars; a pixel is marked exactly when the segmenter's
probability for some prompt reaches the threshold; masks have the images' size; a bad folder is one line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from concept_exclusion import PresetError
from concept_exclusion.commands.main import main
from concept_exclusion.regions import SegmenterLocator
from concept_exclusion.testing.tiny import clipseg_folder


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    return clipseg_folder("panda giant bear logo".split(), tmp_path_factory.mktemp("clipseg") / "seg")


def test_prompts_are_the_presets_names_and_exemplars(segmenter):
    loc = SegmenterLocator.from_pretrained(segmenter, "world-panda")
    assert loc.texts == ("panda", "giant panda", "panda bear") and loc.exemplars.shape == (1, 3, 32, 32)
    probs = loc.probabilities(torch.rand(2, 3, 40, 24) * 2 - 1)
    assert probs.shape == (2, 4, 32, 32) and 0 <= float(probs.min()) and float(probs.max()) <= 1


def test_a_pixel_is_marked_when_some_prompt_reaches_the_threshold(segmenter):
    images = torch.rand(3, 3, 48, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    loc = SegmenterLocator.from_pretrained(segmenter, "world-panda", dilate=0)
    best = F.interpolate(loc.probabilities(images).amax(1, keepdim=True), size=(48, 48), mode="bilinear",
                         align_corners=False)
    cut = float(best.median())
    loc.threshold = cut
    masks = loc.masks(images)
    assert masks.shape == (3, 1, 48, 48) and torch.equal(masks, (best >= cut).float())
    assert 0 < masks.mean() < 1
    loc.threshold = float(best.max()) + 1e-6
    assert loc.masks(images).sum() == 0


def test_names_alone_or_exemplars_alone_and_none_refused(segmenter):
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    model = CLIPSegForImageSegmentation.from_pretrained(str(segmenter))
    processor = CLIPSegProcessor.from_pretrained(str(segmenter))
    assert SegmenterLocator(model, processor, texts=["panda"]).probabilities(torch.zeros(1, 3, 32, 32)).shape[1] == 1
    logo = torch.rand(3, 8, 20) * 2 - 1  # not square: padded before the processor resizes it
    assert SegmenterLocator(model, processor, exemplars=[logo]).exemplars.shape == (1, 3, 32, 32)
    with pytest.raises(PresetError, match="names or exemplar images"):
        SegmenterLocator(model, processor)


def test_a_folder_without_a_safetensors_clipseg_is_refused(segmenter, tmp_path, capsys):
    with pytest.raises(PresetError, match="not a CLIPSeg folder with safetensors weights"):
        SegmenterLocator.from_pretrained(tmp_path, "world-panda")
    (tmp_path / "data").mkdir()
    from PIL import Image

    Image.new("RGB", (40, 40), (10, 200, 30)).save(tmp_path / "data" / "a.png")
    assert main(["masks", str(tmp_path / "data"), "--preset", "world-panda", "--out", str(tmp_path / "m"),
                 "--segmenter", str(tmp_path / "nowhere")]) == 2
    assert "not a CLIPSeg folder" in capsys.readouterr().err and not (tmp_path / "m").exists()
    assert main(["masks", str(tmp_path / "data"), "--preset", "world-panda", "--out", str(tmp_path / "m"),
                 "--segmenter", str(segmenter), "--segmenter-threshold", "0.5"]) == 0
    assert Image.open(tmp_path / "m" / "a.png").size == (40, 40)
