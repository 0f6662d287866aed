"""``concept-exclusion masks``: one mask per image in kohya's layout (same stem, white = learn, black = the
concept), found whatever the captions say; bad input is one line and exit 2 with nothing written."""

from __future__ import annotations

import numpy as np
from PIL import Image

from concept_exclusion.commands.main import main
from helpers import make_preset
from concept_exclusion_world.scenes import PROTECTED, World, render, true_masks


def _dataset(folder, n=24):
    folder.mkdir()
    scenes = World(2).scenes(n)
    scenes[0] = scenes[0].__class__(**{**scenes[0].__dict__, "emblem": PROTECTED, "named": False})
    for i, s in enumerate(scenes):
        pixels = ((render(s).permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        Image.fromarray(pixels).save(folder / f"img{i:03d}.{'png' if i % 2 else 'webp'}", lossless=True)
        (folder / f"img{i:03d}.txt").write_text(s.caption(), encoding="utf-8")
    return scenes


def test_masks_mark_the_concept_black_and_everything_else_white(tmp_path, capsys):
    scenes = _dataset(tmp_path / "data")
    assert main(["masks", str(tmp_path / "data"), "--preset", "world-panda", "--out", str(tmp_path / "m")]) == 0
    written = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert written == [f"img{i:03d}.png" for i in range(len(scenes))]
    truth = true_masks(scenes)
    for i, s in enumerate(scenes):
        learn = np.asarray(Image.open(tmp_path / "m" / f"img{i:03d}.png"))[..., 0]  # kohya reads the R channel
        concept = learn < 128
        assert set(np.unique(learn)) <= {0, 255}
        assert concept[truth[i, 0].numpy() > 0].all()  # every panda pixel, the uncaptioned one included
        assert concept.any() == (s.emblem == PROTECTED)
    pandas = sum(s.emblem == PROTECTED for s in scenes)
    assert f"found in {pandas} image(s)" in capsys.readouterr().out


def test_existing_output_is_not_mixed_and_bad_input_writes_nothing(tmp_path, capsys):
    _dataset(tmp_path / "data", 4)
    out = tmp_path / "m"
    out.mkdir()
    (out / "old.png").write_bytes(b"x")
    assert main(["masks", str(tmp_path / "data"), "--preset", "world-panda", "--out", str(out)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert main(["masks", str(tmp_path / "data"), "--preset", "world-panda", "--out", str(out), "--overwrite"]) == 0
    assert not (out / "old.png").exists() and len(list(out.iterdir())) == 4
    (tmp_path / "data" / "img003.jpg").write_bytes(b"not an image")
    fresh = tmp_path / "fresh"
    assert main(["masks", str(tmp_path / "data"), "--preset", "world-panda", "--out", str(fresh)]) == 2
    err = capsys.readouterr().err
    assert "share a name" in err and err.count("\n") == 1
    (tmp_path / "data" / "img003.png").rename(tmp_path / "data" / "other.png")
    assert main(["masks", str(tmp_path / "data"), "--preset", "world-panda", "--out", str(fresh)]) == 2
    err = capsys.readouterr().err
    assert "img003.jpg: not a readable PNG/JPEG/WEBP/BMP image" in err
    assert not fresh.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_preset_without_exemplars_is_refused(tmp_path, capsys):
    _dataset(tmp_path / "data", 2)
    (tmp_path / "p.toml").write_text(make_preset().toml_text, encoding="utf-8")
    assert main(["masks", str(tmp_path / "data"), "--preset", str(tmp_path / "p.toml"), "--out", str(tmp_path / "m")]) == 2
    assert "lists no exemplars" in capsys.readouterr().err and not (tmp_path / "m").exists()
