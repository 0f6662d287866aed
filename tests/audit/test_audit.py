"""``concept-exclusion audit`` / ``inspect`` on LoRA files in kohya, diffusers and PEFT layouts, files
written without this project, files carrying our metadata, and malformed files."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from concept_exclusion import ConceptSubspace
from concept_exclusion.audit.weights import audit_file
from concept_exclusion.commands.main import main as cli_main
from concept_exclusion.lora.file import effective_delta, layer_key, read_lora, sgm_to_diffusers
from concept_exclusion.metadata import PREFIX, read_basis, subspace_metadata
from concept_exclusion.safeio import write_safetensors

from helpers import make_preset, message_lines  # noqa: E402

ALPHA, RANK = 8, 4


@pytest.fixture(scope="module")
def preset_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("audit-presets") / "logo.toml"
    path.write_text(make_preset(max_rank=8).toml_text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def peft_state(sd):
    """A PEFT LoRA (r=4, alpha=8) on the tiny SD UNet's cross-attention, with non-zero B."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = sd.unet()
    torch.manual_seed(3)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                target_modules=["attn2.to_k", "attn2.to_v", "attn2.to_q", "attn2.to_out.0"]))
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}


def _project_kv(state: dict[str, torch.Tensor], basis: torch.Tensor) -> dict[str, torch.Tensor]:
    """Remove the basis directions from every key/value lora_A (what exact mode guarantees)."""
    out = dict(state)
    u = basis.float()
    for k, v in state.items():
        if ("to_k.lora_A" in k or "to_v.lora_A" in k):
            out[k] = v - (v @ u) @ u.T
    return out


