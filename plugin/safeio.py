"""Reading and writing files safely: safetensors only, validated before use, written atomically.

Invariants: nothing here unpickles; a file is only ever visible under its final name complete
(written to a temporary name in the same folder, flushed, then renamed) with the mode a plain
``open`` would give it (0666 less the umask, e.g. 0644), not ``mkstemp``'s 0600; a malformed file
raises ``SafetensorsFileError`` with one line naming the file and the fault. ``read_header`` is the
one reader of headers (``inspect``, ``audit``, loading): it accepts exactly what the safetensors
library accepts (no duplicate keys, tensors packed back to back over the whole data section).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from concept_exclusion.errors import SafetensorsFileError

MAX_HEADER_BYTES = 100_000_000
MAX_DIM = 2 ** 40  # no real tensor has a dimension this large; larger ones overflow torch's storage maths
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_DTYPES = set(_DTYPE_BYTES)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it is renamed to ``path`` (replacing an existing one
    only with ``replace``), so the folder appears with all its files or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o777 & ~_umask())
        if replace and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif replace and path.exists():
            path.unlink()
        os.replace(tmp_path, path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (else set and restored at once)."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    current = os.umask(0o022)
    os.umask(current)
    return current


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Atomically write ``tensors`` with string-only ``metadata``."""
    from safetensors.torch import save_file

    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise SafetensorsFileError(f"{path}: metadata values must be strings (key {bad[0]!r})")
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def read_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Validate a safetensors header; return (tensor entries, metadata). Reads no tensor data."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise SafetensorsFileError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise SafetensorsFileError(f"{path}: header of {n} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + n > size:
                raise SafetensorsFileError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
            raw = fh.read(n)
    except OSError as exc:
        raise SafetensorsFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError, huge integers, deep nesting
        reason = str(exc) if isinstance(exc, _DuplicateKey) else exc.__class__.__name__
        raise SafetensorsFileError(f"{path}: header is not valid JSON ({reason})") from None
    if not isinstance(header, dict):
        raise SafetensorsFileError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SafetensorsFileError(f"{path}: __metadata__ is not an object")
    for k, v in metadata.items():
        if not isinstance(v, str):
            raise SafetensorsFileError(f"{path}: metadata value of {k!r} is not a string")
    data_len = size - 8 - n
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES \
                or not isinstance(entry.get("shape"), list) or not isinstance(entry.get("data_offsets"), list) \
                or len(entry["data_offsets"]) != 2:
            raise SafetensorsFileError(f"{path}: tensor {name!r} has a malformed header entry")
        begin, end = entry["data_offsets"]
        if not (_is_int(begin) and _is_int(end) and 0 <= begin <= end <= data_len):
            raise SafetensorsFileError(f"{path}: tensor {name!r} lies outside the file's data")
        shape = entry["shape"]
        if len(shape) > 8 or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape):
            raise SafetensorsFileError(f"{path}: tensor {name!r} has an impossible shape {str(shape)[:80]}")
        if math.prod(max(d, 1) for d in shape) > MAX_DIM \
                or math.prod(shape) * _DTYPE_BYTES[entry["dtype"]] != end - begin:
            raise SafetensorsFileError(f"{path}: tensor {name!r} has shape {shape} {entry['dtype']} but "
                                       f"{end - begin} bytes of data")
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise SafetensorsFileError(f"{path}: tensor {name!r} {'overlaps another' if begin < position else 'leaves a gap'}"
                                       f" in the data (offset {begin}, expected {position})")
        position = end
    if position != data_len:
        raise SafetensorsFileError(f"{path}: the tensors cover {position} of the {data_len} data bytes")
    return header, metadata


class _DuplicateKey(ValueError):
    """A JSON object names one key twice (safetensors refuses such a header)."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"duplicate key {key[:80]!r}")
        out[key] = value
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor of a validated safetensors file on the CPU; return (tensors, metadata)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _, metadata = read_header(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise SafetensorsFileError(f"{path}: unreadable tensor data ({first})") from None
    return tensors, metadata
