"""Concept presets: strict TOML documents that say which concept to exclude and how.

A preset is data only. Loading one never imports, executes or opens anything but the one
file named (or a preset shipped in ``concept_exclusion.presets``); the exemplar images it may pin are read only
when asked for (``concept_exclusion.concept.exemplars``). Its size is bounded: at most
``MAX_PRESET_BYTES`` of TOML and ``MAX_TEXTS`` prompt x template combinations in all (each one is
encoded by the text encoder(s); 10,000 prompts took 78 s and 3.8 GB on a tiny encoder).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from concept_exclusion.concept.exemplars import MAX_EXEMPLARS, REGION_TREATMENTS, ExemplarFile, Exemplars
from concept_exclusion.errors import PresetError
from concept_exclusion.model.roles import target_sets

TOKEN_OPTIONS = ("concept", "all", "contrastive", "contrastive+concept")
MODES = ("exact", "gradient")
OUTPUT_PRESERVATION = ("none", "scrub", "base")
DEFAULT_TEMPLATES = ("{}", "a photo of {}", "an image of {}", "a picture with {}", "{} in a scene")
DEFAULT_NEUTRAL = "something"
MAX_PRESET_BYTES = 1_000_000
MAX_TEXTS = 2048
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_RELATIVE_PATH = re.compile(r"^(?!/)(?!.*(?:^|/)\.\.(?:/|$))[A-Za-z0-9._/ -]{1,256}$")


@dataclass(frozen=True)
class Concept:
    """One concept: its names and paraphrases, the templates they are placed in, and a neutral stand-in."""

    name: str
    prompts: tuple[str, ...]
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    neutral: str = DEFAULT_NEUTRAL

    def texts(self) -> list[tuple[str, str, str]]:
        """Every (template, prompt, neutral text) combination, in a fixed order."""
        return [(t, p, t.replace("{}", self.neutral)) for p in self.prompts for t in self.templates]


@dataclass(frozen=True)
class Projection:
    """How the subspace is built and applied."""

    energy: float = 0.99
    max_rank: int = 128
    tokens: str = "all"
    targets: tuple[str, ...] = ("attention",)
    mode: str = "exact"
    strength: float = 1.0
    # also remove the basis from the text states the readers take in training; None: the model's default (on for an
    # MMDiT, where no weight constraint inside the joint blocks can keep the concept out, off otherwise)
    project_context: bool | None = None
    # the training loss: captions that name a concept teach the image through the scrubbed caption, and the name is
    # pulled to the scrubbed caption's prediction ("scrub") or to the frozen base model's ("base"); see preservation.py
    output_preservation: str = "none"
    preservation_weight: float = 1.0

    def overridden(self, *, mode: str | None = None, strength: float | None = None,
                   targets: str | Sequence[str] | None = None, project_context: bool | None = None) -> "Projection":
        """A copy with the given settings changed (None keeps this one's); ``targets`` may name one set."""
        changes: dict[str, Any] = {}
        if mode is not None:
            changes["mode"] = mode
            if mode == "exact" and strength is None:  # exact mode always projects fully
                changes["strength"] = 1.0
        if strength is not None:
            changes["strength"] = float(strength)
        if targets is not None:
            changes["targets"] = (targets,) if isinstance(targets, str) else tuple(targets)
        if project_context is not None:
            changes["project_context"] = bool(project_context)
        return replace(self, **changes)


@dataclass(frozen=True)
class Preset:
    """A validated preset. ``sha256`` hashes the canonical content, not the file's bytes."""

    name: str
    version: str
    description: str
    concepts: tuple[Concept, ...]
    preserve: tuple[Concept, ...] = ()
    projection: Projection = field(default_factory=Projection)
    license: str | None = None
    author: str | None = None
    source: str = "<string>"
    toml_text: str = ""
    exemplars: Exemplars | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(canonical_json(self).encode("utf-8")).hexdigest()


def canonical_json(preset: Preset) -> str:
    """The preset's content as JSON with sorted keys and defaults filled in: equal content, equal text.

    ``project_context`` appears only when true (``output_preservation`` and its weight only when it is not
    "none", ``exemplars`` only when listed), so presets written before they existed keep their hash
    (files record the hash and are checked against it when read back).
    """
    def concept(c: Concept) -> dict[str, Any]:
        return {"name": c.name, "prompts": list(c.prompts), "templates": list(c.templates), "neutral": c.neutral}

    p = preset.projection
    doc = {
        "preset": {"name": preset.name, "version": preset.version, "description": preset.description,
                   "license": preset.license, "author": preset.author},
        "concepts": [concept(c) for c in preset.concepts],
        "preserve": [concept(c) for c in preset.preserve],
        "projection": {"energy": p.energy, "max_rank": p.max_rank, "tokens": p.tokens,
                       "targets": sorted(p.targets), "mode": p.mode, "strength": p.strength},
    }
    if p.project_context:
        doc["projection"]["project_context"] = True
    if p.output_preservation != "none":
        doc["projection"]["output_preservation"] = p.output_preservation
        doc["projection"]["preservation_weight"] = p.preservation_weight
    if preset.exemplars is not None:
        e = preset.exemplars
        doc["exemplars"] = {"files": [{"path": f.path, "sha256": f.sha256} for f in e.files],
                            "threshold": e.threshold, "scales": list(e.scales), "dilate": e.dilate, "region": e.region}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def shipped_presets() -> list[str]:
    """Names of the presets shipped with the package."""
    folder = resources.files("concept_exclusion.presets")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_preset(path_or_name: str | Path) -> Preset:
    """Load a preset from a ``.toml`` path, or a shipped preset by name."""
    text_path = Path(path_or_name)
    if text_path.suffix == ".toml" or text_path.exists():
        try:
            if text_path.stat().st_size > MAX_PRESET_BYTES:
                raise PresetError(f"{text_path}: preset file is larger than {MAX_PRESET_BYTES} bytes")
            data = text_path.read_bytes()
        except OSError as exc:
            raise PresetError(f"{text_path}: cannot read preset file ({exc.strerror or exc})") from None
        return parse_preset(_decode(data, str(text_path)), source=str(text_path))
    name = str(path_or_name)
    if not _NAME_RE.fullmatch(name) or name not in shipped_presets():
        raise PresetError(
            f"{name}: no such preset file, and no shipped preset of that name "
            f"(shipped: {', '.join(shipped_presets()) or 'none'})"
        )
    data = resources.files("concept_exclusion.presets").joinpath(f"{name}.toml").read_bytes()
    return parse_preset(_decode(data, name), source=f"<shipped preset {name}>")


def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PresetError(f"{source}: not UTF-8 text (byte {exc.start})") from None


def parse_preset(text: str, source: str = "<string>") -> Preset:
    """Validate a preset document strictly; any problem raises ``PresetError`` naming ``source`` and the key."""
    if len(text) > MAX_PRESET_BYTES:
        raise PresetError(f"{source}: preset is larger than {MAX_PRESET_BYTES} characters")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(f"{source}: invalid TOML: {str(exc)[:300]}") from None
    except RecursionError:
        raise PresetError(f"{source}: invalid TOML: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise PresetError(f"{source}: invalid TOML: {str(exc)[:200]}") from None
    return _Validator(source).preset(doc, text)


class _Validator:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> PresetError:
        return PresetError(f"{self.source}: {key}: {problem}")

    def table(self, value: Any, key: str, allowed: set[str], required: set[str] = frozenset()) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table, got {_type(value)}")
        for k in value:
            if k not in allowed:
                shown = k if _PLAIN_KEY.fullmatch(k) else json.dumps(k)  # quoted: a key may hold newlines
                raise self.fail(f"{key}.{shown}" if key else shown, f"unknown key (allowed: {', '.join(sorted(allowed))})")
        for k in sorted(required):
            if k not in value:
                raise self.fail(f"{key}.{k}" if key else k, "is required")
        return value

    def string(self, value: Any, key: str, nonempty: bool = True) -> str:
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, got {_type(value)}")
        if nonempty and not value.strip():
            raise self.fail(key, "must not be empty")
        return value

    def strings(self, value: Any, key: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.fail(key, f"must be an array of strings, got {_type(value)}")
        if not value:
            raise self.fail(key, "must not be empty")
        return tuple(self.string(v, f"{key}[{i}]") for i, v in enumerate(value))

    def number(self, value: Any, key: str, lo: float, hi: float, lo_open: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, f"must be a number, got {_type(value)}")
        v = float(value)
        if v != v or v > hi or v < lo or (lo_open and v == lo):
            interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
            raise self.fail(key, f"must be in {interval}, got {value!r}")
        return v

    def integer(self, value: Any, key: str, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be an integer, got {_type(value)}")
        if not lo <= value <= hi:
            raise self.fail(key, f"must be in [{lo}, {hi}], got {value}")
        return value

    def choice(self, value: Any, key: str, options: tuple[str, ...]) -> str:
        v = self.string(value, key)
        if v not in options:
            raise self.fail(key, f"must be one of {', '.join(options)}, got {v!r}")
        return v

    def concept(self, value: Any, key: str, with_neutral: bool) -> Concept:
        allowed = {"name", "prompts", "templates"} | ({"neutral"} if with_neutral else set())
        t = self.table(value, key, allowed, {"name", "prompts"})
        templates = DEFAULT_TEMPLATES
        if "templates" in t:
            templates = self.strings(t["templates"], f"{key}.templates")
            for i, tpl in enumerate(templates):
                if tpl.count("{}") != 1:
                    raise self.fail(f"{key}.templates[{i}]", f"must contain '{{}}' exactly once, got {tpl!r}")
                if re.search(r"\{(?!\})|(?<!\{)\}", tpl):
                    raise self.fail(f"{key}.templates[{i}]", f"has a stray brace besides '{{}}': {tpl!r}")
        neutral = DEFAULT_NEUTRAL
        if "neutral" in t:
            neutral = self.string(t["neutral"], f"{key}.neutral", nonempty=False)
        prompts = self.strings(t["prompts"], f"{key}.prompts")
        return Concept(self.string(t["name"], f"{key}.name"), prompts, templates, neutral)

    def concepts(self, value: Any, key: str, with_neutral: bool) -> tuple[Concept, ...]:
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.fail(key, f"must be an array of tables ([[{key}]]), got {_type(value)}")
        if not value and key == "concepts":
            raise self.fail(key, "must name at least one concept")
        out = tuple(self.concept(v, f"{key}[{i}]", with_neutral) for i, v in enumerate(value))
        names = [c.name for c in out]
        for i, n in enumerate(names):
            if n in names[:i]:
                raise self.fail(f"{key}[{i}].name", f"duplicate concept name {n!r}")
        return out

    def projection(self, value: Any) -> Projection:
        t = self.table(value, "projection", {"energy", "max_rank", "tokens", "targets", "mode", "strength",
                                             "project_context", "output_preservation", "preservation_weight"})
        d = Projection()
        energy = self.number(t["energy"], "projection.energy", 0.0, 1.0, lo_open=True) if "energy" in t else d.energy
        max_rank = self.integer(t["max_rank"], "projection.max_rank", 1, 4096) if "max_rank" in t else d.max_rank
        tokens = self.choice(t["tokens"], "projection.tokens", TOKEN_OPTIONS) if "tokens" in t else d.tokens
        targets = d.targets
        if "targets" in t:
            raw = t["targets"]
            raw = [raw] if isinstance(raw, str) else raw
            targets = tuple(sorted(set(self.strings(raw, "projection.targets"))))
            for i, name in enumerate(targets):
                self.choice(name, f"projection.targets[{i}]", target_sets())
        mode = self.choice(t["mode"], "projection.mode", MODES) if "mode" in t else d.mode
        strength = d.strength
        if "strength" in t:
            strength = self.number(t["strength"], "projection.strength", 0.0, 1.0)
            if mode == "exact" and strength != 1.0:
                raise self.fail("projection.strength", "applies to mode = \"gradient\" only; exact mode always projects fully")
        project_context = d.project_context
        if "project_context" in t:
            if not isinstance(t["project_context"], bool):
                raise self.fail("projection.project_context", f"must be true or false, got {_type(t['project_context'])}")
            project_context = t["project_context"]
        preservation = (self.choice(t["output_preservation"], "projection.output_preservation", OUTPUT_PRESERVATION)
                        if "output_preservation" in t else d.output_preservation)
        weight = (self.number(t["preservation_weight"], "projection.preservation_weight", 0.0, 100.0, lo_open=True)
                  if "preservation_weight" in t else d.preservation_weight)
        return Projection(energy, max_rank, tokens, targets, mode, strength, project_context, preservation, weight)

    def exemplars(self, value: Any) -> Exemplars:
        t = self.table(value, "exemplars", {"files", "threshold", "scales", "dilate", "region"}, {"files"})
        files = t["files"]
        if not isinstance(files, list) or not files or not all(isinstance(f, dict) for f in files):
            raise self.fail("exemplars.files", "must be a non-empty array of tables {path = ..., sha256 = ...}")
        if len(files) > MAX_EXEMPLARS:
            raise self.fail("exemplars.files", f"{len(files)} files; at most {MAX_EXEMPLARS}")
        items = []
        for i, f in enumerate(files):
            key = f"exemplars.files[{i}]"
            f = self.table(f, key, {"path", "sha256"}, {"path", "sha256"})
            path, digest = self.string(f["path"], f"{key}.path"), self.string(f["sha256"], f"{key}.sha256")
            if not _RELATIVE_PATH.fullmatch(path):
                raise self.fail(f"{key}.path", f"must be a relative '/'-separated path inside the preset's folder "
                                               f"(no '..'), got {path!r}")
            if not _SHA256.fullmatch(digest):
                raise self.fail(f"{key}.sha256", f"must be 64 lowercase hex digits, got {digest!r}")
            items.append(ExemplarFile(path, digest))
        d = Exemplars(())
        threshold = self.number(t["threshold"], "exemplars.threshold", 0.0, 1.0, lo_open=True) if "threshold" in t \
            else d.threshold
        scales = d.scales
        if "scales" in t:
            if not isinstance(t["scales"], list) or not t["scales"]:
                raise self.fail("exemplars.scales", f"must be a non-empty array of numbers, got {_type(t['scales'])}")
            scales = tuple(self.number(v, f"exemplars.scales[{i}]", 0.0, 16.0, lo_open=True)
                           for i, v in enumerate(t["scales"]))
        dilate = self.integer(t["dilate"], "exemplars.dilate", 0, 64) if "dilate" in t else d.dilate
        region = self.choice(t["region"], "exemplars.region", REGION_TREATMENTS) if "region" in t else d.region
        return Exemplars(tuple(items), threshold, scales, dilate, region)

    def preset(self, doc: dict, text: str) -> Preset:
        self.table(doc, "", {"preset", "concepts", "preserve", "projection", "exemplars"}, {"preset", "concepts"})
        head = self.table(doc["preset"], "preset", {"name", "version", "description", "license", "author"},
                          {"name", "version", "description"})
        name = self.string(head["name"], "preset.name")
        if not _NAME_RE.fullmatch(name):
            raise self.fail("preset.name", f"must be letters, digits, '.', '_' or '-' (at most 128), got {name!r}")
        version = head["version"]
        if isinstance(version, bool) or not isinstance(version, (str, int)):
            raise self.fail("preset.version", f"must be a string, got {_type(version)}")
        version = self.string(str(version), "preset.version")
        optional = {k: self.string(head[k], f"preset.{k}") for k in ("license", "author") if k in head}
        concepts = self.concepts(doc["concepts"], "concepts", with_neutral=True)
        preserve = self.concepts(doc.get("preserve", []), "preserve", with_neutral=False)
        projection = self.projection(doc.get("projection", {}))
        texts = sum(len(c.prompts) * len(c.templates) for c in concepts + preserve)
        if texts > MAX_TEXTS:
            raise self.fail("concepts", f"{texts} prompt x template combinations (concepts and preserve); at most "
                                        f"{MAX_TEXTS} are encoded: use fewer prompts or templates")
        return Preset(
            name=name, version=version, description=self.string(head["description"], "preset.description", False),
            concepts=concepts, preserve=preserve, projection=projection, source=self.source, toml_text=text,
            exemplars=self.exemplars(doc["exemplars"]) if "exemplars" in doc else None, **optional,
        )


def _type(value: Any) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a float"}.get(type(value), type(value).__name__)