def _write_layouts(folder: Path, state: dict[str, torch.Tensor]) -> dict[str, Path]:
    """The same LoRA as PEFT (adapter_config.json beside it), diffusers and kohya files."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya

    folder.mkdir(parents=True, exist_ok=True)
    peft_dir = folder / "peft"
    peft_dir.mkdir(exist_ok=True)
    write_safetensors(peft_dir / "adapter_model.safetensors",
                      {f"base_model.model.{k}": v for k, v in state.items()}, {})
    (peft_dir / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": ALPHA, "peft_type": "LORA"}))
    diffusers_file = folder / "diffusers.safetensors"
    write_safetensors(diffusers_file, {f"unet.{k}": v for k, v in convert_state_dict_to_diffusers(state).items()},
                      {"format": "pt", "lora_adapter_metadata": json.dumps({"r": RANK, "lora_alpha": ALPHA})})
    kohya_file = folder / "kohya.safetensors"
    write_safetensors(kohya_file, convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()}),
                      {"ss_network_module": "networks.lora"})
    return {"peft": peft_dir / "adapter_model.safetensors", "diffusers": diffusers_file, "kohya": kohya_file}


def _run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_three_layouts_read_alike_and_a_plain_lora_is_flagged(sd, peft_state, preset_file, tmp_path, capsys):
    files = _write_layouts(tmp_path, peft_state)
    reports = {}
    for layout, path in files.items():
        lora = read_lora(path)
        assert lora.layout == layout
        rc, out, _ = _run(capsys, "audit", path, "--preset", preset_file, "--base", sd.root, "--json")
        assert rc == 1
        reports[layout] = json.loads(out)
        assert reports[layout]["verified"] and reports[layout]["verdict"] == "FLAGGED"
        assert reports[layout]["clip_skips"] == [1, 2]  # SD1 without --clip-skip: both plausible values
    shares = {layout: {layer_key(r["name"]): r["share"] for r in rep["layers"]} for layout, rep in reports.items()}
    assert shares["peft"].keys() == shares["kohya"].keys() == shares["diffusers"].keys()
    for key, value in shares["peft"].items():
        assert value == pytest.approx(shares["kohya"][key], rel=1e-9)
        assert value == pytest.approx(shares["diffusers"][key], rel=1e-9)
    # scale = alpha / r is read from adapter_config.json and diffusers' metadata; diffusers' kohya
    # conversion writes alpha = rank, so that file's deltas are half as large
    change = {layout: [r["concept_change"] for r in rep["layers"] if r["role"] == "key"]
              for layout, rep in reports.items()}
    assert change["peft"] == pytest.approx(change["diffusers"], rel=1e-9)
    assert change["peft"] == pytest.approx([2 * c for c in change["kohya"]], rel=1e-9)
    assert all(c > 0 for c in change["peft"])


def test_projected_lora_passes_in_every_layout(sd, peft_state, preset_file, tmp_path, capsys):
    basis = ConceptSubspace.from_text_encoder(make_preset(max_rank=8), sd.tokenizer, sd.text_encoder).basis()
    files = _write_layouts(tmp_path, _project_kv(peft_state, basis))
    for layout, path in files.items():
        rc, out, _ = _run(capsys, "audit", path, "--preset", preset_file, "--base", sd.root, "--targets", "kv")
        # trained against clip_skip 1 (the last layer): the clip_skip 2 basis differs, and unknown means both count
        assert rc == 1 and "clip_skip 1: max " in out and "audit again with --clip-skip 1" in out, out
        rc, out, _ = _run(capsys, "audit", path, "--preset", preset_file, "--base", sd.root, "--targets", "kv",
                          "--clip-skip", "1")
        assert rc == 0, out
        assert "\nPASS: " in out and "sha256 " in out and str(sd.root) in out
        report = audit_file(path, preset_path=str(preset_file), base=str(sd.root), targets="kv", clip_skip=1)
        kv = [r for r in report.layers if r.role in ("key", "value")]
        assert len(kv) == 8 and max(r.share for r in kv) < 1e-6
        # the basis keeps 99% of the concept rows' energy, so ~10% of their norm lies outside it
        clean_change = [r.concept_change for r in kv]
        assert max(clean_change) < 0.2
        # the unconstrained query/output layers are measured but not checked under 'kv'
        assert any(r.role == "query" and r.share > 0.1 and not r.checked for r in report.layers)
    rc, _, _ = _run(capsys, "audit", files["kohya"], "--preset", preset_file, "--base", sd.root,
                    "--targets", "attention", "--clip-skip", "1")
    assert rc == 1
    plain = _write_layouts(tmp_path / "plain", peft_state)["kohya"]
    plain_change = [r.concept_change for r in audit_file(plain, preset_path=str(preset_file), base=str(sd.root),
                                                         targets="kv").layers
                    if r.role in ("key", "value")]
    print(f"||dW c||/||W0 c|| per k/v layer: plain {[round(c, 3) for c in plain_change]}, "
          f"projected {[round(c, 3) for c in clean_change]}")
    assert sum(clean_change) < 0.5 * sum(plain_change)


def test_without_base_the_verdict_is_unverified(sd, peft_state, preset_file, tmp_path, capsys):
    """The basis a file embeds is a claim: shown and compared, never a PASS (exit 3 without --base)."""
    subspace = ConceptSubspace.from_text_encoder(make_preset(max_rank=8), sd.tokenizer, sd.text_encoder)
    from diffusers.utils import convert_state_dict_to_kohya

    clean = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in _project_kv(peft_state, subspace.basis()).items()})
    dirty = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_state.items()})
    meta = {**subspace_metadata(subspace), "ss_network_module": "networks.lora"}
    write_safetensors(tmp_path / "clean.safetensors", clean, meta)
    write_safetensors(tmp_path / "dirty.safetensors", dirty, meta)
    rc, out, _ = _run(capsys, "audit", tmp_path / "clean.safetensors")
    assert rc == 3 and "\nUNVERIFIED: " in out and "ok (claim)" in out and "PASS" not in out
    rc, out, _ = _run(capsys, "audit", tmp_path / "clean.safetensors", "--preset", preset_file)
    assert rc == 3 and "the file claims the trusted preset (same sha256)" in out
    rc, out, _ = _run(capsys, "audit", tmp_path / "dirty.safetensors", "--json")
    report = json.loads(out)
    assert rc == 3 and report["verdict"] == "UNVERIFIED" and not report["verified"] and report["flagged"] == []
    assert any(r["over"] for r in report["layers"])  # over the claimed basis: shown, decides nothing
    assert report["claims"]["basis.context"] == f"32x{subspace.rank()}"
    # with --base and --preset the trusted basis decides, and the claimed one is compared with it
    rc, out, _ = _run(capsys, "audit", tmp_path / "clean.safetensors", "--base", sd.root, "--preset", preset_file,
                      "--targets", "kv", "--clip-skip", "1")
    assert rc == 0 and "lies outside the trusted span" in out
    # --base without --preset would verify the file's own embedded preset: refused in one line
    rc, out, err = _run(capsys, "audit", tmp_path / "clean.safetensors", "--base", sd.root)
    assert rc == 2 and "--preset" in err and len(err.strip().splitlines()) == 1
    # a file with neither a basis nor --base: unverified, nothing measured
    write_safetensors(tmp_path / "bare.safetensors", dirty, {})
    rc, out, err = _run(capsys, "audit", tmp_path / "bare.safetensors")
    assert rc == 3 and "nothing could be measured" in out


def test_a_t5_length_for_a_clip_only_base_is_one_line_and_exit_2(sd, peft_state, preset_file, tmp_path, capsys):
    from diffusers.utils import convert_state_dict_to_kohya

    write_safetensors(tmp_path / "l.safetensors", convert_state_dict_to_kohya({f"unet.{k}": v for k, v in
                                                                              peft_state.items()}), {})
    rc, out, err = _run(capsys, "audit", tmp_path / "l.safetensors", "--base", sd.root, "--preset", preset_file,
                        "--max-sequence-length", "64")
    lines = message_lines(err)
    assert rc == 2 and out == "" and len(lines) == 1 and "text encoders are all CLIP" in lines[0]


def test_inspect_prints_provenance_readably(sd, tmp_path, capsys):
    subspace = ConceptSubspace.from_text_encoder(make_preset(max_rank=8), sd.tokenizer, sd.text_encoder)
    path = tmp_path / "ours.safetensors"
    write_safetensors(path, {"lora_unet_x.alpha": torch.tensor(1.0)},
                      {**subspace_metadata(subspace), "ss_network_dim": "4", "modelspec.title": "t"})
    rc, out, _ = _run(capsys, "inspect", path)
    assert rc == 0
    assert "preset_name      test-logo" in out and f"basis.context    32x{subspace.rank()} float16" in out
    assert 'name = "zorblax"' in out and "ss_network_dim: 4" in out and "modelspec.title: t" in out
    assert subspace_metadata(subspace)[PREFIX + "basis.context"] not in out  # the blob is summarised
    rc, out, _ = _run(capsys, "inspect", path, "--json")
    info = json.loads(out)
    assert info["concept_exclusion"]["ranks"] == {"context": subspace.rank()} and info["host"]["ss_network_dim"] == "4"


def _bad_files(folder: Path, good: Path) -> dict[str, Path]:
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    files = {
        "truncated": data[: 8 + n + 10],
        "header past EOF": struct.pack("<Q", 10_000) + b"{}",
        "non-JSON header": struct.pack("<Q", 9) + b"{not json" + b"\0" * 16,
        "non-string metadata": (lambda h: struct.pack("<Q", len(h)) + h)(
            json.dumps({"__metadata__": {"ss_steps": 3}}).encode()),
        "empty": b"",
    }
    out = {}
    for name, content in files.items():
        path = folder / (name.replace(" ", "_") + ".safetensors")
        path.write_bytes(content)
        out[name] = path
    out["missing"] = folder / "no-such-file.safetensors"
    return out


def test_unreadable_files_exit_2_with_one_line(peft_state, tmp_path, capsys):
    from diffusers.utils import convert_state_dict_to_kohya

    good = tmp_path / "good.safetensors"
    write_safetensors(good, convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_state.items()}), {})
    no_lora = tmp_path / "no_lora.safetensors"
    write_safetensors(no_lora, {"model.weight": torch.zeros(2, 2)}, {})
    bad_alpha = tmp_path / "bad_alpha.safetensors"
    write_safetensors(bad_alpha, {**convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_state.items()}),
                                  "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.alpha":
                                      torch.zeros(2)}, {})
    cases = {**_bad_files(tmp_path, good), "no LoRA layers": no_lora, "bad alpha": bad_alpha}
    for name, path in cases.items():
        for command in ("audit", "inspect"):
            if command == "inspect" and name in ("truncated", "no LoRA layers", "bad alpha"):
                continue  # inspect reads only the header, which is intact
            rc, out, err = _run(capsys, command, path)
            assert rc == 2, (name, command, out, err)
            lines = err.strip().splitlines()
            assert len(lines) == 1 and str(path.name) in lines[0] and "Traceback" not in err, (name, err)


def test_console_script_exit_codes(peft_state, tmp_path):
    """The installed entry point, in a fresh process: 2 with one line for a bad file, 1 for a flagged one."""
    exe = shutil.which("concept-exclusion", path=str(Path(sys.executable).parent))
    assert exe is not None
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    proc = subprocess.run([exe, "audit", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr and "runs past the end" in proc.stderr


def test_sgm_names_map_like_diffusers():
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    names = [f"lora_unet_input_blocks_{n}_1_transformer_blocks_0_attn2_to_k" for n in (4, 5, 7, 8)] + \
            ["lora_unet_middle_block_1_transformer_blocks_3_attn2_to_v"] + \
            [f"lora_unet_output_blocks_{n}_1_transformer_blocks_1_attn2_to_out_0" for n in range(6)]
    state = {f"{n}.lora_down.weight": i for i, n in enumerate(names)}
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(state), SimpleNamespace(layers_per_block=2))
    # diffusers renumbers the blocks here and renames input/middle/output in a later step
    renames = (("input_blocks", "down_blocks"), ("middle_block", "mid_block"), ("output_blocks", "up_blocks"))
    theirs = {}
    for key, i in mapped.items():
        name = key.split(".")[0]
        for old, new in renames:
            name = name.replace(old, new)
        theirs[i] = name
    for i, n in enumerate(names):
        assert sgm_to_diffusers(n, 2) == theirs[i]


def test_sdxl_names_round_trip_in_both_separators(sdxl):
    """Every attention path of an SDXL-shaped UNet maps to its Stability name and back, as module path and as
    kohya key; the names kohya_state_dict writes are the ones the audit maps back to diffusers' layers."""
    from concept_exclusion.integrations.diffusers import kohya_state_dict
    from concept_exclusion.lora.sdxl_names import diffusers_to_sai, sai_to_diffusers
    from peft import LoraConfig

    unet = sdxl.unet()
    lpb = unet.config.layers_per_block
    paths = [n for n, _ in unet.named_modules() if ".attentions." in n and n.endswith("attn2.to_k")]
    assert paths and any(p.startswith("up_blocks") for p in paths) and any(p.startswith("mid_block") for p in paths)
    for path in paths:
        sai = diffusers_to_sai(path, lpb)
        assert sai != path and sai_to_diffusers(sai, lpb) == path
        key = path.replace(".", "_")
        assert sai_to_diffusers(diffusers_to_sai(key, lpb, sep="_"), lpb, sep="_") == key
        assert sgm_to_diffusers("lora_unet_" + diffusers_to_sai(key, lpb, sep="_"), lpb) == "lora_unet_" + key
    assert diffusers_to_sai("time_embedding.linear_1", lpb) == "time_embedding.linear_1"
    assert sai_to_diffusers("label_emb.0.0", lpb) == "add_embedding.linear_1"
    unet.add_adapter(LoraConfig(r=2, target_modules=["attn2.to_k"]))
    written = {k.split(".")[0] for k in kohya_state_dict(unet, sdxl_names=True)}
    assert {sgm_to_diffusers(k, lpb) for k in written} == {"lora_unet_" + p.replace(".", "_") for p in paths}


