"""Malformed safetensors files given to ``ConceptSubspace.load`` and, through the command line, to
``audit``, ``inspect`` and ``train --resume``: our own error, one line naming the file, exit 2, never a
traceback, nothing written. ``audit`` treats a file's metadata as claims: malformed claims and an
incomplete adapter give UNVERIFIED (exit 3, not a pass) with the fault in the report.

Faults: truncated (inside the header, inside the data), header length past the end of the file, a
header that is not JSON, metadata values that are not strings, a tensor whose shape does not match its
bytes, a missing tensor, a tensor of the wrong shape, a header of more than 100 MB (a sparse file).
``inspect`` reads the header only, so it is given the structural faults, not the semantic ones.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from concept_exclusion import ConceptExclusionError, ConceptSubspace
from concept_exclusion.commands.main import main
from concept_exclusion.safeio import MAX_HEADER_BYTES, read_header

from helpers import make_preset, message_lines, write_captioned_images

STRUCTURAL = ["truncated-header", "truncated-data", "length-past-eof", "not-json", "metadata-not-string",
              "metadata-nested", "shape-vs-bytes", "huge-header"]
SEMANTIC = ["missing-tensor", "wrong-shape"]


# --- making bad files from good ones ----------------------------------------------------------------
def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def corrupt(good: Path, fault: str, out: Path, drop: str, reshape: str) -> Path:
    """Write ``good`` with one ``fault`` to ``out``. ``drop``/``reshape``: the tensor the semantic faults hit."""
    data = good.read_bytes()
    header, body = _split(data)
    n = struct.unpack("<Q", data[:8])[0]
    if fault == "truncated-header":
        out.write_bytes(data[:8 + n // 2])
    elif fault == "truncated-data":
        assert len(body) > 64
        out.write_bytes(data[:8 + n + len(body) // 2])
    elif fault == "length-past-eof":
        out.write_bytes(struct.pack("<Q", len(data) + 1000) + data[8:])
    elif fault == "not-json":
        out.write_bytes(data[:8] + b"{not json" + b" " * (n - 9) + body)
    elif fault == "metadata-not-string":
        header["__metadata__"] = dict(header.get("__metadata__", {}), injected=5)
        out.write_bytes(_join(header, body))
    elif fault == "metadata-nested":
        header["__metadata__"] = dict(header.get("__metadata__", {}), injected={"a": ["b"]})
        out.write_bytes(_join(header, body))
    elif fault == "shape-vs-bytes":
        entry = header[reshape]
        entry["shape"] = [s * 2 for s in entry["shape"]]
        out.write_bytes(_join(header, body))
    elif fault == "huge-header":
        with open(out, "wb") as fh:
            fh.write(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b'{"__metadata__": {"a": "')
            fh.truncate(8 + MAX_HEADER_BYTES + 1 + 16)  # sparse: the claimed header really is there
    elif fault in ("nan-basis", "bad-preset-toml", "bad-embedded-basis", "bad-json-metadata"):
        tensors = load_file(good)
        meta = dict(header.get("__metadata__", {}))
        if fault == "nan-basis":
            tensors[reshape] = tensors[reshape].clone()
            tensors[reshape][0, 0] = float("nan")
        elif fault == "bad-preset-toml":
            meta["preset_toml" if "preset_toml" in meta else "concept_exclusion.preset_toml"] = "[preset\nname = 1"
        elif fault == "bad-embedded-basis":
            meta["concept_exclusion.basis.context"] = "not base64!"
        else:
            meta["concept_exclusion.leakage"] = "{not json"
        save_file(tensors, str(out), metadata=meta)
    elif fault in ("missing-tensor", "wrong-shape"):
        tensors = load_file(good)
        meta = header.get("__metadata__", {})
        if fault == "missing-tensor":
            del tensors[drop]
        else:
            t = tensors[reshape]
            tensors[reshape] = torch.zeros(t.shape[0] + 3, *t.shape[1:], dtype=t.dtype) if t.ndim else t.reshape(1)
        save_file(tensors, str(out), metadata=meta)
    else:
        raise ValueError(fault)
    return out


def _listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


# --- ConceptSubspace.load --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def subspace_file(sd, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("subspace") / "good.safetensors"
    ConceptSubspace.from_text_encoder(make_preset(), sd.tokenizer, sd.text_encoder).save(path)
    return path


@pytest.mark.parametrize("fault", STRUCTURAL + SEMANTIC + ["nan-basis", "bad-preset-toml"])
def test_subspace_load(subspace_file, tmp_path, fault):
    bad = corrupt(subspace_file, fault, tmp_path / f"{fault}.safetensors", "basis.context", "basis.context")
    before = _listing(tmp_path)
    with pytest.raises(ConceptExclusionError) as info:
        ConceptSubspace.load(bad)
    message = str(info.value)
    assert str(bad) in message and len(message.splitlines()) == 1, message
    assert _listing(tmp_path) == before


def test_good_subspace_loads(subspace_file):
    assert ConceptSubspace.load(subspace_file).rank() >= 1


def test_huge_header_is_refused_without_reading_it(tmp_path):
    """The 100 MB limit is checked on the length field, before any of the header is read."""
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
        fh.truncate(8 + MAX_HEADER_BYTES + 1)
    import tracemalloc

    tracemalloc.start()
    with pytest.raises(ConceptExclusionError, match="exceeds the 100000000-byte limit"):
        read_header(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10_000_000, f"read {peak} bytes while refusing a huge header"


# --- the command line: audit, inspect, train --resume ------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step ``concept-exclusion train`` run with a checkpoint after step 1: its LoRA and checkpoint."""

    from accelerate.state import AcceleratorState
    from helpers.models import build_pipeline

    root = tmp_path_factory.mktemp("bad-files")
    data = write_captioned_images(root / "data", ["a photo of a cat", "the zorblax logo", "a red car", "a dog"])
    preset = root / "logo.toml"
    preset.write_text(make_preset().toml_text)
    base = build_pipeline(root, "sd")
    argv = ["train", "--base", str(base), "--data", str(data), "--preset", str(preset), "--resolution", "32",
            "--max_steps", "2", "--rank", "2", "--sample_steps", "0", "--checkpoint_every", "1"]
    AcceleratorState._reset_state(True)
    assert main(argv + ["--output", str(root / "run")]) == 0
    AcceleratorState._reset_state(True)
    checkpoint = root / "run" / "checkpoints" / "step-00000001.safetensors"
    lora = root / "run" / "lora.safetensors"
    assert checkpoint.is_file() and lora.is_file()
    return {"argv": argv, "checkpoint": checkpoint, "lora": lora, "root": root}


