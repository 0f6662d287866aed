"""Exemplars in a preset: pinned by sha256, read as images only and only when asked; a bad entry is refused with
the file, the key and what was wrong; presets without exemplars keep their hash."""

from __future__ import annotations

import hashlib

import pytest
import torch

from concept_exclusion import PresetError, load_preset, parse_preset
from concept_exclusion.regions.exemplars import exemplar_images

HEAD = '[preset]\nname = "p"\nversion = "1"\ndescription = "d"\n[[concepts]]\nname = "c"\nprompts = ["c"]\n'


def _png(path, colour=(255, 0, 0)):
    from PIL import Image

    img = Image.new("RGB", (6, 4), colour)
    img.putpixel((1, 1), (0, 0, 0))
    img.save(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _preset(tmp_path, entry: str, extra: str = "") -> object:
    path = tmp_path / "p.toml"
    path.write_text(HEAD + f"[exemplars]\nfiles = [{entry}]\n{extra}", encoding="utf-8")
    return load_preset(path)


def test_exemplars_are_read_beside_the_preset_and_checked(tmp_path):
    (tmp_path / "img").mkdir()
    digest = _png(tmp_path / "img" / "logo.png")
    preset = _preset(tmp_path, f'{{ path = "img/logo.png", sha256 = "{digest}" }}', "scales = [0.5, 1]\ndilate = 0\n")
    assert preset.exemplars.scales == (0.5, 1.0) and preset.exemplars.dilate == 0
    (image,) = exemplar_images(preset)
    assert image.shape == (3, 4, 6) and torch.allclose(image[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    assert image[:, 1, 1].eq(-1).all()
    _png(tmp_path / "img" / "logo.png", (0, 255, 0))  # the file changed after the preset pinned it
    with pytest.raises(PresetError, match=r"exemplars.files\[0\] \(img/logo.png\): sha256 is .* the preset pins"):
        exemplar_images(preset)


def test_missing_unreadable_and_string_presets(tmp_path):
    digest = hashlib.sha256(b"not an image").hexdigest()
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(PresetError, match="not a readable PNG/JPEG/WEBP/BMP image"):
        exemplar_images(_preset(tmp_path, f'{{ path = "x.png", sha256 = "{digest}" }}'))
    with pytest.raises(PresetError, match="no such file"):
        exemplar_images(_preset(tmp_path, f'{{ path = "gone.png", sha256 = "{digest}" }}'))
    text = HEAD + f'[exemplars]\nfiles = [{{ path = "x.png", sha256 = "{digest}" }}]\n'
    with pytest.raises(PresetError, match="parsed from a string has no folder"):
        exemplar_images(parse_preset(text))
    with pytest.raises(PresetError, match="lists no exemplars"):
        exemplar_images(parse_preset(HEAD))


@pytest.mark.parametrize("entry,extra,problem", [
    ('{ path = "../up.png", sha256 = "%s" }', "", r"exemplars.files\[0\].path: must be a relative"),
    ('{ path = "/etc/x.png", sha256 = "%s" }', "", r"exemplars.files\[0\].path: must be a relative"),
    ('{ path = "a.png", sha256 = "ABC" }', "", r"exemplars.files\[0\].sha256: must be 64 lowercase hex"),
    ('{ path = "a.png" }', "", r"exemplars.files\[0\].sha256: is required"),
    ('{ path = "a.png", sha256 = "%s", url = "x" }', "", r"exemplars.files\[0\].url: unknown key"),
    ('{ path = "a.png", sha256 = "%s" }', "region = \"blur\"\n", r"exemplars.region: must be one of ignore, base"),
    ('{ path = "a.png", sha256 = "%s" }', "threshold = 0\n", r"exemplars.threshold: must be in \(0, 1\]"),
    ('{ path = "a.png", sha256 = "%s" }', "scales = []\n", r"exemplars.scales: must be a non-empty array"),
])
def test_bad_entries_name_the_key(tmp_path, entry, extra, problem):
    entry = entry.replace("%s", "0" * 64)
    with pytest.raises(PresetError, match=problem):
        _preset(tmp_path, entry, extra)


def test_exemplars_enter_the_hash_only_when_listed(tmp_path):
    plain = parse_preset(HEAD)
    listed = _preset(tmp_path, '{ path = "a.png", sha256 = "%s" }' % ("0" * 64))
    assert plain.exemplars is None and plain.sha256 != listed.sha256
    other = _preset(tmp_path, '{ path = "a.png", sha256 = "%s" }' % ("1" * 64))
    assert other.sha256 != listed.sha256