def test_large_basis_fits_the_header(tmp_path):
    torch.manual_seed(0)
    rows = torch.randn(200, 64, dtype=torch.float64) @ torch.randn(64, 2048, dtype=torch.float64)
    sub = ConceptSubspace.from_rows({"context": rows}, energy=1.0, max_rank=64)
    assert sub.bases["context"].shape == (2048, 64)
    meta = subspace_metadata(sub)
    path = tmp_path / "big.safetensors"
    write_safetensors(path, {"x": torch.zeros(1)}, meta)
    (header_bytes,) = struct.unpack("<Q", path.read_bytes()[:8])
    print(f"2048 x 64 basis: header {header_bytes} bytes")
    assert 250_000 < header_bytes < 500_000  # ~350 KB, far below safetensors' 100 MB limit
    from concept_exclusion.safeio import read_header

    decoded = read_basis(read_header(path)[1], "context")
    u = sub.bases["context"]
    assert torch.allclose(decoded.T @ decoded, torch.eye(64, dtype=torch.float64), atol=1e-10)
    assert float(torch.linalg.matrix_norm(decoded - u @ (u.T @ decoded))) < 5e-3


def test_lycoris_factorisations_form_their_delta(tmp_path):
    torch.manual_seed(1)
    out_dim, in_dim, r = 16, 32, 4
    a1, b1, a2, b2 = (torch.randn(out_dim, r), torch.randn(r, in_dim), torch.randn(out_dim, r), torch.randn(r, in_dim))
    k1, k2a, k2b = torch.randn(2, 4), torch.randn(8, r), torch.randn(r, 8)
    full = torch.randn(out_dim, in_dim)
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_"
    tensors = {
        f"{name}to_k.hada_w1_a": a1, f"{name}to_k.hada_w1_b": b1, f"{name}to_k.hada_w2_a": a2,
        f"{name}to_k.hada_w2_b": b2, f"{name}to_k.alpha": torch.tensor(2.0),
        f"{name}to_v.lokr_w1": k1, f"{name}to_v.lokr_w2_a": k2a, f"{name}to_v.lokr_w2_b": k2b,
        f"{name}to_v.alpha": torch.tensor(1.0),
        f"{name}to_q.diff": full,
        # a 3x3 conv LoCon layer and a text-encoder layer: counted, not formed
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.randn(r, 8, 3, 3),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.randn(8, r, 1, 1),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(r, 32),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(64, r),
    }
    path = tmp_path / "lycoris.safetensors"
    write_safetensors(path, tensors, {})
    lora = read_lora(path)
    formed = {a.module.rsplit("_", 1)[-1]: effective_delta(lora, a, None) for a in lora.adapters
              if "attn2" in a.module}
    assert lora.layout == "kohya" and len(formed) == 3 and not lora.unknown
    assert len(lora.text_encoder_modules) == 1 and len(lora.modules()) == 5
    expected = {"k": (a1 @ b1) * (a2 @ b2) * (2.0 / r), "v": torch.kron(k1, k2a @ k2b) * (1.0 / r), "q": full}
    for key, delta in expected.items():
        assert torch.allclose(formed[key].delta, delta.double(), rtol=1e-6, atol=1e-6), key
    assert formed["k"].kind == "loha" and formed["v"].kind == "lokr" and formed["q"].kind == "full"


