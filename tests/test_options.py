"""Settings checked in one place: the boolean words and the mode/strength rules every entry point shares."""

from __future__ import annotations

import pytest

from concept_exclusion import TargetError
from concept_exclusion.options import check_mode_strength, parse_bool


@pytest.mark.parametrize("word, value", [("true", True), ("Yes", True), (" on ", True), ("1", True), (True, True),
                                         ("false", False), ("NO", False), ("off", False), ("0", False), (False, False)])
def test_boolean_words(word, value):
    assert parse_bool(word) is value


def test_empty_and_bad_words():
    assert parse_bool("", empty=False) is False and parse_bool("  ", empty=True) is True
    for bad in ("", "maybe", "2"):
        with pytest.raises(ValueError, match="expected true or false"):
            parse_bool(bad)


def test_mode_and_strength_rules():
    check_mode_strength(None, None)
    check_mode_strength("gradient", 0.5)
    check_mode_strength("exact", 1.0)
    with pytest.raises(TargetError, match="mode must be one of exact, gradient"):
        check_mode_strength("approx", None, error=TargetError)
    with pytest.raises(TargetError, match=r"--concept_strength must be in \[0, 1\], got 2"):
        check_mode_strength("gradient", 2, strength_name="--concept_strength", error=TargetError)
    with pytest.raises(TargetError, match="applies to mode=gradient only"):
        check_mode_strength("exact", 0.5, error=TargetError)
