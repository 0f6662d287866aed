"""Presets are data: fuzzed TOML documents and valid presets with one field broken yield a preset or a
``PresetError`` naming the key, nothing else; no value or key makes the loader import, execute or open
anything but the one preset file (checked with a ``sys.addaudithook`` watcher)."""

from __future__ import annotations

import copy
import json
import os
import math
import re
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from concept_exclusion import Preset, PresetError, load_preset, parse_preset

SOURCE = "fuzz.toml"
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")), deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID = {
    "preset": {"name": "acme", "version": "1", "description": "the acme logo", "license": "CC0-1.0",
               "author": "someone"},
    "concepts": [{"name": "acme", "prompts": ["acme", "acme logo"], "templates": ["{}", "a photo of {}"],
                  "neutral": "brand"},
                 {"name": "acme2", "prompts": ["acme sign"]}],
    "preserve": [{"name": "logos", "prompts": ["a logo"]}],
    "projection": {"energy": 0.95, "max_rank": 16, "tokens": "all", "targets": ["kv"], "mode": "gradient",
                   "strength": 0.5},
}
KNOWN_KEYS = ["preset", "concepts", "preserve", "projection", "name", "version", "description", "license",
              "author", "prompts", "templates", "neutral", "energy", "max_rank", "tokens", "targets", "mode",
              "strength", "include", "import", "module", "path", "file", "extends", "__import__", "plugin"]
HOSTILE = ["__import__('os').system('touch PWNED')", "!!python/object/apply:os.system ['touch PWNED']",
           "/etc/passwd", "../../outside.toml", "file:///etc/passwd", "${HOME}", "$(touch PWNED)", "`touch PWNED`",
           "{0.__class__.__mro__}", "{}.__globals__", "os.system", "subprocess", "outside.toml", "{}{}", "}{"]


# --- a small TOML writer (inline tables and arrays; enough for any JSON-like document) ------------------
def _toml_string(s: str) -> str:
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_string(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def to_toml(doc: dict) -> str:
    return "".join(f"{_toml_string(k)} = {_toml_value(v)}\n" for k, v in doc.items())


def test_writer_round_trips():
    assert tomllib.loads(to_toml(VALID)) == VALID
    assert isinstance(parse_preset(to_toml(VALID), SOURCE), Preset)


# --- strategies ---------------------------------------------------------------------------------------
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
keys = st.one_of(st.sampled_from(KNOWN_KEYS), text)
scalars = st.one_of(text, st.sampled_from(HOSTILE), st.integers(-2 ** 63, 2 ** 63 - 1), st.floats(), st.booleans())
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(keys, inner, max_size=4)), max_leaves=12)


def _key_of(message: str) -> str:
    """The key a PresetError names: '<source>: <key>: <problem>'."""
    assert message.startswith(SOURCE + ": "), message
    rest = message[len(SOURCE) + 2:]
    assert len(message.splitlines()) == 1, f"more than one line: {message!r}"
    return rest.split(": ", 1)[0]


def _parse(text_doc: str):
    try:
        return parse_preset(text_doc, SOURCE)
    except PresetError as exc:
        return exc


@FUZZ
@given(st.dictionaries(keys, values, max_size=6))
def test_any_document_gives_preset_or_preset_error(doc):
    result = _parse(to_toml(doc))
    assert isinstance(result, (Preset, PresetError))
    if isinstance(result, PresetError):
        assert str(result).startswith(SOURCE + ": ") and len(str(result).splitlines()) == 1, str(result)


@FUZZ
@given(st.text(max_size=300))
def test_any_text_gives_preset_or_preset_error(raw):
    result = _parse(raw)
    assert isinstance(result, (Preset, PresetError))
    if isinstance(result, PresetError):
        assert str(result).startswith(SOURCE + ": ") and len(str(result).splitlines()) == 1, str(result)


# --- valid presets with one field broken ----------------------------------------------------------------
STRING_FIELDS = ["preset.name", "preset.description", "preset.license", "preset.author", "concepts[0].name",
                 "concepts[0].neutral", "preserve[0].name", "projection.tokens", "projection.mode"]
NUMBER_FIELDS = {"projection.energy": lambda v: 0.0 < v <= 1.0, "projection.strength": lambda v: 0.0 <= v <= 1.0}
REQUIRED = ["preset", "concepts", "preset.name", "preset.version", "preset.description", "concepts[0].name",
            "concepts[0].prompts", "preserve[0].name", "preserve[0].prompts"]