def test_tucker_middle_and_dora_form_their_effective_change(tmp_path):
    """lora_mid (LyCORIS Tucker, 1x1) chains as up @ mid @ down; DoRA needs the base weight and rescales it."""
    torch.manual_seed(2)
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    down, mid, up = torch.randn(4, 32), torch.randn(4, 4, 1, 1), torch.randn(16, 4)
    w0 = torch.randn(16, 32, dtype=torch.float64)
    magnitude = torch.rand(16, 1) + 0.5
    write_safetensors(tmp_path / "t.safetensors", {f"{name}.lora_down.weight": down, f"{name}.lora_mid.weight": mid,
                                                   f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0),
                                                   f"{name}.dora_scale": magnitude}, {})
    lora = read_lora(tmp_path / "t.safetensors")
    (adapter,) = lora.adapters
    assert effective_delta(lora, adapter, None).delta is None  # DoRA without the base: not formed, with a reason
    formed = effective_delta(lora, adapter, w0)
    plain = (up.double() @ mid[:, :, 0, 0].double() @ down.double()) * (2.0 / 4)
    merged = w0 + plain
    expected = magnitude.double() * merged / merged.norm(dim=1, keepdim=True) - w0
    assert formed.kind == "dora-lora" and torch.allclose(formed.delta, expected, atol=1e-10)
