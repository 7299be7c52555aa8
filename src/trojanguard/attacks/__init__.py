"""Attack zoo for evaluation: poison a labelled dataset, and trigger any input.

Every attack is a frozen-config object with ``apply(x) -> x_triggered`` (deterministic for its seed)
and ``poison(dataset, rate, target, seed) -> PoisonedDataset``. Attacks whose test-time trigger differs from the
poisoning one (SIG, the adaptive attacks) also have ``apply_test(x, seed)``. The families beyond the first five
are listed in docs/attacks.md.
"""

from trojanguard.attacks.adaptive import AdaptiveBlend, AdaptivePatch
from trojanguard.attacks.base import Attack, PoisonedDataset
from trojanguard.attacks.clean_label import LabelConsistent
from trojanguard.attacks.frequency import FTrojan, LowFrequency
from trojanguard.attacks.physical import ColourFilter, PhysicalPatch, Reflection
from trojanguard.attacks.quantisation import BppAttack
from trojanguard.attacks.sample_specific import ISSBA, InputAware
from trojanguard.attacks.source_specific import SourceSpecific
from trojanguard.attacks.triggers import SIG, BadNets, Blended, Trojan, WaNet

ATTACKS: dict[str, type[Attack]] = {
    "badnets": BadNets,
    "blended": Blended,
    "sig": SIG,
    "wanet": WaNet,
    "trojan": Trojan,
    "issba": ISSBA,
    "lowfreq": LowFrequency,
    "filter": ColourFilter,
    "refool": Reflection,
    "adaptive_blend": AdaptiveBlend,
    "label_consistent": LabelConsistent,
    "ftrojan": FTrojan,
    "patch_random": PhysicalPatch,
    "input_aware": InputAware,
    "adaptive_patch": AdaptivePatch,
    "bpp": BppAttack,
    "tact": SourceSpecific,
}
FAMILIES = ("issba", "lowfreq", "filter", "refool", "adaptive_blend", "label_consistent", "ftrojan", "patch_random",
            "input_aware", "adaptive_patch", "bpp", "tact")  # beyond the first five (issue 15; bpp, tact added later)


def make_attack(name: str, **kwargs) -> Attack:
    """Build an attack by its name in :data:`ATTACKS` (``badnets``, ``blended``, ``sig``, ``issba``, …)."""
    try:
        cls = ATTACKS[name.lower()]
    except KeyError:
        raise ValueError(f"attack: unknown name {name!r}; expected one of {sorted(ATTACKS)}") from None
    return cls(**kwargs)


__all__ = ["ATTACKS", "FAMILIES", "ISSBA", "SIG", "AdaptiveBlend", "AdaptivePatch", "Attack", "BadNets", "Blended",
           "BppAttack", "ColourFilter", "FTrojan", "InputAware", "LabelConsistent", "LowFrequency", "PhysicalPatch",
           "PoisonedDataset", "Reflection", "SourceSpecific", "Trojan", "WaNet", "make_attack"]
