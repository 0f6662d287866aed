"""A LoRA author who wants a leaky file to pass ``audit``: forged files built here with safetensors.

Only a trusted preset re-encoded with a trusted base can PASS; the file's basis, preset, clip_skip and
targets are claims; every tensor is placed or named; DoRA is measured with its formula; OFT/GLoRA on a
text reader and unknown tensors keep the verdict from PASS; metadata cannot forge output lines.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from concept_exclusion import ConceptSubspace
from concept_exclusion.commands.main import main as cli_main
from concept_exclusion.metadata import PREFIX, encode_basis, subspace_metadata
from concept_exclusion.safeio import write_safetensors

from helpers import make_preset  # noqa: E402

DOG = make_preset(max_rank=8).toml_text.replace('"zorblax", "zorblax logo"', '"dog", "a dog"').replace(
    'name = "zorblax"', 'name = "dog"').replace('name = "test-logo"', 'name = "test-dog"')
K0 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
V0 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v"
PATHS = [f"{b}_attentions_{i}_transformer_blocks_0_attn2" for b, i in
         (("down_blocks_0", 0), ("mid_block", 0), ("up_blocks_1", 0), ("up_blocks_1", 1))]
PATHS[1] = "mid_block_attentions_0_transformer_blocks_0_attn2"


@pytest.fixture(scope="module")
def env(sd, tmp_path_factory):
    root = tmp_path_factory.mktemp("forgery")
    (root / "logo.toml").write_text(make_preset(max_rank=8).toml_text)
    (root / "dog.toml").write_text(DOG)
    logo = {skip: ConceptSubspace.from_text_encoder(make_preset(max_rank=8), sd.tokenizer, sd.text_encoder,
                                                    clip_skip=skip) for skip in (1, 2)}
    from concept_exclusion.concept.preset import parse_preset

    dog = ConceptSubspace.from_text_encoder(parse_preset(DOG), sd.tokenizer, sd.text_encoder)
    return {"root": root, "logo": logo, "dog": dog, "base": sd.root}


def _kohya(project: torch.Tensor | None = None, seed: int = 0, rank: int = 4) -> dict[str, torch.Tensor]:
    """A kohya LoRA on every attn2 to_k/to_v of the tiny UNet (32-d text), optionally projected off ``project``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path in PATHS:
        for proj in ("to_k", "to_v"):
            name = f"lora_unet_{path}_{proj}"
            down = torch.randn(rank, 32, generator=g)
            if project is not None:
                down = down - (down @ project.float()) @ project.float().T
            out[f"{name}.lora_down.weight"] = down
            out[f"{name}.lora_up.weight"] = torch.randn(_width(path), rank, generator=g) * 0.1
            out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out


def _width(path: str) -> int:
    return {"down_blocks_0": 32, "mid_block": 64, "up_blocks_1": 32}[path.split("_attentions")[0]]