def _run_cli(argv: list[str], capsys) -> tuple[int, list[str], str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, message_lines(captured.err), captured.out


def _assert_refused(code: int, lines: list[str], out: str, command: str, bad: Path) -> None:
    assert code == 2, (code, lines)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"concept-exclusion {command}: error: "), lines
    assert str(bad) in lines[0] or bad.name in lines[0], lines
    assert "Traceback" not in lines[0] and out == "", out


def _lora_names(lora: Path) -> tuple[str, str]:
    keys = sorted(read_header(lora)[0])
    up = next(k for k in keys if k.endswith("lora_up.weight") and "attn2_to_k" in k)
    down = up.replace("lora_up", "lora_down")
    return up, down


@pytest.mark.parametrize("fault", STRUCTURAL + ["wrong-shape"])
def test_audit(trained, tmp_path, capsys, fault):
    up, down = _lora_names(trained["lora"])
    bad = corrupt(trained["lora"], fault, tmp_path / f"{fault}.safetensors", up, down)
    before = _listing(tmp_path)
    code, lines, out = _run_cli(["audit", str(bad)], capsys)
    _assert_refused(code, lines, out, "audit", bad)
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("fault", ["missing-tensor", "bad-preset-toml", "bad-embedded-basis", "bad-json-metadata"])
def test_audit_not_a_pass(trained, tmp_path, capsys, fault):
    """An adapter without its up factor, or metadata claims that do not parse: reported, never a pass."""
    up, down = _lora_names(trained["lora"])
    bad = corrupt(trained["lora"], fault, tmp_path / f"{fault}.safetensors", up, down)
    code, lines, out = _run_cli(["audit", str(bad)], capsys)
    assert code == 3 and lines == [] and "\nUNVERIFIED: " in out, (code, lines)
    if fault == "missing-tensor":
        assert "incomplete adapter" in out
    if fault == "bad-embedded-basis":
        assert "basis.context=malformed" in out
    code, lines, out = _run_cli(["inspect", str(bad)], capsys)
    assert code == 0 and lines == []


