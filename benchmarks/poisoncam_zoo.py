"""PoisonCAM on the SSL encoder zoo (issue 17): per attack, seed and heat map, what it removes and what it leaves.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/poisoncam_zoo.py --out poisoncam_zoo.jsonl
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/poisoncam_zoo.py --rows patch_fixed:0 --heatmap gradcam
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/poisoncam_zoo.py --image-size 32 --rows patch_random:0

Each row takes the zoo's poisoned SimCLR encoder (``SSLZooConfig(attack, seed)``: small CNN, 16-px digits, 9 % of
the set poisoned), fits ``PoisonCAM`` on the poisoned unlabeled set (no labels, no clean data) and reports:
precision / recall of the flagged set, AUROC of ``poison_scores`` on the set, AUROC of the one-pass ``score`` on
triggered non-target test images vs clean test images, the locate rate (the candidate box covers at least half of
the true patch, poisoned images), the fit's seconds, and probe CA / ASR of the poisoned encoder, of a SimCLR encoder
retrained with the same recipe on the kept images, and of the clean encoder (same data and recipe, no poison).
The defaults were chosen on ``patch_random`` seeds 0–2 (docs/poisoncam.md); ``patch_fixed`` and ``blended`` are held
out. One row at a time appends one JSON line to ``--out`` (a rerun skips rows already there).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from jsonl_rows import emit, read_rows
from sklearn.metrics import roc_auc_score

from trojanguard.detect.poisoncam import PoisonCAM
from trojanguard.metrics import LinearProbe
from trojanguard.ops.cluster_mask import box_masks
from trojanguard.ssl import train_simclr
from trojanguard.zoo import SSLZooConfig, get_poisoned_encoder

DEFAULT_ROWS = ["patch_random:0", "patch_random:1", "patch_random:2", "patch_fixed:0", "blended:0"]


def locate_rate(boxes: torch.Tensor, truth: torch.Tensor, size: tuple[int, int]) -> float:
    """Share of images whose box covers at least half of the true box."""
    found, true = box_masks(boxes, *size), box_masks(truth, *size)
    cover = (found & true).flatten(1).sum(1).float() / true.flatten(1).sum(1)
    return float((cover >= 0.5).float().mean())


def run_row(attack: str, seed: int, options: dict, retrain: bool, arch: str = "small_cnn", image_size: int = 16,
            poison_rate: float = SSLZooConfig.poison_rate) -> dict:
    config = SSLZooConfig(attack=attack, seed=seed, arch=arch, image_size=image_size, poison_rate=poison_rate)
    entry = get_poisoned_encoder(config, show_progress=False)
    clean = get_poisoned_encoder(config.clean(), show_progress=False)
    x, truth = entry.train.x, entry.train.is_poisoned
    start = time.perf_counter()
    detector = PoisonCAM(entry.encoder, show_progress=False, **options).fit(x)
    seconds = time.perf_counter() - start
    result = detector.result
    flagged = result.flagged
    hits = int((flagged & truth).sum())
    triggered = entry.triggered_test()
    others = entry.test.y != config.target
    test_scores = detector.score(torch.cat([triggered[others], entry.test.x]))
    test_truth = torch.cat([torch.ones(int(others.sum())), torch.zeros(len(entry.test.x))])
    row = {"attack": attack, "seed": seed, "arch": arch, "image_size": image_size,
           "poison_rate": poison_rate, "options": options, "n": len(x), "poisoned": int(truth.sum()),
           "flagged": int(flagged.sum()), "precision": hits / max(1, int(flagged.sum())), "recall": hits / int(truth.sum()),
           "auroc_set": roc_auc_score(truth.numpy(), result.poison_scores.numpy()),
           "auroc_test": roc_auc_score(test_truth.numpy(), test_scores.numpy()), "fit_seconds": seconds,
           "stage_seconds": result.seconds, "clusters": len(detector.centroids), "rounds": result.rounds,
           "searched": int((~result.search_scores.isnan()).sum()),
           "top_triggers_from_poisoned": int(truth[[t.index for t in result.triggers]].sum()),
           "probe_ca": entry.probe_clean_accuracy, "probe_asr": entry.probe_attack_success_rate,
           "clean_probe_ca": clean.probe_clean_accuracy, "clean_probe_asr": clean.probe_attack_success_rate}
    if entry.train.boxes is not None:
        index = torch.nonzero(truth).squeeze(1)
        row["locate"] = locate_rate(detector.locate(x[index]), entry.train.boxes[index], tuple(x.shape[2:]))
    if retrain:
        start = time.perf_counter()
        kept = train_simclr(x[~flagged], config.arch, config.simclr_config(), show_progress=False).encoder
        probe = LinearProbe(kept, entry.probe_train.x, entry.probe_train.y)
        row.update(retrained_probe_ca=probe.accuracy(entry.test.x, entry.test.y),
                   retrained_probe_asr=probe.attack_success_rate(triggered, entry.test.y, config.target),
                   retrain_seconds=time.perf_counter() - start)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, help="attack:seed pairs")
    parser.add_argument("--heatmap", default="mask", choices=["mask", "gradcam"])
    parser.add_argument("--options", default="{}", help="more PoisonCAM options, as JSON")
    parser.add_argument("--arch", default="small_cnn", help="the encoders' backbone (SSLZooConfig.arch)")
    parser.add_argument("--image-size", type=int, default=16, help="the encoders' image side (SSLZooConfig.image_size)")
    parser.add_argument("--poison-rate", type=float, default=SSLZooConfig.poison_rate,
                        help=f"share of the set poisoned (SSLZooConfig.poison_rate, default {SSLZooConfig.poison_rate})")
    parser.add_argument("--no-retrain", action="store_true", help="skip retraining an encoder on the kept images")
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per row here")
    args = parser.parse_args()
    options = {"heatmap": args.heatmap, **json.loads(args.options)}
    done = {(row["attack"], row["seed"], row.get("arch", "small_cnn"), row.get("image_size", 16),
             row.get("poison_rate", SSLZooConfig.poison_rate), json.dumps(row["options"], sort_keys=True))
            for row in read_rows(args.out)}
    for spec in args.rows:
        attack, seed = spec.split(":")
        if (attack, int(seed), args.arch, args.image_size, args.poison_rate,
                json.dumps(options, sort_keys=True)) in done:
            continue
        emit(run_row(attack, int(seed), options, not args.no_retrain, args.arch, args.image_size, args.poison_rate),
             args.out)


if __name__ == "__main__":
    main()
