"""Attack zoo for evaluation: poison a labelled dataset, and trigger any input.

Every attack is a frozen-config object with ``apply(x) -> x_triggered`` (deterministic for its seed)
and ``poison(dataset, rate, target, seed) -> PoisonedDataset``.
"""

from trojanguard.attacks.base import Attack, PoisonedDataset
from trojanguard.attacks.triggers import SIG, BadNets, Blended, Trojan, WaNet

ATTACKS: dict[str, type[Attack]] = {
    "badnets": BadNets,
    "blended": Blended,
    "sig": SIG,
    "wanet": WaNet,
    "trojan": Trojan,
}


def make_attack(name: str, **kwargs) -> Attack:
    """Build an attack by name (``badnets``, ``blended``, ``sig``, ``wanet``, ``trojan``)."""
    try:
        cls = ATTACKS[name.lower()]
    except KeyError:
        raise ValueError(f"attack: unknown name {name!r}; expected one of {sorted(ATTACKS)}") from None
    return cls(**kwargs)


__all__ = ["ATTACKS", "SIG", "Attack", "BadNets", "Blended", "PoisonedDataset", "Trojan", "WaNet", "make_attack"]