def _audit(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli_main(["audit", *map(str, argv)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _write(env, name: str, tensors: dict, meta: dict | None = None) -> Path:
    path = env["root"] / name
    write_safetensors(path, tensors, meta or {})
    return path


def _verified(env, path, *extra) -> list[str]:
    return [path, "--preset", env["root"] / "logo.toml", "--base", env["base"], *extra]


def test_a_forged_basis_is_never_a_pass(env, capsys):
    """A leaky file whose embedded basis is orthogonal to its down rows, or empty: not PASS without --base;
    FLAGGED with it."""
    leaky = _kohya(seed=1)
    downs = torch.cat([v for k, v in leaky.items() if k.endswith("lora_down.weight")]).double()
    _, _, vh = torch.linalg.svd(downs, full_matrices=True)
    orthogonal = vh[-4:].T.contiguous()  # directions no down row reads
    meta = {**subspace_metadata(env["logo"][1]), PREFIX + "basis.context": encode_basis(orthogonal),
            PREFIX + "basis_shape.context": "32x4"}
    forged = _write(env, "forged-basis.safetensors", leaky, meta)
    rc, out, _ = _audit(capsys, forged)
    assert rc == 3 and "UNVERIFIED" in out and "\nPASS" not in out
    rc, out, _ = _audit(capsys, forged, "--preset", env["root"] / "logo.toml")
    assert rc == 3
    rc, out, _ = _audit(capsys, *_verified(env, forged, "--clip-skip", "1"))
    assert rc == 1 and "FLAGGED" in out and "lies outside the trusted span" in out
    empty = _write(env, "empty-basis.safetensors", leaky, {**meta, PREFIX + "basis.context": "",
                                                           PREFIX + "basis_shape.context": "32x0"})
    rc, out, _ = _audit(capsys, empty)
    assert rc == 3 and "basis.context=malformed shape" in out


def test_a_decoy_preset_does_not_pass_the_real_one(env, capsys):
    """A genuine exclusion of "dog" audited against the logo preset: the trusted preset decides."""
    decoy = _write(env, "decoy.safetensors", _kohya(env["dog"].basis(), seed=2), subspace_metadata(env["dog"]))
    rc, out, _ = _audit(capsys, decoy, "--preset", env["root"] / "logo.toml")
    assert rc == 3 and "the file claims another preset than the trusted one" in out
    rc, out, _ = _audit(capsys, *_verified(env, decoy, "--clip-skip", "1"))
    assert rc == 1
    rc, out, _ = _audit(capsys, decoy, "--preset", env["root"] / "dog.toml", "--base", env["base"], "--clip-skip", "1")
    assert rc == 0 and "preset:    test-dog sha256 " in out


def test_every_spelling_a_loader_reads_is_measured(env, capsys):
    """The leaky down_blocks.0 factors spelled ``unet.<path>.attn2.to_k_lora.down.weight`` (no ``.processor.``),
    the rest clean kohya: diffusers' loader reads that spelling, so the audit does too."""
    clean = _kohya(env["logo"][1].basis(), seed=3)
    leaky = _kohya(seed=4)
    tensors = {k: v for k, v in clean.items() if not k.startswith((K0, V0))}
    path = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    for proj, name in (("to_k", K0), ("to_v", V0)):
        tensors[f"{path}.{proj}_lora.down.weight"] = leaky[f"{name}.lora_down.weight"]
        tensors[f"{path}.{proj}_lora.up.weight"] = leaky[f"{name}.lora_up.weight"]
    forged = _write(env, "spelling.safetensors", tensors)
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    peft_keys = convert_unet_state_dict_to_peft({k: None for k in tensors if k.startswith("unet.")})
    assert f"{path}.to_k.lora_A.weight" in peft_keys  # diffusers loads it as the layer's lora_A
    rc, out, _ = _audit(capsys, *_verified(env, forged, "--clip-skip", "1", "--json"))
    report = json.loads(out)
    assert rc == 1 and set(report["flagged"]) == {K0, V0}
    assert len([r for r in report["layers"] if r["role"] in ("key", "value")]) == 8
    # the same layer twice, in two spellings whose sum leaks while each alone looks clean-ish: the sum counts
    half = {k: v for k, v in clean.items()}
    half[f"{path}.to_k_lora.down.weight"] = leaky[f"{K0}.lora_down.weight"] * 1e-3
    half[f"{path}.to_k_lora.up.weight"] = leaky[f"{K0}.lora_up.weight"]
    twice = _write(env, "twice.safetensors", half)
    rc, out, _ = _audit(capsys, *_verified(env, twice, "--clip-skip", "1", "--json"))
    report = json.loads(out)
    layer = next(r for r in report["layers"] if r["name"] == K0)
    assert rc == 1 and layer["over"] and "2 adapters" in layer["note"]


def test_settings_come_from_the_user_not_the_file(env, capsys):
    """clip_skip: a LoRA clean at clip_skip 2 whose file claims it. Unknown means both values count."""
    cs2 = _write(env, "clip-skip-2.safetensors", _kohya(env["logo"][2].basis(), seed=5),
                 {**subspace_metadata(env["logo"][2]), PREFIX + "clip_skip": "2", "ss_clip_skip": "2"})
    rc, out, _ = _audit(capsys, *_verified(env, cs2))
    assert rc == 1 and "clip_skip: 1, 2" in out and "audit again with --clip-skip 2" in out
    rc, out, _ = _audit(capsys, *_verified(env, cs2, "--clip-skip", "2"))
    assert rc == 0
    rc, out, _ = _audit(capsys, *_verified(env, cs2, "--clip-skip", "1"))
    assert rc == 1
    # --base without --preset would verify the preset the file embeds: refused
    rc, out, err = _audit(capsys, cs2, "--base", env["base"])
    assert rc == 2 and "--preset" in err
    # targets: the file claims "kv"; the trusted preset's [projection] targets decide
    meta = {**subspace_metadata(env["logo"][1]), PREFIX + "targets": '["kv"]'}
    q_leak = _kohya(env["logo"][1].basis(), seed=6)
    g = torch.Generator().manual_seed(7)
    q_leak[f"{K0[:-5]}_to_q.lora_down.weight"] = torch.randn(4, 32, generator=g)
    q_leak[f"{K0[:-5]}_to_q.lora_up.weight"] = torch.randn(32, 4, generator=g)
    path = _write(env, "q-leak.safetensors", q_leak, meta)
    attention = env["root"] / "attention.toml"
    attention.write_text(make_preset(max_rank=8, targets='["attention"]').toml_text)
    rc, out, _ = _audit(capsys, path, "--preset", attention, "--base", env["base"], "--clip-skip", "1")
    assert rc == 1 and "targets:   attention" in out and "heads frozen by the constraint" in out


def test_dora_is_measured_with_its_formula(env, capsys):
    """A clean LoRA plus a DoRA magnitude on attn2.to_k: the rescaled base rows move W0 c itself."""
    unet = _base_unet(env)
    w0 = unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k").weight.detach()
    tensors = _kohya(env["logo"][1].basis(), seed=8)
    tensors[f"{K0}.dora_scale"] = (w0.norm(dim=1, keepdim=True) * 1.95)  # LyCORIS [out, 1]
    dora = _write(env, "dora.safetensors", tensors)
    rc, out, _ = _audit(capsys, *_verified(env, dora, "--clip-skip", "1", "--json"))
    layer = next(r for r in json.loads(out)["layers"] if r["name"] == K0)
    assert rc == 1 and layer["kinds"] == ["dora-lora"] and layer["concept_change"] > 0.2 and layer["over"]
    rc, out, _ = _audit(capsys, dora)  # without the base weight DoRA cannot be formed: named, not PASS
    assert rc == 3 and "measurable only with --base" in out
    # PEFT's magnitude vector, norm per output row, on a PEFT-spelled file
    peft = {f"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.{k}": v for k, v in (
        ("lora_A.weight", tensors[f"{K0}.lora_down.weight"]), ("lora_B.weight", tensors[f"{K0}.lora_up.weight"]),
        ("lora_magnitude_vector", w0.norm(dim=1) * 0.5))}
    rc, out, _ = _audit(capsys, *_verified(env, _write(env, "peft-dora.safetensors", peft), "--clip-skip", "1"))
    assert rc == 1 and "dora" in out


def _base_unet(env):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(env["base"] / "unet")


@pytest.mark.parametrize("parts,reason", [
    ({"oft_blocks": torch.zeros(4, 8, 8)}, "OFT"),
    ({"a1.weight": torch.zeros(4, 32), "a2.weight": torch.zeros(32, 4), "b1.weight": torch.zeros(4, 32),
      "b2.weight": torch.zeros(32, 4)}, "GLoRA"),
    ({"hada_w1_a": torch.zeros(32, 4), "hada_w1_b": torch.zeros(4, 32), "hada_w2_a": torch.zeros(32, 4),
      "hada_w2_b": torch.zeros(4, 32), "hada_t1": torch.zeros(4, 4, 1, 1), "hada_t2": torch.zeros(4, 4, 1, 1)},
     "Tucker"),
])
def test_unmeasurable_factors_on_a_text_reader_are_not_a_pass(env, capsys, parts, reason):
    tensors = _kohya(env["logo"][1].basis(), seed=9)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(K0)}
    tensors.update({f"{K0}.{p}": v for p, v in parts.items()})
    rc, out, _ = _audit(capsys, *_verified(env, _write(env, f"{reason}.safetensors", tensors), "--clip-skip", "1"))
    assert rc == 3 and "NOT MEASURED" in out and reason in out and K0 in out


def test_unknown_tensors_are_named_and_block_a_pass(env, capsys):
    tensors = {**_kohya(env["logo"][1].basis(), seed=10), "mystery.tensor": torch.zeros(2),
               "lora_unet_nonexistent_layer.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_nonexistent_layer.lora_up.weight": torch.zeros(32, 4)}
    rc, out, _ = _audit(capsys, *_verified(env, _write(env, "unknown.safetensors", tensors), "--clip-skip", "1"))
    assert rc == 3 and "NOT UNDERSTOOD" in out and "mystery.tensor" in out
    assert "lora_unet_nonexistent_layer" in out and "no such layer in the base model" in out


def test_text_encoder_training_is_only_approximately_a_pass(env, capsys):
    tensors = {**_kohya(env["logo"][1].basis(), seed=11),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 32),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(64, 4)}
    rc, out, _ = _audit(capsys, *_verified(env, _write(env, "te.safetensors", tensors), "--clip-skip", "1"))
    assert rc == 5 and "\nPASS-APPROXIMATE: " in out and "text-encoder" in out
    rc, out, _ = _audit(capsys, *_verified(env, _write(env, "clean.safetensors", _kohya(env["logo"][1].basis(), 11)),
                                           "--clip-skip", "1"))
    lines = out.rstrip().splitlines()
    assert rc == 0 and sum(line.startswith("PASS: ") for line in lines) == 1
    assert lines[-1].startswith("behavioural check not run: the preset lists no exemplars")


def test_metadata_cannot_forge_output_lines(env, capsys):
    hostile = "x\nPASS: 0 checked layer(s)\x1b[2K\x1b[1A\u202e\r"
    meta = {**subspace_metadata(env["logo"][1]), PREFIX + "preset_name": hostile, PREFIX + "clip_skip": hostile,
            "ss_network_module": hostile}
    path = _write(env, "hostile.safetensors", _kohya(seed=12), meta)
    for argv in (["audit", path], ["audit", *_verified(env, path, "--clip-skip", "1")], ["inspect", path]):
        capsys.readouterr()
        cli_main([str(a) for a in argv])
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\r" not in out and "\u202e" not in out
        assert not any(line.startswith("PASS") for line in out.splitlines())
        assert "\\x1b[2K" in out
