"""Two versions of the twelve-family pool's draw files — the same screened sets, some member rescored with a change
(``detect_families.py --rescore``) — compared as the default ensemble reads them, in sample and leave one family out.

For each implanted family setting: the default's AUROC on version A and on version B (members and fused row as
``fusion_weights.py``'s regimes). Leave one family out: for each held-out family, the version with the better mean
AUROC on the other families' settings (ties: the better worst, then A) scores it.

    python benchmarks/compare_pools.py OLD_DIR NEW_DIR [--regime label-free]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from fusion_weights import REGIMES, evaluate, held_out_choice, implanted_units, plain_mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="draw files, version A (e.g. before the change)")
    parser.add_argument("b", type=Path, help="draw files, version B")
    parser.add_argument("--regime", choices=sorted(REGIMES), default="labelled")
    parser.add_argument("--draws", type=int, nargs="+", default=[0, 1, 2, 3])
    args = parser.parse_args()
    members, rule = REGIMES[args.regime]
    totals = {"A": [], "B": [], "held out": []}
    chosen = {"A": 0, "B": 0}
    for draw in args.draws:
        tables = {v: evaluate(implanted_units(d, draw, members), plain_mean, rule) for v, d in (("A", args.a),
                                                                                                  ("B", args.b))}
        if tables["A"].keys() != tables["B"].keys():
            raise SystemExit(f"draw {draw}: the two versions hold different implanted settings")
        changed = []
        picks = held_out_choice(tables)
        for unit, (_, a) in tables["A"].items():
            b, pick = tables["B"][unit][1], picks[unit]
            chosen[pick] += 1
            totals["A"].append(a)
            totals["B"].append(b)
            totals["held out"].append(tables[pick][unit][1])
            if abs(a - b) >= 0.005 or min(a, b) < 0.95:
                changed.append(f"{unit} {a:.3f} → {b:.3f}{'' if pick == 'B' else ' (held out: A)'}")
        print(f"draw {draw}: " + "; ".join(changed))
    for name, values in totals.items():
        values = np.array(values)
        print(f"{name:9s}: ≥ 0.95 on {int((values >= 0.95).sum())} of {len(values)}, ≥ 0.9 on "
              f"{int((values >= 0.9).sum())}, mean {values.mean():.4f}, worst {values.min():.3f}")
    print(f"leave one family out chose A in {chosen['A']} folds, B in {chosen['B']}")


if __name__ == "__main__":
    main()
