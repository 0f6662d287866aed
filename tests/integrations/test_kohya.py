"""The kohya sd-scripts network module, driven by the stand-in trainer in tests/kohya_driver.py
with LyCORIS (``lycoris.kohya``) as the real base network, on tiny SD1- and SDXL-shaped UNets."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from concept_exclusion.commands.main import main as cli_main
from concept_exclusion.errors import ConceptExclusionError, TargetError
from concept_exclusion.metadata import PREFIX, read_basis
from concept_exclusion.safeio import read_header, read_safetensors

from helpers import make_preset  # noqa: E402
from fakes.kohya_driver import StandInStrategies, parse_network_args, read_config_file, run_training  # noqa: E402

OURS = "concept_exclusion.integrations.kohya"
KOHYA_KEY = re.compile(r"^lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
EXPECTED_ORDER = ["create_network", "prepare_network", "apply_to", "prepare_optimizer_params", "prepare_grad_etc",
                  "on_epoch_start", "on_step_start"]


@pytest.fixture(scope="module")
def preset_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("presets") / "logo.toml"
    path.write_text(make_preset(targets='["attention"]', max_rank=8).toml_text, encoding="utf-8")
    return path


def _audit(capsys, *argv) -> tuple[int, dict]:
    capsys.readouterr()
    rc = cli_main(["audit", *map(str, argv), "--json"])
    captured = capsys.readouterr()
    assert captured.out, captured.err  # the audit printed its report (else: why not, on stderr)
    return rc, json.loads(captured.out)


def _subsequence(calls: list[str], expected: list[str]) -> bool:
    it = iter(calls)
    return all(any(c == e for c in it) for e in expected)


def test_sd1_exclusion_run_from_config_file_passes_audit(sd, preset_file, tmp_path, capsys):
    config = tmp_path / "config.toml"
    config.write_text(
        "[model_arguments]\npretrained_model_name_or_path = \"tiny\"\n"
        "[additional_network_arguments]\n"
        f"network_module = \"{OURS}\"\nnetwork_dim = 4\nnetwork_alpha = 2\n"
        f"network_args = [\"concept_preset={preset_file}\", \"base_network=lycoris.kohya\", \"algo=lora\", "
        f"\"preset=attn-mlp\", \"concept_tokenizer={sd.root}\", \"concept_project_context=true\"]\n",
        encoding="utf-8")
    args = read_config_file(config)
    out = tmp_path / "ours.safetensors"
    run = run_training(args["network_module"], unet=sd.unet(), text_encoders=[sd.text_encoder],
                       tokenizers=[sd.tokenizer], out_file=out, network_args=args["network_args"],
                       network_dim=args["network_dim"], network_alpha=args["network_alpha"], steps=3,
                       scale_weight_norms=0.02)
    assert _subsequence(run.calls, EXPECTED_ORDER), run.calls
    assert run.calls[-1] == "save_weights" and "apply_max_norm_regularization" in run.calls
    # exact re-projection ran once per optimizer step that changed the factors, plus none extra at save
    assert run.network.exclusion.steps == run.optimizer_steps == 3

    tensors, meta = read_safetensors(out)
    assert tensors and all(KOHYA_KEY.match(k) for k in tensors), sorted(tensors)[:5]
    for key, value in run.metadata.items():  # the host's ss_* / modelspec.* keys are untouched
        assert meta[key] == value
    from lycoris.utils import precalculate_safetensors_hashes
    base_sd = {k: v.detach().float() for k, v in run.network.base_network.state_dict().items()}
    assert meta["sshs_model_hash"] == precalculate_safetensors_hashes(base_sd)
    assert json.loads(meta["ss_network_args"])["concept_preset"] == str(preset_file)
    assert meta[PREFIX + "preset_name"] == "test-logo" and meta[PREFIX + "mode"] == "exact"
    assert json.loads(meta[PREFIX + "targets"]) == ["attention"]
    assert meta[PREFIX + "base_network"] == "lycoris.kohya"
    # the text states were projected in the UNet the network patches (its cross-attention k/v layers)
    assert meta[PREFIX + "project_context"] == "true"
    assert run.network.exclusion.context.readers and all(
        r.name.endswith(("attn2.to_k", "attn2.to_v")) for r in run.network.exclusion.context.readers)
    assert float(meta[PREFIX + "leakage_max"]) < 1e-5
    assert read_basis(meta, "context").shape == (32, run.network.subspace.rank())
    assert all(isinstance(v, str) for v in meta.values())

    # kohya's key format loads back into a fresh LyCORIS network
    import lycoris.kohya as lk
    unet = sd.unet()
    net, weights = lk.create_network_from_weights(1.0, str(out), None, sd.text_encoder, unet, weights_sd=tensors)
    net.apply_to(sd.text_encoder, unet, False, True)
    missing, unexpected = net.load_state_dict(weights, strict=False)
    assert not missing and not unexpected

    rc, report = _audit(capsys, out)  # without a trusted --base the verdict is UNVERIFIED (exit 3), never a pass
    assert rc == 3 and report["verdict"] == "UNVERIFIED"
    assert report["claims"]["basis.context"] == f"32x{run.network.subspace.rank()}"
    assert report["max_share"] < 1e-3  # the embedded basis is stored in float16
    rc, report = _audit(capsys, out, "--preset", preset_file, "--base", sd.root, "--clip-skip", "1")
    assert rc == 0 and report["verified"] and report["verdict"] == "PASS", (report["flagged"], report["notes"],
                                                                         report["max_share"])
    assert report["max_share"] < 1e-5
    roles = {r["role"] for r in report["layers"] if r["checked"]}
    assert roles == {"key", "value", "query", "out"}


def test_sd1_plain_lycoris_run_is_flagged(sd, preset_file, tmp_path, capsys):
    out = tmp_path / "plain.safetensors"
    run_training("lycoris.kohya", unet=sd.unet(), text_encoders=[sd.text_encoder], tokenizers=[sd.tokenizer],
                 out_file=out, network_args=["algo=lora", "preset=attn-mlp"], steps=3)
    assert not any(k.startswith(PREFIX) for k in read_header(out)[1])
    rc, report = _audit(capsys, out, "--preset", preset_file, "--base", sd.root)
    assert rc == 1 and report["flagged"]
    assert report["max_share"] > 0.1
    assert all(r["concept_change"] is not None for r in report["layers"] if r["role"] in ("key", "value"))

    # resuming from that plain LoRA with the exclusion: the loaded factors are projected at attach (the
    # concept components the plain run learned are removed there), leakage since attach stays at float
    # precision, and the recorded leakage is that of the file's whole delta
    resumed = tmp_path / "resumed.safetensors"
    run = run_training(OURS, unet=sd.unet(), text_encoders=[sd.text_encoder], tokenizers=[sd.tokenizer],
                       out_file=resumed, network_weights=out, steps=1,
                       network_args=[f"concept_preset={preset_file}", "base_network=lycoris.kohya", "algo=lora",
                                     "preset=attn-mlp", f"concept_tokenizer={sd.root}"])
    assert "load_weights" in run.calls
    assert run.network.exclusion.max_leakage() < 1e-5
    assert float(read_header(resumed)[1][PREFIX + "leakage_max"]) < 1e-5
    rc, report = _audit(capsys, resumed, "--preset", preset_file, "--base", sd.root, "--clip-skip", "1")
    assert rc == 0 and report["max_share"] < 1e-5


def test_sdxl_locon_exclusion_run_passes_and_plain_is_flagged(sdxl, preset_file, tmp_path, capsys):
    args = [f"concept_preset={preset_file}", "base_network=lycoris.kohya", "algo=locon", "preset=attn-mlp",
            f"concept_tokenizer={sdxl.root}"]
    out = tmp_path / "ours-xl.safetensors"
    run = run_training(OURS, unet=sdxl.unet(), text_encoders=sdxl.text_encoders, tokenizers=sdxl.tokenizers,
                       out_file=out, network_args=args, steps=2, save_dtype=torch.bfloat16)
    meta = read_header(out)[1]
    leakage = json.loads(meta[PREFIX + "leakage"])
    assert any("add_embedding_linear_1" in k for k in leakage)  # SDXL's pooled path is a target
    assert json.loads(meta[PREFIX + "ranks"]).keys() == {"context", "pooled"}
    assert run.network.subspace.clip_skip == 2
    rc, report = _audit(capsys, out, "--preset", preset_file, "--base", sdxl.root)
    assert rc == 0, report["flagged"]
    pooled = [r for r in report["layers"] if r["role"] == "pooled"]
    assert pooled and all(r["checked"] for r in pooled)
    assert report["max_share"] < 0.01  # bfloat16 storage of the factors; measured in the report below
    with capsys.disabled():
        print(f"\nSDXL LoCon saved in bfloat16: max share {report['max_share']:.2e}")

    plain = tmp_path / "plain-xl.safetensors"
    run_training("lycoris.kohya", unet=sdxl.unet(), text_encoders=sdxl.text_encoders, tokenizers=sdxl.tokenizers,
                 out_file=plain, network_args=["algo=locon", "preset=attn-mlp"], steps=2)
    rc, report = _audit(capsys, plain, "--preset", preset_file, "--base", sdxl.root)
    assert rc == 1 and any("add_embedding" in n for n in report["flagged"])


def test_strategy_objects_supply_tokenizer_and_clip_skip(sd, preset_file):
    from concept_exclusion.integrations import kohya

    with StandInStrategies([sd.tokenizer], clip_skip=2):
        net = kohya.create_network(1.0, 4, 1.0, None, sd.text_encoder, sd.unet(), dropout=None,
                                   concept_preset=str(preset_file), base_network="lycoris.kohya",
                                   preset="attn-mlp")
    assert net.subspace.clip_skip == 2
    net.prepare_network(argparse.Namespace(clip_skip=2, save_model_as="safetensors"))
    with pytest.raises(kohya.KohyaArgsError, match="clip_skip"):
        net.prepare_network(argparse.Namespace(clip_skip=1, save_model_as="safetensors"))
    with pytest.raises(kohya.KohyaArgsError, match="no tokenizer"):
        kohya.create_network(1.0, 4, 1.0, None, sd.text_encoder, sd.unet(), concept_preset=str(preset_file),
                             base_network="lycoris.kohya")


@pytest.mark.parametrize("kwargs, error, pattern", [
    ({}, "KohyaArgsError", "concept_preset=PATH is required"),
    ({"concept_preset": "P", "concept_colour": "red"}, "KohyaArgsError", "unknown concept-exclusion argument"),
    ({"concept_preset": "P", "concept_mode": "approx"}, "KohyaArgsError", "concept_mode"),
    ({"concept_preset": "P", "concept_targets": "kv,everything"}, "KohyaArgsError", "concept_targets"),
    ({"concept_preset": "P", "concept_clip_skip": "two"}, "KohyaArgsError", "integer"),
    ({"concept_preset": "P", "concept_project_context": "maybe"}, "KohyaArgsError", "expected true or false"),
    ({"concept_preset": "P", "concept_strength": "0.5"}, "KohyaArgsError", "gradient only"),
    ({"concept_preset": "P", "base_network": "networks.lora"}, "KohyaArgsError", "sd-scripts"),
    ({"concept_preset": "P", "base_network": OURS}, "KohyaArgsError", "not this module"),
    ({"concept_preset": "missing.toml"}, "PresetError", "missing.toml"),
])
def test_bad_network_args_fail_at_create_network_with_one_line(sd, preset_file, kwargs, error, pattern):
    from concept_exclusion.integrations import kohya

    kwargs = {k: (str(preset_file) if v == "P" else v) for k, v in kwargs.items()}
    kwargs.setdefault("base_network", "lycoris.kohya")
    kwargs.setdefault("concept_tokenizer", str(sd.root))
    with pytest.raises(ConceptExclusionError) as info:
        kohya.create_network(1.0, 4, 1.0, None, sd.text_encoder, sd.unet(), dropout=None, preset="attn-mlp",
                             **kwargs)
    assert type(info.value).__name__ == error
    assert re.search(pattern, str(info.value)) and "\n" not in str(info.value)


def test_text_encoder_mismatch_and_training_are_refused(sd, sdxl, preset_file):
    from concept_exclusion.integrations import kohya

    common = dict(concept_preset=str(preset_file), base_network="lycoris.kohya", preset="attn-mlp", dropout=None)
    with pytest.raises(ConceptExclusionError, match="text encoders given do not belong"):
        kohya.create_network(1.0, 4, 1.0, None, sd.text_encoder, sdxl.unet(), concept_tokenizer=str(sd.root),
                             **common)
    with pytest.raises(kohya.KohyaArgsError, match="2 text encoder"):
        kohya.create_network(1.0, 4, 1.0, None, sdxl.text_encoders, sdxl.unet(),
                             concept_tokenizer=str(sd.root / "tokenizer"), **common)
    from transformers import CLIPTextModel

    unet = sd.unet()
    text_encoder = CLIPTextModel.from_pretrained(sd.root / "text_encoder")  # apply_to patches it: not the fixture's
    net = kohya.create_network(1.0, 4, 1.0, None, text_encoder, unet, concept_tokenizer=str(sd.root), **common)
    with pytest.raises(TargetError, match="network_train_unet_only"):
        net.apply_to(text_encoder, unet, True, True)


def test_wrapper_delegates_and_refuses_pickles(sd, preset_file, tmp_path):
    from concept_exclusion.integrations import kohya

    unet = sd.unet()
    net = kohya.create_network(1.0, 4, 1.0, None, sd.text_encoder, unet, dropout=None,
                               concept_preset=str(preset_file), base_network="lycoris.kohya", preset="attn-mlp",
                               concept_tokenizer=str(sd.root))
    net.apply_to(sd.text_encoder, unet, False, True)
    base = net.base_network
    assert list(net.parameters()) == list(base.parameters())
    assert not any(p is q for p in net.parameters() for q in unet.parameters())
    assert hasattr(net, "apply_max_norm_regularization") == hasattr(base, "apply_max_norm_regularization")
    assert hasattr(net, "prepare_optimizer_params_with_multiple_te_lrs") == \
        hasattr(base, "prepare_optimizer_params_with_multiple_te_lrs")
    net.set_multiplier(0.5)
    assert all(m.multiplier == 0.5 for m in base.unet_loras)
    with pytest.raises(AttributeError):
        net.no_such_method  # noqa: B018
    with pytest.raises(kohya.KohyaArgsError, match="save_model_as"):
        net.prepare_network(argparse.Namespace(clip_skip=None, save_model_as="ckpt"))
    with pytest.raises(kohya.KohyaArgsError, match="safetensors"):
        net.save_weights(str(tmp_path / "x.ckpt"), None, {})
    with pytest.raises(kohya.KohyaArgsError, match="safetensors"):
        net.load_weights(str(tmp_path / "x.pt"))
    assert not list(tmp_path.iterdir())

    # save without a training loop: attaches, projects, writes; the file round-trips through
    # create_network_from_weights (wrapped for training, the bare base network for inference)
    out = tmp_path / "init.safetensors"
    net.save_weights(str(out), None, {"ss_network_dim": "4"})
    assert read_header(out)[1]["ss_network_dim"] == "4"
    assert [p.name for p in tmp_path.iterdir()] == ["init.safetensors"]  # no temporary file left
    wrapped, weights = kohya.create_network_from_weights(
        1.0, str(out), None, sd.text_encoder, sd.unet(), concept_preset=str(preset_file),
        base_network="lycoris.kohya", concept_tokenizer=str(sd.root))
    assert isinstance(wrapped, kohya.ConceptExclusionNetwork) and set(weights) == set(read_header(out)[0])
    bare, _ = kohya.create_network_from_weights(1.0, str(out), None, sd.text_encoder, sd.unet(),
                                                for_inference=True, base_network="lycoris.kohya")
    assert not isinstance(bare, kohya.ConceptExclusionNetwork)


def test_network_args_strings_round_trip():
    items = ["concept_preset=a=b.toml", "concept_targets=kv attention", "base_network=lycoris.kohya"]
    parsed = parse_network_args(items)
    from concept_exclusion.integrations.kohya import split_network_args

    settings, base, rest = split_network_args({**parsed, "algo": "lora", "dropout": None})
    assert settings["preset"] == "a=b.toml" and settings["targets"] == ("attention", "kv")
    assert base == "lycoris.kohya" and rest == {"algo": "lora", "dropout": None}


@pytest.mark.slow
def test_two_processes_gloo_keep_the_exclusion(sd, preset_file, tmp_path, capsys):
    """torchrun, 2 CPU processes (gloo): accelerate wraps the network in DDP, gradients are averaged
    across ranks after the projection hooks ran; both ranks end identical and on the constraint."""
    import os
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).parents[1] / "fakes" / "kohya_driver.py"), str(sd.root), str(preset_file), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["steps"] == ranks[1]["steps"] == ranks[0]["optimizer_steps"] == 2
    assert ranks[0]["param_sum"] == ranks[1]["param_sum"] and ranks[0]["param_abs_sum"] == ranks[1]["param_abs_sum"]
    assert max(r["max_leakage"] for r in ranks) < 1e-5
    rc, report = _audit(capsys, tmp_path / "lora.safetensors", "--preset", preset_file, "--base", sd.root,
                        "--clip-skip", "1")
    assert rc == 0 and report["max_share"] < 1e-5


def test_kohya_refuses_text_encoder_training_after_create_network():
    from concept_exclusion.errors import ConceptExclusionError
    from concept_exclusion.integrations.kohya import ConceptExclusionNetwork

    stand_in = SimpleNamespace(settings={})
    with pytest.raises(ConceptExclusionError, match="--network_train_unet_only"):
        ConceptExclusionNetwork.prepare_network(stand_in, SimpleNamespace(network_train_unet_only=False))
