"""AUROC of the amortised CD detector (``trojanguard.detect.AmortizedCD``) vs its teacher, Cognitive
Distillation (CD-P, the SDK's defaults), on the attack zoo (digits, small CNN, zoo poison rates).

Protocol (held-out, so a head that memorised its teacher images gains nothing): the poisoned training set is
split into two seeded random halves; CD scores one half (the screened set), the head is fitted on those scores
and evaluated on the other half, then the halves swap (2 folds). Columns:

- *held-out half*: AUROC of poisoned vs clean samples of the half the head never saw (fold 1 / fold 2), for
  CD (its own scores of that half) and for the head;
- *test*: AUROC of clean test images vs triggered test images (true class ≠ target), CD vs head (fold 1 / 2);
- *Spearman*: rank correlation of head and CD on the held-out half (fidelity to the teacher);
- *FPR / TPR*: the head calibrated at fpr 0.05 on 180 clean test images, measured on the other 179 clean test
  images and on the triggered test images (fold 1).

CD scores are cached on disk (``trojanguard.zoo.cached_scores``): the first run distils every training and test
image once per attack (~5–7 min per attack on a loaded 2-core CPU), later runs take seconds.

Run: ``python benchmarks/amortized_effectiveness.py [--attacks badnets ...] [--variants default regress ...]
[--unrolled-steps 5 10]``. ``--unrolled-steps K`` also reports CD run for only K steps on the test set (what a
K-step unrolled CD would reach).
"""

from __future__ import annotations

import argparse
import time

import torch
from scipy.stats import spearmanr

from trojanguard.detect import AmortizedCD, CognitiveDistillation
from trojanguard.metrics import auroc
from trojanguard.zoo import ZooConfig, cached_scores, get_backdoored_model

ATTACKS = ("badnets", "blended", "trojan", "wanet", "sig")
VARIANTS = {
    "default": {},
    "mlp": {"hidden": 32},
    "regress": {"objective": "regress"},
    "mlp-regress": {"hidden": 32, "objective": "regress"},
    "no-probabilities": {"probabilities": False},
}
CALIBRATION = 180
FPR = 0.05


def halves(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[: n // 2].sort().values, order[n // 2 :].sort().values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--unrolled-steps", nargs="*", type=int, default=[])
    args = parser.parse_args()
    rows = ["| attack | detector | held-out half AUROC | test AUROC | Spearman vs CD | FPR / TPR @ 0.05 | fit (s) |",
            "|---|---|---|---|---|---|---|"]
    for attack in args.attacks:
        entry = get_backdoored_model(ZooConfig(attack=attack), show_progress=False)
        teacher = CognitiveDistillation(entry.model, show_progress=False)
        x, poisoned = entry.train.dataset.x, entry.train.is_poisoned
        scores = cached_scores(teacher, x)
        keep = entry.test.y != entry.config.target
        triggered = entry.triggered_test()[keep]
        test_x = torch.cat([entry.test.x, triggered])
        test_truth = torch.cat([torch.zeros(len(entry.test.x), dtype=torch.bool), torch.ones(len(triggered), dtype=torch.bool)])
        test_scores = torch.cat([cached_scores(teacher, entry.test.x), cached_scores(teacher, triggered)])
        folds = [halves(len(x)), halves(len(x))[::-1]]
        cd_half = " / ".join(f"{auroc(poisoned[held], scores[held]):.3f}" for _, held in folds)
        rows.append(f"| {attack} | CD (teacher) | {cd_half} | {auroc(test_truth, test_scores):.3f} | – | – | – |")
        print(rows[-1], flush=True)
        for steps in args.unrolled_steps:
            short = cached_scores(CognitiveDistillation(entry.model, steps=steps, show_progress=False), test_x)
            rows.append(f"| {attack} | CD, {steps} steps | – | {auroc(test_truth, short):.3f} | – | – | – |")
            print(rows[-1], flush=True)
        for name in args.variants:
            held_aurocs, test_aurocs, correlations, seconds = [], [], [], []
            rates = ""
            for fit_part, held in folds:
                start = time.perf_counter()
                student = AmortizedCD(entry.model, show_progress=False, **VARIANTS[name])
                student.fit(x[fit_part], teacher=scores[fit_part])
                seconds.append(time.perf_counter() - start)
                held_scores = student.score(x[held])
                held_aurocs.append(auroc(poisoned[held], held_scores))
                test_aurocs.append(auroc(test_truth, student.score(test_x)))
                correlations.append(spearmanr(held_scores.numpy(), scores[held].numpy()).statistic)
                if not rates:
                    student.calibrate(entry.test.x[:CALIBRATION], fpr=FPR)
                    fpr = float(student.predict(entry.test.x[CALIBRATION:]).float().mean())
                    tpr = float(student.predict(triggered).float().mean())
                    rates = f"{fpr:.3f} / {tpr:.3f}"
            rows.append(f"| {attack} | amortised, {name} | {' / '.join(f'{a:.3f}' for a in held_aurocs)} | "
                        f"{' / '.join(f'{a:.3f}' for a in test_aurocs)} | "
                        f"{' / '.join(f'{c:.2f}' for c in correlations)} | {rates} | {max(seconds):.1f} |")
            print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
