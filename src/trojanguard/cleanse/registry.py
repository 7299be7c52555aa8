"""The cleansers the ``trojanguard cleanse --method`` option offers, by name: a second method is one
``register_cleanser`` call (the command takes its choices and help text from ``CLEANSERS``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from trojanguard.cleanse.base import Cleanser
from trojanguard.cleanse.bcu import BCU


@dataclass(frozen=True)
class RegisteredCleanser:
    """A cleanser the command can run. ``build(**settings) -> Cleanser`` receives the command's settings as
    keyword arguments: reinit, epochs, lr, batch_size, augment, norm_stats, loss, seed and init (a factory of
    the architecture, for fresh weights)."""

    name: str
    display_name: str
    summary: str
    build: Callable[..., Cleanser]


CLEANSERS: dict[str, RegisteredCleanser] = {}


def register_cleanser(name: str, build: Callable[..., Cleanser], summary: str, *,
                      display_name: str | None = None) -> None:
    """Make ``name`` a choice of ``trojanguard cleanse --method``; ``display_name`` is how the command's
    messages call it (default: ``name``)."""
    CLEANSERS[name] = RegisteredCleanser(name, display_name or name, summary, build)


register_cleanser("bcu", BCU, "Backdoor Cleansing with Unlabeled data: re-initialise part of the weights by depth, "
                  "distil the model from itself", display_name="BCU")
