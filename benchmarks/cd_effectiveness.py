"""AUROC of Cognitive Distillation on the attack zoo (digits, small CNN, zoo poison rates): the SDK detector
vs the baseline recipe (``cd_baseline.py``) for CD-L and CD-F, and the SDK's default CD-P, on the poisoned training set.

Run: ``python benchmarks/cd_effectiveness.py [--attacks badnets blended ...] [--clean 400]``. ``--clean N``
scores every poisoned sample plus N random clean ones (a stratified subset, for time on small CPUs); 0 = all.
Prints a markdown table (AUROC, AUPRC, TPR at 5 % FPR, images/s).
"""

from __future__ import annotations

import argparse
import time

import torch
from cd_baseline import baseline_cd_l1

from trojanguard.detect import CognitiveDistillation
from trojanguard.metrics import auprc, auroc, tpr_at_fpr
from trojanguard.models.features import LayerOutput, default_feature_layer
from trojanguard.zoo import ZooConfig, get_backdoored_model

ATTACKS = ("badnets", "blended", "sig", "wanet", "trojan")


def evaluation_subset(poisoned: torch.Tensor, clean: int, seed: int = 0) -> torch.Tensor:
    """Indices of every poisoned sample plus ``clean`` random clean ones (all when 0)."""
    g = torch.Generator().manual_seed(seed)
    pos, neg = torch.nonzero(poisoned).flatten(), torch.nonzero(~poisoned).flatten()
    if clean:
        neg = neg[torch.randperm(len(neg), generator=g)[:clean]]
    return torch.cat([pos, neg]).sort().values


def detector_scores(name: str, mode: str, model, x: torch.Tensor, early_stop: float | None = None
                    ) -> torch.Tensor:
    """Suspicion scores of the SDK detector (``sdk``, or ``sdk early-stop …`` with ``early_stop``) or of the
    baseline recipe (−Σm); higher = more suspicious."""
    if name.startswith("sdk"):
        return CognitiveDistillation(model, mode=mode, early_stop=early_stop if "early" in name else None).score(x)
    layer = default_feature_layer(model, x[:2])
    defaults = {"logits": {}, "features": {"lr": 0.05, "alpha": 0.001, "beta": 10.0}}[mode]
    return -baseline_cd_l1(model, x, mode=mode, feature_fn=lambda net, z: LayerOutput(net, layer)(z), **defaults)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--modes", nargs="+", default=["probabilities", "logits", "features"], choices=["probabilities", "logits", "features"])
    parser.add_argument("--clean", type=int, default=400)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--early-stop", type=float, default=None, help="also run the SDK with this early stop")
    parser.add_argument("--device", default="cpu", help="where the model and images go (e.g. cuda)")
    args = parser.parse_args()
    rows = ["| attack | mode | detector | images | AUROC | AUPRC | TPR@5%FPR | images/s |", "|---|---|---|---|---|---|---|---|"]
    for attack in args.attacks:
        entry = get_backdoored_model(ZooConfig(attack=attack), show_progress=False)
        poisoned = entry.train.is_poisoned
        index = evaluation_subset(poisoned, args.clean)
        x, truth = entry.train.dataset.x[index].to(args.device), poisoned[index]
        model = entry.model.to(args.device)
        for mode in args.modes:
            names = ["sdk"] + ([] if args.no_baseline or mode == "probabilities" else ["baseline"])
            names += [f"sdk early-stop {args.early_stop}"] if args.early_stop else []
            for name in names:
                start = time.perf_counter()
                scores = detector_scores(name, mode, model, x, args.early_stop).cpu()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                rows.append(f"| {attack} | CD-{mode[0].upper()} | {name} | {len(x)} ({int(truth.sum())} poisoned) | "
                            f"{auroc(truth, scores):.3f} | {auprc(truth, scores):.3f} | "
                            f"{tpr_at_fpr(truth, scores, 0.05):.3f} | {len(x) / seconds:.1f} |")
                print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
