"""One interface for everything the exclusion installs: gradient tensor hooks, FSDP post-accumulate hooks,
the optimizer's post-step hook and the context projection's forward pre-hooks.

Modelled on accelerate's ``ModelHook`` with ``add_hook_to_module`` / ``remove_hook_from_module``:
a ``Hook`` knows how to install itself (``_install`` returns torch's removable handles) and
``attach`` / ``detach`` are the only ways in and out.

Invariants: a hook is inert until ``attach`` (constructing or registering one installs nothing);
``attach`` on an attached hook changes nothing; after ``detach`` no callback of the
hook runs, ``attached`` is False and it holds no handle; ``attach`` after ``detach`` installs it
again exactly as before. ``Hooks`` attaches its members in order and detaches them in reverse.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Callable, Iterator

from concept_exclusion.errors import TargetError

log = logging.getLogger(__name__)


class Hook(ABC):
    """Something installed on tensors, modules or an optimizer that can be removed again (see module doc)."""

    def __init__(self) -> None:
        self._handles: list = []
        self._attached = False

    @abstractmethod
    def _install(self) -> list:
        """Install the callbacks; return their removable handles (possibly none)."""

    def attach(self) -> "Hook":
        if not self._attached:
            self._handles = list(self._install())
            self._attached = True
        return self

    def detach(self) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        self._handles = []
        self._attached = False

    @property
    def attached(self) -> bool:
        return self._attached

    @property
    def handles(self) -> int:
        """How many callbacks are installed now (0 when detached)."""
        return len(self._handles)


def innermost_optimizer(optimizer):
    """The torch optimizer under wrappers (accelerate's AcceleratedOptimizer, ...) whose step really runs."""
    seen = 0
    while hasattr(optimizer, "optimizer") and seen < 8 and optimizer.optimizer is not optimizer:
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


class OptimizerPostStep(Hook):
    """``callback()`` after every real step of ``optimizer`` (a skipped step, e.g. by a grad scaler, runs nothing)."""

    def __init__(self, optimizer, callback: Callable[[], None]) -> None:
        super().__init__()
        self.optimizer = innermost_optimizer(optimizer)
        if not hasattr(self.optimizer, "register_step_post_hook"):
            raise TargetError(f"{type(self.optimizer).__name__} has no register_step_post_hook; call "
                              f"exclusion.after_optimizer_step() after each optimizer step instead")
        self._callback = callback

    def _install(self) -> list:
        return [self.optimizer.register_step_post_hook(lambda *_: self._callback())]


class Hooks:
    """Named hooks attached in order and detached in reverse; ``attached`` when any member is."""

    def __init__(self) -> None:
        self._members: dict[str, Hook] = {}

    def add(self, name: str, hook: Hook) -> Hook:
        """Register ``hook`` under ``name`` without installing it (``attach`` does); one already there is
        detached and replaced."""
        old = self._members.pop(name, None)
        if old is not None:
            old.detach()
        self._members[name] = hook
        return hook

    def get(self, name: str) -> Hook | None:
        return self._members.get(name)

    def remove(self, name: str) -> None:
        """Detach and forget the hook named ``name`` (nothing when there is none)."""
        hook = self._members.pop(name, None)
        if hook is not None:
            hook.detach()

    def detach(self) -> None:
        for hook in reversed(list(self._members.values())):
            hook.detach()

    def attach(self) -> None:
        for hook in self._members.values():
            hook.attach()

    def __iter__(self) -> Iterator[tuple[str, Hook]]:
        return iter(list(self._members.items()))

    @property
    def attached(self) -> bool:
        return any(h.attached for h in self._members.values())
