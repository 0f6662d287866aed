"""Writing the world's files whole or not at all: a temporary beside the target, moved onto it at the end."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``; it replaces ``path`` when the block ends, and is removed if it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(doc: dict, path: Path) -> None:
    """``doc`` as indented JSON (non-JSON numbers as floats), written whole."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=1, default=float) + "\n", encoding="utf-8")
