"""The audit's behavioural check on SD1- and SDXL-shaped pipelines saved as a user's model folder: the file put into
the base and taken out exactly, the report beside the weight check, exit codes, bad input. Whether it tells a file
that learned a concept from one that did not is tested in the evidence world (tests/world/test_audit_behaviour.py)
and measured over seeds in benchmarks/audit_agreement.py."""

from __future__ import annotations

import json

import pytest
import torch

from concept_exclusion.audit.base import load_base
from concept_exclusion.audit.behaviour.patch import applied
from concept_exclusion.commands.main import main as cli_main
from concept_exclusion.lora.file import read_lora
from concept_exclusion.safeio import write_safetensors

from helpers import make_preset, message_lines  # noqa: E402
from helpers.models import build_pipeline  # noqa: E402

FAST = ["--max-images", "4", "--inversion-steps", "3"]


def _png(path, seed: int, size: int = 32) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
    Image.fromarray(pixels, "RGB").save(path, format="PNG")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("behaviour")
    for name in ("exemplars", "controls"):
        (root / name).mkdir()
        for i in range(4):
            _png(root / name / f"{i}.png", seed=i + (10 if name == "controls" else 0), size=40 + 8 * i)
    (root / "logo.toml").write_text(make_preset(max_rank=8).toml_text, encoding="utf-8")
    return {"root": root, "sd": build_pipeline(root / "models", "sd"), "sdxl": build_pipeline(root / "models", "sdxl")}


