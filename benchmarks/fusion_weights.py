"""How the ensemble weighs members that disagree: the default's plain mean of robust z-scores against other ways of
combining the same members' scores, on the stored draw files of the twelve-family pool (no model is run).

Every variant replaces only the mean in ``Ensemble``'s fusion; class concentration, the noise-fragile class (and,
label-free, the noise-stable class at its gate) follow as in the SDK (``detect_families.fused_rows``). Reported per
variant: implanted family settings at AUROC ≥ 0.95 summed over the draws, the worst, and the misses. ``--lofo``
also chooses, per held-out family, the variant with the best mean AUROC on the other families' settings (ties: the
better worst) and scores the held-out family with it.

    python benchmarks/fusion_weights.py                      # labelled default, draw files in benchmarks/detect_draws
    python benchmarks/fusion_weights.py --regime label-free  # label-free default, benchmarks/detect_draws/label_free

The label-free copies are the pool files with ``features``, ``probe`` and ``probe-shallow`` refitted without labels
(the model's predictions instead; every other member reads no labels, so its scores are the labelled files'); RESULTS.md,
"The label-free pool in the repository".
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from detect_families import IMPLANTED_ASR, fused_rows, record_p_value
from scipy.stats import spearmanr

from trojanguard.detect.ensemble import outlier_significance, robust_z
from trojanguard.detect.fragility import ALPHA
from trojanguard.metrics import auroc

REGIMES = {  # the SDK's defaults (LABELLED_MEMBERS / DEFAULT_MEMBERS; "[g]": gated at ALPHA) and their fused row
    "labelled": (("features", "typicality[g]", "probe", "probe-shallow"), "zscore + class"),
    "label-free": (("features", "clustering", "typicality", "probe-shallow"), "zscore + class + stable≤2"),
}


DRAW_DIRS = {"labelled": Path(__file__).parent / "detect_draws",
             "label-free": Path(__file__).parent / "detect_draws" / "label_free"}  # each regime's copy of the pool


def pool_files(draw_dir: Path, draw: int) -> list[Path]:
    """The twelve-family pool of one screened draw: grey digits at that draw, the seed-0 companions (colour digits,
    5 %, 1 %, ResNet-18), BppAttack's and the source-specific family's files of the same settings."""
    companions = ("colour_seed0", "fivepct_seed0", "onepct_seed0", "resnet18_seed0")
    return ([draw_dir / f"grey_seed{draw}.json"] + [draw_dir / f"{n}.json" for n in companions]
            + [draw_dir / "bpp" / f"{n}.json" for n in (f"grey_seed{draw}", *companions)]
            + [draw_dir / "tact" / f"{n}.json" for n in (f"grey_seed{draw}", *companions) if n != "colour_seed0"])


def implanted_units(draw_dir: Path, draw: int, members: tuple[str, ...]) -> list[tuple[str, str, dict, list, torch.Tensor]]:
    """``(unit, family, record, joined members, robust z (n, M))`` of every implanted family setting of a draw."""
    units = []
    for path in pool_files(draw_dir, draw):
        results = json.loads(path.read_text())
        setting = results["setting"].split(", ")[-1]
        for family, record in results["attacks"].items():
            if record["attack_success_rate"] < IMPLANTED_ASR:
                continue
            joined = [m.removesuffix("[g]") for m in members
                      if not (m.endswith("[g]") and record_p_value(record, m.removesuffix("[g]")) >= ALPHA)]
            scores = [torch.tensor(record["scores"][m], dtype=torch.float64) for m in joined]
            units.append((f"{family} @ {setting}", family, record, joined,
                          torch.stack([robust_z(s, s) for s in scores], 1)))
    return units


# ------------------------------------------------------------------ ways of combining the members' robust z-scores
def plain_mean(z, members, record):
    return z.nanmean(1)


def weighted(weights: dict[str, float]):
    def fuse(z, members, record):
        w = torch.tensor([weights.get(m, 1.0) for m in members], dtype=torch.float64)
        return (torch.nan_to_num(z) * w).sum(1) / ((~torch.isnan(z)).double() * w).sum(1)
    return fuse


def clipped_at_zero(z, members, record):
    return z.clamp(min=0).nanmean(1)


def top_mean(k: int):
    def fuse(z, members, record):
        return torch.nan_to_num(z, nan=-math.inf).topk(min(k, z.shape[1]), 1).values.mean(1)
    return fuse


def significance_weighted(z, members, record):
    """Each member weighted by −log10 of its outliers' class significance (1 to 10): members whose outliers gather."""
    predicted = torch.tensor(record["predicted"])
    classes = int(predicted.max()) + 1
    w = torch.tensor([min(10.0, max(1.0, -math.log10(max(outlier_significance(z[:, j], predicted, classes), 1e-300))))
                      for j in range(z.shape[1])], dtype=torch.float64)
    return (torch.nan_to_num(z) * w).sum(1) / w.sum()


