"""Files we write get the mode a plain ``open`` would give them (0666 less the umask), not mkstemp's 0600."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from concept_exclusion.safeio import write_safetensors, write_text


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_text(tmp_path / "a.txt", "x")
        write_safetensors(tmp_path / "b.safetensors", {"t": torch.zeros(1)}, {})
    finally:
        os.umask(old)
    for name in ("a.txt", "b.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
