"""Trusted bases that installed packages provide by name (``--base NAME``), through the entry-point group
``concept_exclusion.audit_bases``: each entry point is a function taking no arguments and returning a
``BaseModel`` (made with ``audit.base.base_model``, its ``denoising`` set for the behavioural check).

Invariant: a model file or model folder always means itself; a name is looked up only when no model is at that
path (a source folder that happens to share the name does not hide the registered base).
"""

from __future__ import annotations

from importlib.metadata import entry_points

from concept_exclusion.audit.base_model import BaseModel
from concept_exclusion.errors import AuditError, ConceptExclusionError

GROUP = "concept_exclusion.audit_bases"


def registered() -> dict[str, object]:
    """Name -> entry point of every registered base."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def load_named(name: str) -> BaseModel:
    """The registered base ``name``; ``AuditError`` when there is none, or it fails to load."""
    found = registered().get(name)
    if found is None:
        known = ", ".join(sorted(registered())) or "none installed"
        raise AuditError(f"--base {name}: no such folder or file, nor a registered base name (registered: {known})")
    try:
        base = found.load()()
    except ConceptExclusionError as exc:
        raise AuditError(f"--base {name}: {exc}") from None
    if not isinstance(base, BaseModel):
        raise AuditError(f"--base {name}: the registered base ({found.value}) returned {type(base).__name__}, "
                         f"not a BaseModel")
    return base
