"""Every file the project writes (subspace, LoRA, checkpoint, report) appears under its final name only
when complete: it is written to a temporary name in the same folder and renamed.

Checked three ways: each writer with the write failing half-way (no file under the final name, a file
already there left intact, no temporary left behind); a real SIGKILL of a process in the middle of a
write; and a scan of plugin/ and integrations/ for any write that does not go to an ``atomic_path``
temporary.
"""

from __future__ import annotations

import argparse
import ast
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from concept_exclusion import ConceptExclusion, ConceptSubspace
from concept_exclusion.model.plan import projection_of
from concept_exclusion.safeio import write_safetensors, write_text

from helpers import make_preset

ROOT = Path(__file__).resolve().parents[1]


class DiskFull(OSError):
    pass


def _fail(monkeypatch) -> None:
    """safetensors' save_file and Path.write_text write half their bytes, then fail (as a full disk would)."""
    import safetensors.torch as st

    real_save = st.save_file
    real_write_text = Path.write_text

    def half_save(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[:len(data) // 2])
        raise DiskFull(28, "No space left on device")

    def half_text(self, text, encoding=None, errors=None, newline=None):
        real_write_text(self, text[:len(text) // 2], encoding=encoding)
        raise DiskFull(28, "No space left on device")

    monkeypatch.setattr(st, "save_file", half_save)
    monkeypatch.setattr(Path, "write_text", half_text)


@pytest.fixture(scope="module")
def lora_setup(sd):
    """A PEFT LoRA UNet with an exclusion, an optimizer that has stepped once, and train's arguments."""
    from peft import LoraConfig

    unet = sd.unet()
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_v", "to_q", "to_out.0"]))
    sub = ConceptSubspace.from_text_encoder(make_preset(), sd.tokenizer, sd.text_encoder)
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-3)
    exclusion = ConceptExclusion.attach(unet, sub, projection_of(sub).overridden(mode="exact", targets="kv"),
                                        optimizer=opt)
    out = unet(torch.randn(1, 4, 8, 8), torch.tensor([3]), encoder_hidden_states=torch.randn(1, 5, 32)).sample
    out.pow(2).mean().backward()
    opt.step()
    return unet, sub, opt, exclusion


def _train_args(tmp_path: Path) -> argparse.Namespace:
    from concept_exclusion.integrations.train.config import add_arguments

    preset = tmp_path / "p.toml"
    preset.write_text(make_preset().toml_text)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--base", "x", "--data", "x", "--preset", str(preset)])


def _writers(lora_setup, tmp_path: Path):
    from concept_exclusion.integrations.train.checkpoint import save_checkpoint
    from concept_exclusion.integrations.diffusers import save_lora

    unet, sub, opt, exclusion = lora_setup
    args = _train_args(tmp_path)
    return {
        "subspace": lambda p: sub.save(p),
        "lora-diffusers": lambda p: save_lora(unet, p, exclusion, format="diffusers"),
        "lora-kohya": lambda p: save_lora(unet, p, exclusion, format="kohya"),
        "checkpoint": lambda p: save_checkpoint(p, 1, unet, opt, exclusion, None, args, "0" * 64),
        "exclusion-state": lambda p: write_safetensors(p, exclusion.state_dict(), exclusion.metadata()),
        "text": lambda p: write_text(p, "x" * 10_000),
    }


WRITERS = ["subspace", "lora-diffusers", "lora-kohya", "checkpoint", "exclusion-state", "text"]


@pytest.mark.parametrize("writer", WRITERS)
def test_failed_write_leaves_nothing_under_the_final_name(lora_setup, tmp_path, monkeypatch, writer):
    folder = tmp_path / "out"
    folder.mkdir()
    path = folder / f"{writer}.safetensors"
    writers = _writers(lora_setup, tmp_path)
    _fail(monkeypatch)
    with pytest.raises(DiskFull):
        writers[writer](path)
    assert not path.exists(), "a half-written file appeared under the final name"
    assert list(folder.iterdir()) == [], f"temporary left behind: {list(folder.iterdir())}"


@pytest.mark.parametrize("writer", WRITERS)
def test_failed_overwrite_keeps_the_previous_file(lora_setup, tmp_path, monkeypatch, writer):
    folder = tmp_path / "out"
    folder.mkdir()
    path = folder / f"{writer}.safetensors"
    _writers(lora_setup, tmp_path)[writer](path)
    good = path.read_bytes()
    assert len(good) > 0
    _fail(monkeypatch)
    with pytest.raises(DiskFull):
        _writers(lora_setup, tmp_path)[writer](path)
    assert path.read_bytes() == good, "the previous file was damaged by a failed overwrite"
    assert sorted(p.name for p in folder.iterdir()) == [path.name]



# --- a real crash: SIGKILL while the bytes are going out ------------------------------------------------
CHILD = r"""
import sys, time
from pathlib import Path
import torch
import safetensors.torch as st
from concept_exclusion.safeio import write_safetensors

real = st.save_file
def slow_save(tensors, filename, metadata=None):
    real(tensors, filename, metadata=metadata)
    data = Path(filename).read_bytes()
    Path(filename).write_bytes(data[: len(data) // 2])   # half the file is on disk ...
    Path(sys.argv[2]).write_text("half")                   # ... tell the parent, and wait to be killed
    time.sleep(60)
st.save_file = slow_save
write_safetensors(sys.argv[1], {"w": torch.ones(256, 256)}, {"k": "v"})
"""


def test_sigkill_during_a_write(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    final, flag = folder / "lora.safetensors", tmp_path / "flag"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(final), str(flag)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not flag.exists():
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the child never started writing"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    assert not final.exists(), "a half-written file is visible under the final name after a crash"
    leftovers = list(folder.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".lora.safetensors.") \
        and leftovers[0].name.endswith(".tmp"), leftovers  # the hidden temporary of the killed write


# --- every write in the package goes through a temporary name ---------------------------------------------
WRITE_METHODS = {"write_text", "write_bytes", "save_file", "save", "save_pretrained", "savefig", "to_csv",
                 "save_weights", "dump"}
# (file, function) -> why a direct write is acceptable there
ALLOWED = {
    ("plugin/safeio.py", "atomic_path"): "implements the temporary-and-rename itself (fsync of the temporary)",
    ("plugin/safeio.py", "write_safetensors"): "writes to the atomic_path temporary",
    ("plugin/testing/tiny.py", "write_clip_tokenizer"): "test/demo fixture files, regenerated on every run",
    ("plugin/testing/tiny.py", "clip_tokenizer"): "test/demo fixture files, regenerated on every run",
    ("plugin/testing/tiny.py", "clipseg_folder"): "test fixture files (a tiny random segmenter), regenerated on every run",
    ("plugin/testing/tiny_mmdit.py", "t5_tokenizer"): "test fixture files, regenerated on every run",
    ("integrations/train/run.py", "_setup_log"): "train.log is an append-only log stream, not an artifact",
    ("integrations/kohya/network.py", "save_weights"): "the base network writes to a mkstemp temporary, renamed with "
                                               "os.replace after fsync (checked in test_kohya_save_is_atomic)",
}


def _atomic_targets(tree: ast.AST) -> set[str]:
    """Names bound by ``with atomic_path(...) as NAME`` or ``with atomic_folder(...) as NAME``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.With):
            for item in node.items:
                call = item.context_expr
                helpers = ("atomic_path", "atomic_folder")
                if isinstance(call, ast.Call) and (getattr(call.func, "id", None) in helpers
                                                   or getattr(call.func, "attr", None) in helpers):
                    if isinstance(item.optional_vars, ast.Name):
                        names.add(item.optional_vars.id)
    return names


def _names_in(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def direct_writes(source: str, rel: str) -> list[str]:
    """Writes whose destination is not an atomic_path temporary (outside the allowed functions)."""
    tree = ast.parse(source)
    atomic = _atomic_targets(tree)
    found = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            fn = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call):
                what = None
                # bare write_text(...) is safeio.write_text (atomic); a bare save_file is safetensors'
                method = child.func.attr if isinstance(child.func, ast.Attribute) else \
                    child.func.id if isinstance(child.func, ast.Name) and child.func.id == "save_file" else None
                receiver = child.func.value if isinstance(child.func, ast.Attribute) else None
                if method in WRITE_METHODS and not (method == "save" and receiver is not None
                                                    and "subspace" in ast.unparse(receiver)):
                    # ConceptSubspace.save is write_safetensors underneath (tested above, writer 'subspace')
                    dest = (_names_in(receiver) if receiver is not None else set()) | \
                        (_names_in(child.args[0]) if child.args else set())
                    if method == "save_file" and len(child.args) > 1:
                        dest = _names_in(child.args[1])
                    if method == "dump" and getattr(receiver, "id", "") != "json":
                        dest = atomic  # only json.dump to a handle is a write we track
                    if not dest & atomic:
                        what = f"{ast.unparse(child.func)}(...)"
                elif isinstance(child.func, ast.Name) and child.func.id == "open" and len(child.args) > 1:
                    mode = child.args[1]
                    if isinstance(mode, ast.Constant) and set(str(mode.value)) & set("wax+") \
                            and not _names_in(child.args[0]) & atomic:
                        what = f"open(..., {mode.value!r})"
                elif isinstance(child.func, (ast.Name, ast.Attribute)) and \
                        (getattr(child.func, "id", None) or getattr(child.func, "attr", None)) == "FileHandler":
                    what = "logging.FileHandler(...)"
                if what and (rel, fn) not in ALLOWED:
                    found.append(f"{rel}:{child.lineno} in {fn or '<module>'}: {what}")
            visit(child, fn)

    visit(tree, "")
    return found


def test_no_direct_writes_in_the_package():
    files = sorted(p for d in ("plugin", "integrations") for p in (ROOT / d).rglob("*.py"))
    problems = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        problems += direct_writes(path.read_text(encoding="utf-8"), rel)
    assert not problems, "writes that bypass atomic_path:\n" + "\n".join(problems)


@pytest.mark.parametrize("snippet, caught", [
    ("def f(p):\n    p.write_text('x')", True),
    ("def f(p, t):\n    save_file(t, str(p))", True),
    ("def f(p):\n    with open(p, 'w') as fh:\n        fh.write('x')", True),
    ("def f(img, p):\n    img.save(p)", True),
    ("def f(p):\n    with atomic_path(p) as tmp:\n        tmp.write_text('x')", False),
    ("def f(p, t):\n    with atomic_path(p) as tmp:\n        save_file(t, str(tmp))", False),
    ("def f(p):\n    with open(p, 'rb') as fh:\n        fh.read()", False),
])
def test_write_scanner(snippet, caught):
    assert bool(direct_writes(snippet, "x.py")) is caught


@pytest.mark.parametrize("overwrite", [False, True])
def test_kohya_save_is_atomic(sd, tmp_path, monkeypatch, overwrite):
    """The kohya network wrapper lets the base network (here LyCORIS) write a temporary, then renames it."""
    from concept_exclusion.integrations import kohya

    preset = tmp_path / "logo.toml"
    preset.write_text(make_preset().toml_text, encoding="utf-8")
    unet = sd.unet()
    net = kohya.create_network(1.0, 4, 1.0, None, sd.text_encoder, unet, dropout=None, concept_preset=str(preset),
                               base_network="lycoris.kohya", preset="attn-mlp", concept_tokenizer=str(sd.root))
    net.apply_to(sd.text_encoder, unet, False, True)
    folder = tmp_path / "out"
    folder.mkdir()
    path = folder / "lora.safetensors"
    if overwrite:
        net.save_weights(str(path), None, {})
    before = path.read_bytes() if overwrite else None
    real = net.base_network.save_weights

    def half(file, dtype, metadata):
        real(file, dtype, metadata)
        data = Path(file).read_bytes()
        Path(file).write_bytes(data[:len(data) // 2])
        raise DiskFull(28, "No space left on device")

    monkeypatch.setattr(net.base_network, "save_weights", half)
    with pytest.raises(DiskFull):
        net.save_weights(str(path), None, {})
    if overwrite:
        assert path.read_bytes() == before
        assert [p.name for p in folder.iterdir()] == [path.name]
    else:
        assert list(folder.iterdir()) == []
