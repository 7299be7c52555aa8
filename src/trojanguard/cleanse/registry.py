"""The cleansers the ``trojanguard cleanse --method`` option offers, by name: a second method is one
``register_cleanser`` call (the command takes its choices, help text and per-method options from ``CLEANSERS``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, fields

from trojanguard.cleanse.base import Cleanser
from trojanguard.cleanse.bcu import BCU, BCUConfig
from trojanguard.cleanse.cleanclip import CleanCLIP, CleanCLIPConfig
from trojanguard.cleanse.mimic import MIMIC, MIMICConfig
from trojanguard.cleanse.ubt import UBT, UBTConfig


@dataclass(frozen=True)
class RegisteredCleanser:
    """A cleanser the command can run. ``build(**settings) -> Cleanser`` receives the options of ``options`` that
    the user gave on the command line (the others keep ``config``'s defaults) and ``init`` (a factory of the
    architecture, for fresh weights). ``config``: the method's frozen config dataclass, whose fields named in
    ``options`` become the command's ``--<field>`` options, with their defaults, help and choices."""

    name: str
    display_name: str
    summary: str
    build: Callable[..., Cleanser]
    config: type | None = None
    options: tuple[str, ...] = ()


CLEANSERS: dict[str, RegisteredCleanser] = {}


def register_cleanser(name: str, build: Callable[..., Cleanser], summary: str, *, display_name: str | None = None,
                      config: type | None = None, options: Sequence[str] | None = None) -> None:
    """Make ``name`` a choice of ``trojanguard cleanse --method``; ``display_name`` is how the command's messages
    call it (default: ``name``). ``options``: the fields of ``config`` offered on the command line (default: every
    field with a default)."""
    if options is None:
        options = () if config is None else tuple(f.name for f in fields(config)
                                                   if f.default is not MISSING or f.default_factory is not MISSING)
    elif config is None and options:
        raise ValueError(f"options: command-line options come from a config dataclass; expected config=, got "
                         f"options {tuple(options)} without one")
    known = {f.name for f in fields(config)} if config is not None else set()
    unknown = [o for o in options if o not in known]
    if unknown:
        raise ValueError(f"options: expected fields of {config.__name__}, got {unknown}")
    CLEANSERS[name] = RegisteredCleanser(name, display_name or name, summary, build, config, tuple(options))


register_cleanser("bcu", BCU, "Backdoor Cleansing with Unlabeled data: re-initialise part of the weights by depth, "
                  "distil the model from itself", display_name="BCU", config=BCUConfig,
                  options=("reinit", "intact_paths", "epochs", "lr", "batch_size", "augment", "view_target", "norm_stats",
                           "loss", "seed"))


register_cleanser("mimic", MIMIC, "MIMIC: distil a self-supervised encoder into a random student, attention "
                  "weighted by mutual information (an encoder: --model without its head)", display_name="MIMIC",
                  config=MIMICConfig, options=("epochs", "lr", "batch_size", "mi_source", "mi_epochs", "stages",
                                               "clone_weight", "seed"))


register_cleanser("ubt", UBT, "UBT: find the suspicious image–caption pairs of the (poisoned) fine-tuning set, unlearn "
                  "them in token-level parameters only (an image–text model: --arch tiny_clip or open_clip:<name>, "
                  "--data pairs)", display_name="UBT", config=UBTConfig,
                  options=("suspicious_fraction", "perturbations", "overfit_epochs", "unfreeze", "epochs", "lr",
                           "retain_loss", "retain_weight", "seed"))


register_cleanser("cleanclip", CleanCLIP, "CleanCLIP: fine-tune an image–text model with CLIP's loss plus in-modal "
                  "self-supervision (UBT's baseline; best with clean pairs)", display_name="CleanCLIP",
                  config=CleanCLIPConfig, options=("epochs", "lr", "inmodal_weight", "seed"))