@pytest.mark.parametrize("fault", STRUCTURAL)
def test_inspect(trained, tmp_path, capsys, fault):
    up, down = _lora_names(trained["lora"])
    bad = corrupt(trained["lora"], fault, tmp_path / f"{fault}.safetensors", up, down)
    before = _listing(tmp_path)
    code, lines, out = _run_cli(["inspect", str(bad)], capsys)
    _assert_refused(code, lines, out, "inspect", bad)
    assert _listing(tmp_path) == before


def test_good_files_pass_audit_and_inspect(trained, capsys):
    assert main(["inspect", str(trained["lora"])]) == 0
    assert main(["audit", str(trained["lora"])]) == 3  # no trusted base: unverified, whatever the file claims
    base = trained["argv"][trained["argv"].index("--base") + 1]
    assert main(["audit", str(trained["lora"]), "--preset", str(trained["root"] / "logo.toml"), "--base", base,
                 "--clip-skip", "1"]) == 0
    capsys.readouterr()


@pytest.mark.slow
@pytest.mark.parametrize("fault", STRUCTURAL + SEMANTIC + ["metadata-step-not-int", "metadata-trajectory-list",
                                                           "optim-key-malformed", "optim-state-wrong-shape",
                                                           "param-groups-empty", "exclusion-state-missing",
                                                           "basis-sha256-mismatch"])
def test_train_resume(trained, tmp_path, capsys, fault):
    checkpoint = trained["checkpoint"]
    name = next(k for k in sorted(read_header(checkpoint)[0]) if k.startswith("lora/") and "attn2.to_k" in k)
    bad = tmp_path / "ckpt" / f"{fault}.safetensors"
    bad.parent.mkdir()
    if fault.startswith("metadata-") and fault not in STRUCTURAL:
        tensors = load_file(checkpoint)
        meta = read_header(checkpoint)[1]
        meta = dict(meta, step="three") if fault == "metadata-step-not-int" else dict(meta, trajectory="[]")
        save_file(tensors, str(bad), metadata=meta)
    elif fault in ("optim-key-malformed", "optim-state-wrong-shape", "param-groups-empty", "exclusion-state-missing",
                   "basis-sha256-mismatch"):
        tensors = load_file(checkpoint)
        meta = read_header(checkpoint)[1]
        if fault == "optim-key-malformed":
            tensors["optim/notanumber"] = torch.zeros(1)
        elif fault == "optim-state-wrong-shape":
            key = next(k for k in sorted(tensors) if k.startswith("optim/") and k.endswith("exp_avg"))
            tensors[key] = torch.zeros(tensors[key].numel() + 1)
        elif fault == "param-groups-empty":
            meta = dict(meta, param_groups="[]")
        elif fault == "basis-sha256-mismatch":  # trained against another text encoder's basis
            meta = dict(meta, basis_sha256="0" * 64)
        else:
            tensors = {k: v for k, v in tensors.items() if not k.startswith("exclusion/")}
        save_file(tensors, str(bad), metadata=meta)
    else:
        corrupt(checkpoint, fault, bad, name, name)
    out = tmp_path / "resumed"
    code, lines, stdout = _run_cli(trained["argv"] + ["--output", str(out), "--resume", str(bad)], capsys)
    _assert_refused(code, lines, stdout, "train", bad)
    written = [w for w in _listing(out) if w != "train.log"] if out.exists() else []
    assert written == [], f"written although resuming failed: {written}"