def _kohya_file(path, base, scale: float, te_prefix: str | None = "lora_te_", seed: int = 0):
    """Rank-2 kohya factors on every cross-attention key/value of ``base``'s UNet and (unless ``te_prefix`` is None)
    one text-encoder MLP."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in base.denoiser.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            key = "lora_unet_" + name.replace(".", "_")
            tensors[key + ".lora_down.weight"] = torch.randn(2, module.in_features, generator=g)
            tensors[key + ".lora_up.weight"] = scale * torch.randn(module.out_features, 2, generator=g)
    if te_prefix is None:
        write_safetensors(path, tensors, {})
        return path
    fc1 = getattr(base.encoders[0], "text_model", base.encoders[0]).encoder.layers[0].mlp.fc1  # transformers 5: flat
    tensors[te_prefix + "text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.randn(2, fc1.in_features,
                                                                                               generator=g)
    tensors[te_prefix + "text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.randn(fc1.out_features, 2,
                                                                                             generator=g)
    write_safetensors(path, tensors, {})
    return path


def test_a_file_is_applied_while_the_block_runs_and_every_weight_restored_bit_for_bit(env):
    base = load_base(env["sd"])
    model = base.denoising(1)
    path = _kohya_file(env["root"] / "applied.safetensors", base, scale=0.5)
    before = {k: v.clone() for k, v in [*base.denoiser.state_dict().items(),
                                        *(("te." + k, v) for k, v in base.encoders[0].state_dict().items())]}
    x = model.latents(torch.zeros(1, 3, model.resolution, model.resolution))
    noise, t = torch.randn_like(x), torch.tensor([500])
    with torch.no_grad():
        plain = model.loss_map(x, noise, t, model.encode(["a photo of the zorblax logo"]))
        with applied(read_lora(path), base, model.text_modules()) as done:
            changed = model.loss_map(x, noise, t, model.encode(["a photo of the zorblax logo"]))
        again = model.loss_map(x, noise, t, model.encode(["a photo of the zorblax logo"]))
    assert not done.skipped and "lora_te_text_model_encoder_layers_0_mlp_fc1" in done.layers
    assert not torch.equal(plain, changed) and torch.equal(plain, again)
    after = {**base.denoiser.state_dict(), **{"te." + k: v for k, v in base.encoders[0].state_dict().items()}}
    assert all(torch.equal(before[k], after[k]) for k in before)


def _audit(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli_main(["audit", *map(str, argv)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_the_report_stands_beside_the_weight_check_and_decides_the_exit_code(env, capsys, kind):
    base = load_base(env[kind])
    prefix = "lora_te_" if kind == "sd" else "lora_te1_"
    path = _kohya_file(env["root"] / f"{kind}.safetensors", base, scale=0.5, te_prefix=prefix)
    args = [path, "--preset", env["root"] / "logo.toml", "--base", env[kind], "--clip-skip", "1" if kind == "sd"
            else "2", "--exemplars", env["root"] / "exemplars", "--controls", env["root"] / "controls", *FAST]
    rc, out, err = _audit(capsys, *args, "--json")
    doc = json.loads(out)
    b = doc["behaviour"]
    assert set(b["figures"]) == {"name", "other names", "generic", "empty", "inversion"}
    assert b["images"] == 4 and b["controls"] == 4 and not b["skipped_layers"] and b["applied_layers"] > 2
    assert rc == (6 if b["verdict"] == "LEARNED" else doc["exit_code"]) and doc["exit_code"] == rc
    assert doc["verdict"] in ("FLAGGED", "PASS-APPROXIMATE")  # the weight verdict, never merged
    rc_text, text, _ = _audit(capsys, *args)
    assert rc_text == rc and "behavioural check (what the file makes the base draw" in text
    assert text.rstrip().splitlines()[-1].startswith(b["verdict"] + ":")


def test_a_file_that_changes_nothing_is_not_learned_with_every_figure_zero(env, capsys):
    base = load_base(env["sd"])
    path = _kohya_file(env["root"] / "zero.safetensors", base, scale=0.0, te_prefix=None)
    rc, out, _ = _audit(capsys, path, "--preset", env["root"] / "logo.toml", "--base", env["sd"], "--clip-skip", "1",
                        "--exemplars", env["root"] / "exemplars", "--controls", env["root"] / "controls", *FAST,
                        "--json")
    doc = json.loads(out)
    b = doc["behaviour"]
    assert all(f["value"] == 0.0 for f in b["figures"].values()) and b["verdict"] == "NOT LEARNED"
    assert rc == doc["exit_code"] != 6


@pytest.mark.parametrize("extra, words", [
    (["--exemplars", "{root}/missing"], "--exemplars {root}/missing: no such folder"),
    (["--exemplars", "{root}/controls", "--controls", "{root}/empty"], "no images"),
    (["--exemplars", "{root}/exemplars"], "lists no [exemplars] to find the concept"),
    (["--exemplars", "{root}/broken", "--controls", "{root}/controls"], "not a readable"),
])
def test_unusable_images_are_one_line_and_exit_2(env, capsys, extra, words):
    root = env["root"]
    (root / "empty").mkdir(exist_ok=True)
    (root / "broken").mkdir(exist_ok=True)
    (root / "broken" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    base = load_base(env["sd"])
    path = _kohya_file(root / "bad-input.safetensors", base, scale=0.5)
    rc, out, err = _audit(capsys, path, "--preset", root / "logo.toml", "--base", env["sd"],
                          *[e.format(root=root) for e in extra])
    lines = message_lines(err)
    assert rc == 2 and out == "" and len(lines) == 1 and words.format(root=root) in lines[0]


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_a_lycoris_file_changes_the_unet_exactly_as_lycoris_does(sd, tmp_path, algo):
    """The real LyCORIS network applied by LyCORIS itself, against its saved file put into the base by the check."""
    from helpers.models import context_states, lycoris_network

    unet = sd.unet()
    network = lycoris_network(sd, unet, algo, tmp_path)
    torch.manual_seed(7)
    for p in network.parameters():
        p.data.normal_(0, 0.05)
    g = torch.Generator().manual_seed(0)
    sample, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    states = context_states(sd)
    with torch.no_grad():
        want = unet(sample, t, encoder_hidden_states=states).sample
    network.save_weights(str(tmp_path / f"{algo}.safetensors"), torch.float32, None)
    base = load_base(sd.root)
    with torch.no_grad():
        before = base.denoiser(sample, t, encoder_hidden_states=states).sample
        with applied(read_lora(tmp_path / f"{algo}.safetensors"), base, {}) as done:
            got = base.denoiser(sample, t, encoder_hidden_states=states).sample
    assert not done.skipped and done.layers
    change, error = (want - before).abs().max(), (got - want).abs().max()
    assert error < 1e-5 + 1e-4 * float(want.abs().max()) and change > 100 * error
