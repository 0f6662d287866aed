"""TemplateLocator: a concept is found from its exemplar wherever it stands and whatever the caption says; flat or
unrelated content is not; the FFT correlation equals the direct one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from concept_exclusion import PresetError, load_preset
from concept_exclusion.regions import TemplateLocator


def _logo(size: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(3, size, size, generator=g) > 0.5).float() * 2 - 1


def _scene(logo: torch.Tensor, top: int, left: int, size: int = 40, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.full((3, size, size), -0.2) + 0.02 * torch.randn(3, size, size, generator=g)
    x[:, top:top + logo.shape[1], left:left + logo.shape[2]] = logo
    return x


@pytest.mark.parametrize("top,left", [(0, 0), (5, 17), (32, 32), (13, 3)])
def test_the_exemplar_is_found_wherever_it_stands(top, left):
    logo = _logo()
    mask = TemplateLocator([logo], dilate=0).masks(_scene(logo, top, left)[None])[0, 0]
    expected = torch.zeros(40, 40)
    expected[top:top + 8, left:left + 8] = 1
    assert torch.equal(mask, expected)


def test_dilation_grows_the_region_and_scales_find_a_smaller_copy():
    logo = _logo()
    grown = TemplateLocator([logo], dilate=2).masks(_scene(logo, 10, 10)[None])[0, 0]
    assert grown.sum() == 12 * 12 and grown[8:20, 8:20].all()
    big = logo.repeat_interleave(3, 1).repeat_interleave(3, 2)  # the exemplar file at 3x the size it appears at
    assert TemplateLocator([big], dilate=0).masks(_scene(logo, 4, 9)[None]).sum() == 0
    found = TemplateLocator([big], scales=(1 / 3,), dilate=0).masks(_scene(logo, 4, 9)[None])[0, 0]
    assert found.sum() == 64 and found[4:12, 9:17].all()


def test_images_without_the_concept_get_empty_masks():
    logo = _logo()
    other = -_logo()  # the inverted pattern: correlation -1
    g = torch.Generator().manual_seed(3)
    textures = torch.rand(20, 3, 40, 40, generator=g) * 2 - 1
    plain = torch.full((4, 3, 40, 40), 0.3)
    loc = TemplateLocator([logo])
    assert loc.masks(_scene(other, 5, 5)[None]).sum() == 0
    assert loc.masks(textures).sum() == 0 and loc.masks(plain).sum() == 0


def test_fft_correlation_equals_the_direct_one():
    logo = _logo(6)
    x = torch.rand(3, 3, 25, 31, generator=torch.Generator().manual_seed(4)) * 2 - 1
    loc = TemplateLocator([logo], min_contrast=0.0)
    t = loc.templates[0]
    windows = F.unfold(x, t.shape[1:])  # [n, 3*h*w, positions]
    centred = windows.view(3, 3, -1, windows.shape[-1])
    centred = (centred - centred.mean(dim=2, keepdim=True)).reshape(3, -1, windows.shape[-1])
    direct = (t.reshape(1, -1, 1) * centred).sum(1) / centred.norm(dim=1)
    assert torch.allclose(loc.correlation(x, t).flatten(1), direct, atol=1e-5)


def test_flat_or_malformed_exemplars_are_refused():
    with pytest.raises(PresetError, match="flat"):
        TemplateLocator([torch.zeros(3, 8, 8)])
    with pytest.raises(PresetError, match="RGB image"):
        TemplateLocator([torch.zeros(8, 8)])
    with pytest.raises(PresetError, match="no exemplar"):
        TemplateLocator([])
    with pytest.raises(ValueError, match=r"\[n, 3, H, W\]"):
        TemplateLocator([_logo()]).masks(torch.zeros(3, 40, 40))


def test_the_world_preset_locates_every_panda_from_its_pinned_exemplar():
    from concept_exclusion_world.scenes import PROTECTED, World, images, true_masks

    scenes = World(0).scenes(600)
    found = TemplateLocator.from_preset(load_preset("world-panda")).masks(images(scenes))
    truth = true_masks(scenes)
    assert torch.equal(found * truth, truth)  # every panda pixel, captioned or not, corner or middle
    spill = (found * (1 - truth)).sum(dim=(1, 2, 3))
    assert all(spill[i] == 0 for i, s in enumerate(scenes) if s.emblem != PROTECTED)  # nothing found elsewhere
