"""The traceback corpus: inputs that once gave a Python traceback (exit 1, FLAGGED's code). Each now gives one
line and exit 2 (unusable input), a verdict that is not PASS, or a clean report; an internal fault exits 4;
a closed output pipe never prints a traceback."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from concept_exclusion.commands.main import main as cli_main
from concept_exclusion.metadata import PREFIX
from concept_exclusion.safeio import write_safetensors

from helpers import make_preset  # noqa: E402
from helpers import message_lines

K = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"


def _raw(path: Path, header_text: bytes, body: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header_text)) + header_text + body)
    return path


def _lora_header(meta: dict | None = None, shape=(4, 32)) -> dict:
    n = 4 * shape[0] * shape[1] if all(shape) else 0
    header = {f"{K}.lora_down.weight": {"dtype": "F32", "shape": list(shape), "data_offsets": [0, n]}}
    if meta is not None:
        header["__metadata__"] = meta
    return header


def _run(capsys, *argv) -> tuple[int, str, list[str]]:
    capsys.readouterr()
    rc = cli_main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, message_lines(cap.err)


def _one_line(rc: int, err: list[str], code: int = 2) -> None:
    assert rc == code, (rc, err)
    assert len(err) == 1 and "Traceback" not in err[0], err


@pytest.fixture()
def lora(tmp_path):
    """A valid one-layer LoRA file and a way to rewrite its metadata."""
    def make(meta: dict[str, str], name: str = "lora.safetensors") -> Path:
        path = tmp_path / name
        write_safetensors(path, {f"{K}.lora_down.weight": torch.randn(4, 32), f"{K}.lora_up.weight": torch.randn(64, 4)},
                          meta)
        return path
    return make


def test_lone_surrogate_in_metadata(tmp_path, capsys):
    header = json.dumps({"__metadata__": {"ss_note": "bad \ud800 value"}}, ensure_ascii=True).encode()
    assert b"\\ud800" in header
    path = _raw(tmp_path / "surrogate.safetensors", header)
    rc, out, err = _run(capsys, "inspect", path)
    assert rc == 0 and "bad \ufffd value" in out and not err
    rc, out, err = _run(capsys, "inspect", path, "--json")
    assert rc == 0 and json.loads(out)["host"]["ss_note"] == "bad \ud800 value"


@pytest.mark.parametrize("header", [
    b'{"__metadata__": {"a": "b"}, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # nested 100k deep
    b'{"__metadata__": {"a": "b"}, "x": {"dtype": "F32", "shape": [' + b"7" * 5000 + b'], "data_offsets": [0, 0]}}',
    json.dumps({"a": {"dtype": "F32", "shape": [0, 2 ** 62], "data_offsets": [0, 0]}}).encode(),  # storage overflow
    json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode(),  # overlapping offsets
    b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
    b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',  # duplicate keys
    b'{"__metadata__": {"k": "1", "k": "2"}}',  # duplicate metadata keys
    json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}).encode(),  # a gap
], ids=["deep-json", "5000-digit-int", "shape-0x2^62", "overlap", "duplicate-tensor", "duplicate-metadata", "gap"])
def test_malformed_headers_are_refused_alike_by_inspect_and_audit(tmp_path, capsys, header):
    path = _raw(tmp_path / "bad.safetensors", header, b"\0" * 8)
    for command in ("inspect", "audit"):
        rc, out, err = _run(capsys, command, path)
        _one_line(rc, err)
        assert "bad.safetensors" in err[0] and out == ""


@pytest.mark.parametrize("meta", [
    {PREFIX + "targets": "5"}, {PREFIX + "targets": "true"}, {PREFIX + "basis_shape.context": "-1x-224",
                                                              PREFIX + "basis.context": "AAAA"},
    {PREFIX + "clip_skip": "\u00b2", "ss_clip_skip": "\u00b2"}, {PREFIX + "leakage": "[" * 50_000},
    {PREFIX + "ranks": "1" * 5000}, {PREFIX + "preset_toml": "[preset\nname = 1"},
], ids=["targets-5", "targets-true", "negative-basis-shape", "clip-skip-superscript", "deep-json-claim",
        "huge-int-claim", "bad-embedded-preset"])
def test_odd_claims_are_shown_not_used(lora, capsys, meta):
    path = lora(meta)
    rc, out, err = _run(capsys, "audit", path)
    assert rc == 3 and "UNVERIFIED" in out and not err
    rc, out, err = _run(capsys, "inspect", path)
    assert rc == 0 and not err


def test_clip_skip_flag_is_validated(sd, lora, tmp_path, capsys):
    preset = tmp_path / "p.toml"
    preset.write_text(make_preset(max_rank=8).toml_text)
    path = lora({})
    for value in ("5", "99"):  # the tiny encoder has 2 layers: used to be an IndexError
        rc, _, err = _run(capsys, "audit", path, "--preset", preset, "--base", sd.root, "--clip-skip", value)
        _one_line(rc, err)
        assert "--clip-skip" in err[0]
    with pytest.raises(SystemExit) as info:  # argparse: usage and exit 2
        cli_main(["audit", str(path), "--clip-skip", "\u00b2"])
    assert info.value.code == 2


@pytest.mark.parametrize("text,needle", [
    ("a = " + "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("a = " + "1" * 5000, "invalid TOML"),
    (make_preset().toml_text.replace('prompts = ["zorblax", "zorblax logo"]',
                                     "prompts = [" + ", ".join(f'"p{i}"' for i in range(10_000)) + "]"),
     "prompt x template combinations"),
], ids=["nested", "huge-int", "10k-prompts"])
def test_hostile_presets_fail_in_one_line(lora, tmp_path, capsys, text, needle):
    preset = tmp_path / "hostile.toml"
    preset.write_text(text)
    rc, _, err = _run(capsys, "audit", lora({}), "--preset", preset)
    _one_line(rc, err)
    assert needle in err[0]


def test_an_internal_error_has_its_own_exit_code(lora, capsys, monkeypatch):
    from concept_exclusion.commands import audit as audit_cmd

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(audit_cmd, "audit_file", broken)
    rc, out, err = _run(capsys, "audit", lora({}))
    _one_line(rc, err, code=4)
    assert "internal error (RuntimeError: boom\\x0asecond line)" in err[0]


def test_closed_pipe_prints_no_traceback(tmp_path):
    """``audit ... --json | head -1`` with more output than a pipe buffer holds."""
    exe = shutil.which("concept-exclusion", path=str(Path(sys.executable).parent))
    assert exe is not None
    tensors = {f"unknown_{i:05d}_" + "x" * 80: torch.zeros(1) for i in range(3000)}
    tensors.update({f"{K}.lora_down.weight": torch.randn(4, 32), f"{K}.lora_up.weight": torch.randn(64, 4)})
    path = tmp_path / "many.safetensors"
    write_safetensors(path, tensors, {})
    proc = subprocess.Popen([exe, "audit", str(path), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    rc = proc.wait(timeout=120)
    assert first.strip() == b"{"
    assert rc == 141 and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_factors_that_multiply_out_too_large_are_refused(tmp_path, capsys):
    """up [100000, 1] @ down [1, 100000] would be 10^10 float64 values: one line, not a MemoryError."""
    path = tmp_path / "huge.safetensors"
    write_safetensors(path, {f"{K}.lora_down.weight": torch.zeros(1, 100_000),
                             f"{K}.lora_up.weight": torch.zeros(100_000, 1)}, {})
    rc, out, err = _run(capsys, "audit", path)
    _one_line(rc, err)
    assert "larger than any model layer" in err[0]