def correlation_weighted(z, members, record):
    """Weights Σ⁻¹1 (clipped at 0) of the members' rank correlation over the fit set: the best linear combination for
    a shift of every member at once, were the scores Gaussian with that correlation."""
    rho = spearmanr(torch.nan_to_num(z).numpy()).correlation
    rho = np.array([[1.0, rho], [rho, 1.0]]) if np.ndim(rho) == 0 else rho
    w = np.clip(np.linalg.solve(2 * np.sin(np.pi * rho / 6), np.ones(len(rho))), 0, None)
    w = np.ones(len(rho)) if w.sum() <= 0 else w
    return (torch.nan_to_num(z) * torch.from_numpy(w / w.sum())).sum(1)


def neutralised_where_disagreeing(z, members, record, alpha: float = 1e-4, anchor: str = "probe-shallow"):
    """Within each predicted class, a member whose scores fall as the shallow probe's rise (one-sided Spearman p <
    alpha) is set to 0 there: the within-class disagreement taken for a member misreading that class."""
    if anchor not in members:
        return z.nanmean(1)
    z, predicted, a = z.clone(), torch.tensor(record["predicted"]), members.index(anchor)
    for c in predicted.unique():
        idx = (predicted == c).nonzero().flatten()
        for j in range(len(members)):
            column, anchored = z[idx, j].numpy(), z[idx, a].numpy()
            if j != a and len(idx) >= 10 and np.ptp(column) > 0 and np.ptp(anchored) > 0:
                rho, p = spearmanr(column, anchored)
                if rho < 0 and p / 2 < alpha:
                    z[idx, j] = 0.0
    return z.nanmean(1)


VARIANTS = {
    "plain mean (the default)": plain_mean,
    "clipped at 0, mean": clipped_at_zero,
    "mean of the top 2": top_mean(2),
    "mean of the top 3": top_mean(3),
    "max": top_mean(1),
    "significance-weighted": significance_weighted,
    "correlation-weighted (Σ⁻¹1)": correlation_weighted,
    "neutralised where disagreeing with probe-shallow": neutralised_where_disagreeing,
    **{f"probe-shallow × {w:g}": weighted({"probe-shallow": w}) for w in (1.5, 2, 3)},
}


def evaluate(units, fuse, rule: str) -> dict[str, tuple[str, float]]:
    out = {}
    for unit, family, record, members, z in units:
        rows = fused_rows(fuse(z, members, record).double()[:, None], None, "zscore", record)
        out[unit] = (family, auroc(torch.tensor(record["truth"]).bool(), torch.from_numpy(rows[rule][0])))
    return out


def held_out_choice(tables: dict[str, dict[str, tuple[str, float]]]) -> dict[str, str]:
    """Leave one family out among candidates: ``{unit: candidate}``, for each implanted setting the candidate (a key of
    ``tables``, each ``{unit: (family, AUROC)}`` of one draw) with the best mean AUROC over the other families'
    settings, ties to the better worst, then to the first candidate."""
    units = next(iter(tables.values()))
    chosen = {}
    for unit, (family, _) in units.items():
        others = [u for u, (f, _) in units.items() if f != family]
        chosen[unit] = max(tables, key=lambda k: (np.mean([tables[k][u][1] for u in others]),
                                                  min(tables[k][u][1] for u in others)))
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regime", choices=sorted(REGIMES), default="labelled")
    parser.add_argument("--draw-dir", type=Path, default=None,
                        help="the pool's draw files (default: benchmarks/detect_draws, labelled; its label_free/ "
                             "copies for --regime label-free)")
    parser.add_argument("--draws", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--lofo", nargs="*", default=None, metavar="VARIANT",
                        help="also leave one family out among these variants (none named: all)")
    args = parser.parse_args()
    members, rule = REGIMES[args.regime]
    if args.draw_dir is None:
        args.draw_dir = DRAW_DIRS[args.regime]
    tables = {}
    for draw in args.draws:
        units = implanted_units(args.draw_dir, draw, members)
        tables[draw] = {name: evaluate(units, fuse, rule) for name, fuse in VARIANTS.items()}
    print(f"{args.regime}: members {', '.join(members)}; {rule}; draws {args.draws}")
    for name in VARIANTS:
        values = [(d, u, x) for d in args.draws for u, (_, x) in tables[d][name].items()]
        misses = "; ".join(f"d{d} {u} {x:.3f}" for d, u, x in values if x < 0.95)
        print(f"{name:50s} ≥ 0.95: {sum(x >= 0.95 for *_, x in values)} of {len(values)}, worst "
              f"{min(x for *_, x in values):.3f} | {misses}")
    if args.lofo is None:
        return
    candidates = args.lofo or list(VARIANTS)
    held, chosen = [], {}
    for draw in args.draws:
        for unit, best in held_out_choice({k: tables[draw][k] for k in candidates}).items():
            chosen[best] = chosen.get(best, 0) + 1
            held.append((draw, unit, tables[draw][best][unit][1]))
    print(f"leave one family out among {len(candidates)}: held out ≥ 0.95 on {sum(x >= 0.95 for *_, x in held)} of "
          f"{len(held)}, worst {min(x for *_, x in held):.3f}; chosen {chosen}")


if __name__ == "__main__":
    main()
