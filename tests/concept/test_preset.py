"""Preset validation: one test per error class, canonical hashing, shipped presets."""

from __future__ import annotations

import pytest

from concept_exclusion import PresetError, load_preset, parse_preset, shipped_presets

VALID = """
[preset]
name = "acme"
version = "2"
description = "the acme logo"

[[concepts]]
name = "acme"
prompts = ["acme", "acme logo"]
templates = ["a photo of {}", "{}"]
neutral = "brand"

[[preserve]]
name = "logos"
prompts = ["a logo"]

[projection]
energy = 0.95
max_rank = 16
tokens = "contrastive"
targets = ["kv"]
mode = "gradient"
strength = 0.5
"""


def test_valid_preset_fields():
    p = parse_preset(VALID, "acme.toml")
    assert p.name == "acme" and p.version == "2"
    assert p.concepts[0].prompts == ("acme", "acme logo")
    assert p.concepts[0].neutral == "brand"
    assert p.preserve[0].name == "logos"
    assert p.projection.energy == 0.95 and p.projection.max_rank == 16
    assert p.projection.tokens == "contrastive" and p.projection.targets == ("kv",)
    assert p.projection.mode == "gradient" and p.projection.strength == 0.5
    assert p.toml_text == VALID


def test_sha256_is_stable_across_key_order_and_whitespace():
    reordered = """
[projection]
mode="gradient"
strength=0.5
targets=["kv"]
tokens="contrastive"
max_rank=16
energy=0.95
[preset]
description="the acme logo"
version="2"
name="acme"
[[concepts]]
neutral="brand"
templates=["a photo of {}","{}"]
prompts=["acme","acme logo"]
name="acme"
[[preserve]]
prompts=["a logo"]
name="logos"
"""
    assert parse_preset(VALID).sha256 == parse_preset(reordered).sha256
    changed = VALID.replace('"acme logo"', '"acme sign"')
    assert parse_preset(changed).sha256 != parse_preset(VALID).sha256


def test_defaults_written_out_hash_like_omitted():
    minimal = '[preset]\nname="m"\nversion="1"\ndescription=""\n[[concepts]]\nname="c"\nprompts=["x"]\n'
    explicit = minimal + '[projection]\nenergy=0.99\n'
    assert parse_preset(minimal).sha256 == parse_preset(explicit).sha256


@pytest.mark.parametrize("mutation, key", [
    (lambda t: t.replace('version = "2"', 'version = "2"\ncolour = "red"'), "preset.colour"),           # unknown key
    (lambda t: t.replace('energy = 0.95', 'energy = "high"'), "projection.energy"),                       # wrong type
    (lambda t: t.replace('prompts = ["acme", "acme logo"]', 'prompts = []'), "concepts[0].prompts"),      # empty list
    (lambda t: t.replace('"a photo of {}"', '"a photo of"'), "concepts[0].templates[0]"),                 # no {}
    (lambda t: t.replace('energy = 0.95', 'energy = 1.5'), "projection.energy"),                          # out of range
    (lambda t: t.replace('max_rank = 16', 'max_rank = 0'), "projection.max_rank"),                        # out of range
    (lambda t: t.replace('tokens = "contrastive"', 'tokens = "everything"'), "projection.tokens"),        # bad choice
    (lambda t: t.replace('mode = "gradient"', 'mode = "exact"'), "projection.strength"),                  # strength w/ exact
    (lambda t: t.replace('name = "acme"\nversion', 'version'), "preset.name"),                            # missing
    (lambda t: t.replace('targets = ["kv"]', 'targets = ["everything"]'), "projection.targets[0]"),       # bad target
    (lambda t: t.replace('max_rank = 16', 'max_rank = true'), "projection.max_rank"),                     # bool for int
    (lambda t: t.replace('neutral = "brand"', 'neutral = 3'), "concepts[0].neutral"),                     # wrong type
    (lambda t: t + "\n[[concepts]]\nname = \"acme\"\nprompts = [\"x\"]\n", "concepts[1].name"),          # duplicate
])
def test_each_error_names_file_and_key(mutation, key):
    with pytest.raises(PresetError) as err:
        parse_preset(mutation(VALID), "bad.toml")
    assert str(err.value).startswith(f"bad.toml: {key}:"), str(err.value)
    assert "\n" not in str(err.value)


def test_invalid_toml_and_non_utf8(tmp_path):
    with pytest.raises(PresetError, match="invalid TOML"):
        parse_preset("[preset\nname=", "broken.toml")
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"[preset]\nname = \"\xe9\"\n")
    with pytest.raises(PresetError, match="latin1.toml: not UTF-8"):
        load_preset(path)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(PresetError, match="cannot read preset file"):
        load_preset(tmp_path / "absent.toml")
    with pytest.raises(PresetError, match="no shipped preset"):
        load_preset("no-such-preset")


def test_shipped_presets_load_by_name_and_path():
    names = shipped_presets()
    assert "example-logo" in names
    for name in names:
        p = load_preset(name)
        assert p.name == name
        assert p.sha256 == parse_preset(p.toml_text).sha256


def _with_prompts(n: int, templates: int = 1, preserve: int = 0) -> str:
    prompts = ", ".join(f'"p{i}"' for i in range(n))
    tpl = ", ".join(f'"{{}} {i}"' for i in range(templates))
    text = (f'[preset]\nname = "big"\nversion = "1"\ndescription = "d"\n\n[[concepts]]\nname = "c"\n'
            f"prompts = [{prompts}]\ntemplates = [{tpl}]\n")
    if preserve:
        text += f'\n[[preserve]]\nname = "keep"\nprompts = [{", ".join(f"{chr(34)}k{i}{chr(34)}" for i in range(preserve))}]\n'
    return text


def test_size_is_capped_with_a_clear_error(tmp_path):
    """prompts x templates (concepts and preserve together) at most MAX_TEXTS; the file at most MAX_PRESET_BYTES."""
    from concept_exclusion.concept.preset import MAX_PRESET_BYTES, MAX_TEXTS

    assert len(parse_preset(_with_prompts(MAX_TEXTS)).concepts[0].prompts) == MAX_TEXTS
    with pytest.raises(PresetError, match=rf"{MAX_TEXTS + 2} prompt x template combinations"):
        parse_preset(_with_prompts(MAX_TEXTS // 2 + 1, templates=2))
    with pytest.raises(PresetError, match="combinations"):  # preserve prompts count too (5 default templates)
        parse_preset(_with_prompts(MAX_TEXTS - 1, preserve=1))
    big = tmp_path / "big.toml"
    big.write_text(_with_prompts(1) + "#" * MAX_PRESET_BYTES)
    with pytest.raises(PresetError, match="larger than"):
        load_preset(big)


@pytest.mark.parametrize("text,needle", [("a = " + "[" * 100_000 + "]" * 100_000, "nested too deeply"),
                                         ("a = " + "9" * 5000, "invalid TOML"),
                                         ("a = {" * 50_000 + "}" * 50_000, "invalid TOML")])
def test_nesting_and_huge_integers_are_preset_errors(text, needle):
    with pytest.raises(PresetError, match=needle):
        parse_preset(text)
