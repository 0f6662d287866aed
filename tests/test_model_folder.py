"""Reading the text side of a diffusers model folder: SD (one encoder), SDXL (two), and one-line refusals."""

from __future__ import annotations

import pytest

from concept_exclusion.errors import ModelFolderError
from concept_exclusion.model_folder import load_text_encoders
from concept_exclusion.tiny import sd_pipeline, sdxl_pipeline

from conftest import WORDS


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    sd_pipeline(WORDS, root).save_pretrained(root / "sd")
    sdxl_pipeline(WORDS, root).save_pretrained(root / "sdxl")
    return root


def test_one_or_two_frozen_encoders(folders):
    toks, encs = load_text_encoders(folders / "sd")
    assert len(toks) == len(encs) == 1 and not any(p.requires_grad for p in encs[0].parameters())
    toks, encs = load_text_encoders(folders / "sdxl")
    assert len(toks) == len(encs) == 2 and not encs[1].training
    assert type(encs[1]).__name__ == "CLIPTextModelWithProjection"


def test_refusals_name_the_source_in_one_line(folders, tmp_path):
    with pytest.raises(ModelFolderError, match=r"^some-org/some-model: not a diffusers model folder$"):
        load_text_encoders("some-org/some-model", local_files_only=True)
    broken = tmp_path / "broken"
    (broken / "tokenizer").mkdir(parents=True)
    with pytest.raises(ModelFolderError) as info:
        load_text_encoders(broken)
    assert str(info.value).startswith(f"{broken}: cannot load tokenizer/text_encoder (") and "\n" not in str(info.value)