TABLES = ["", "preset", "concepts[0]", "concepts[1]", "preserve[0]", "projection"]
NOT_STRING = st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(),
                       st.lists(st.integers(), max_size=2), st.dictionaries(st.sampled_from("ab"), st.integers(),
                                                                            max_size=2))


def _split(path: str) -> list:
    parts = []
    for piece in path.split("."):
        m = re.fullmatch(r"(\w+)\[(\d+)\]", piece)
        parts += [m.group(1), int(m.group(2))] if m else [piece]
    return parts


def _set(doc, path: str, value=None, delete: bool = False) -> dict:
    doc = copy.deepcopy(doc)
    parts = _split(path)
    holder = doc
    for p in parts[:-1]:
        holder = holder[p]
    if delete:
        del holder[parts[-1]]
    else:
        holder[parts[-1]] = value
    return doc


@st.composite
def broken(draw):
    """(document, the key path that is broken)."""
    kind = draw(st.sampled_from(["type", "number", "required", "unknown", "choice", "list", "template", "rank",
                                 "name"]))
    if kind == "name":  # preset.name becomes file and metadata text: letters, digits, . _ - only, one line
        value = draw(st.one_of(st.sampled_from(["acme\n", "acme\r\n", "", " acme", "a b", "../acme", "acme/x",
                                                ".acme", "a" * 129, "acme\u2028"]),
                               text.filter(lambda t: not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", t))))
        return _set(VALID, "preset.name", value), "preset.name"
    if kind == "type":
        path = draw(st.sampled_from(STRING_FIELDS + ["preset.version", "concepts[0].prompts",
                                                      "concepts[0].templates", "projection.targets"]))
        value = draw(NOT_STRING)
        if path == "preset.version":
            assume(not isinstance(value, int) or isinstance(value, bool))
        if path in ("concepts[0].prompts", "concepts[0].templates", "projection.targets"):
            assume(not isinstance(value, list))
        return _set(VALID, path, value), path
    if kind == "number":
        path = draw(st.sampled_from(sorted(NUMBER_FIELDS)))
        valid = NUMBER_FIELDS[path]
        value = draw(st.one_of(st.floats().filter(lambda v: not valid(v)), text, st.booleans(),
                               st.lists(st.floats(), max_size=2)))
        return _set(VALID, path, value), path
    if kind == "rank":
        value = draw(st.one_of(st.integers().filter(lambda v: not 1 <= v <= 4096), st.floats(), text,
                               st.booleans()))
        return _set(VALID, "projection.max_rank", value), "projection.max_rank"
    if kind == "required":
        path = draw(st.sampled_from(REQUIRED))
        return _set(VALID, path, delete=True), path
    if kind == "unknown":
        table = draw(st.sampled_from(TABLES))
        key = draw(st.one_of(st.sampled_from(["include", "import", "module", "path", "file", "extends",
                                              "__import__", "plugin", "exec"]), text.filter(bool)))
        holder = VALID
        for p in _split(table) if table else []:
            holder = holder[p]
        assume(key not in holder)
        doc = _set(VALID, f"{table}.{key}" if table else key, draw(values)) if "." not in key and "[" not in key \
            else None
        if doc is None:  # keys with dots/brackets: place them directly
            doc = copy.deepcopy(VALID)
            holder = doc
            for p in _split(table) if table else []:
                holder = holder[p]
            holder[key] = draw(values)
        shown = key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)  # how the loader quotes it
        return doc, f"{table}.{shown}" if table else shown
    if kind == "choice":
        path = draw(st.sampled_from(["projection.tokens", "projection.mode", "projection.targets[0]"]))
        value = draw(st.one_of(text, st.sampled_from(HOSTILE)))
        assume(value not in ("concept", "all", "contrastive", "contrastive+concept", "exact", "gradient", "kv",
                             "attention"))
        if path == "projection.mode":
            return _set(_set(VALID, "projection.strength", 1.0), path, value), path
        return _set(VALID, path, value), path
    if kind == "list":
        path = draw(st.sampled_from(["concepts[0].prompts", "concepts[0].templates", "preserve[0].prompts"]))
        bad = draw(st.sampled_from(["empty", "element", "blank"]))
        if bad == "empty":
            return _set(VALID, path, []), path
        if bad == "blank":
            return _set(VALID, path + "[0]", draw(st.sampled_from(["", "   ", "\t"]))), path
        return _set(VALID, path + "[0]", draw(NOT_STRING)), path
    tpl = draw(st.one_of(st.sampled_from(["no placeholder", "{}{}", "{} and {}", "{0}", "{x} {}", "{} }",
                                          "{0.__class__} {}", "{}.__globals__ {", "{{}}"]),
                         text.filter(lambda t: t.count("{}") != 1)))
    return _set(VALID, "concepts[0].templates[1]", tpl), "concepts[0].templates"


def _names(reported: str, broken_path: str) -> bool:
    """The reported key is the broken one, inside it, or (for an element of an array of tables) its array."""
    if reported == broken_path or reported.startswith(broken_path + ".") or reported.startswith(broken_path + "["):
        return True
    parent = re.sub(r"\[\d+\]$", "", broken_path)
    return parent != broken_path and reported == parent


@FUZZ
@given(broken())
def test_one_broken_field_names_its_key(case):
    doc, path = case
    result = _parse(to_toml(doc))
    assert isinstance(result, PresetError), f"accepted a preset with {path} broken: {doc}"
    key = _key_of(str(result))
    assert _names(key, path), f"broke {path!r}, error names {key!r}: {result}"


# --- data only: no import, exec or foreign file access ------------------------------------------------
_WATCH = {"import", "exec", "compile", "open", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
          "subprocess.Popen", "os.listdir", "os.scandir", "shutil.copyfile", "ctypes.dlopen", "pickle.find_class",
          "marshal.loads", "urllib.Request", "socket.connect", "os.remove", "os.rename"}
_events: list[tuple[str, tuple]] = []
_recording = [False]


def _audit(event: str, args: tuple) -> None:
    if _recording[0] and event in _WATCH:
        _events.append((event, args))


sys.addaudithook(_audit)  # audit hooks cannot be removed; it records only while _recording[0] is True


def _load_watched(path: Path):
    _events.clear()
    _recording[0] = True
    try:
        try:
            result = load_preset(path)
        except PresetError as exc:
            result = exc
    finally:
        _recording[0] = False
    return result, list(_events)


@pytest.fixture(scope="module")
def preset_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    folder = root / "mine"
    folder.mkdir()
    (root / "outside.toml").write_text(to_toml(VALID), encoding="utf-8")
    load_preset_warm = folder / "warm.toml"
    load_preset_warm.write_text(to_toml(VALID), encoding="utf-8")
    load_preset(load_preset_warm)  # import everything the loader legitimately needs once
    return folder


@FUZZ
@given(doc=st.one_of(st.dictionaries(keys, values, max_size=6), broken().map(lambda c: c[0])),
       hostile=st.sampled_from(HOSTILE), where=st.sampled_from(["preset.description", "concepts[0].neutral",
                                                                 "concepts[0].prompts[0]", "preset.author"]))
def test_loading_is_data_only(preset_folder, doc, hostile, where):
    doc = _set(VALID, where, hostile) if not doc else doc
    path = preset_folder / "fuzzed.toml"
    path.write_text(to_toml(doc), encoding="utf-8")
    result, events = _load_watched(path)
    assert isinstance(result, (Preset, PresetError))
    for event, args in events:
        assert event == "open", f"loading a preset raised audit event {event} {args!r}"
        assert Path(str(args[0])).resolve() == path.resolve(), f"loader opened {args[0]!r}"
    assert not (preset_folder / "PWNED").exists() and not Path("PWNED").exists()


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_values_are_plain_strings(preset_folder, hostile):
    """Each hostile value in every string field loads as that literal string (or is refused as a bad template)."""
    doc = _set(_set(VALID, "preset.description", hostile), "concepts[0].prompts[0]", hostile)
    path = preset_folder / "hostile.toml"
    path.write_text(to_toml(doc), encoding="utf-8")
    result, events = _load_watched(path)
    assert isinstance(result, Preset), result
    assert result.description == hostile and result.concepts[0].prompts[0] == hostile
    assert [e for e, _ in events] == ["open"]
    doc = _set(VALID, "concepts[0].templates[0]", hostile)
    path.write_text(to_toml(doc), encoding="utf-8")
    result, events = _load_watched(path)
    assert [e for e, _ in events] == ["open"]
    if hostile.count("{}") == 1 and not re.search(r"\{(?!\})|(?<!\{)\}", hostile.replace("{}", "")):
        assert isinstance(result, Preset) and result.concepts[0].templates[0] == hostile
    else:
        assert isinstance(result, PresetError) and "concepts[0].templates[0]" in str(result)
