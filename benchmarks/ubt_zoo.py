"""UBT and CleanCLIP on the image–text zoo (issue 19): per attack and method, zero-shot CA / ASR before and after,
the suspicious set's precision / recall, seconds.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/ubt_zoo.py --attacks badnets blended --out ubt.jsonl

UBT's defaults were chosen on ``badnets`` and ``blended`` (the selection attacks); ``wanet``, ``issba``, ``filter``
and ``lowfreq`` are held out (docs/ubt.md). Methods:

* ``ubt``: UBT at its defaults (seeds 0, 1, 2 unless ``--seeds``), on the poisoned pairs themselves;
* ablations (seed 0): ``ubt_text`` / ``ubt_image`` (unfreeze only the token rows / only the image input embedding),
  ``ubt_overfit`` (stage 1 scores a copy over-fitted 5 epochs on the weakest 30 %), ``ubt_no_cartesian`` (forget on
  the suspicious pairs as they are), ``ubt_clip_retain`` (retention by CLIP's loss, lr 1e-2, weight 1: our first
  design);
* ``cleanclip_clean``: CleanCLIP on 700 clean pairs of the same split; ``cleanclip_poisoned``: on all the poisoned
  pairs; both at lr 1e-2 (``--cleanclip-lr``).

One JSON line per row to ``--out``; a rerun skips rows already there.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from jsonl_rows import emit, read_rows

from trojanguard.cleanse import UBT, CleanCLIP
from trojanguard.zoo import CLIPZooConfig, get_poisoned_clip

ABLATIONS = {"ubt_text": {"unfreeze": "text"}, "ubt_image": {"unfreeze": "image"}, "ubt_overfit": {"overfit_epochs": 5},
             "ubt_no_cartesian": {"cartesian": False},
             "ubt_clip_retain": {"retain_loss": "clip", "lr": 1e-2, "retain_weight": 1.0}}
CLEAN_PAIRS = 700


def run_row(entry, method: str, seed: int, cleanclip_lr: float) -> dict:
    truth = set(entry.poison_indices.tolist())
    start = time.perf_counter()
    if method.startswith("cleanclip"):
        if method == "cleanclip_clean":
            clean = torch.ones(len(entry.images), dtype=torch.bool)
            clean[entry.poison_indices] = False
            pick = clean.nonzero().squeeze(1)[torch.randperm(int(clean.sum()),
                                                             generator=torch.Generator().manual_seed(seed))[:CLEAN_PAIRS]]
        else:
            pick = torch.arange(len(entry.images))
        cleanser = CleanCLIP(lr=cleanclip_lr, seed=seed, show_progress=False)
        cleanser.cleanse(entry.model, (entry.images[pick], entry.tokens[pick]), evaluation=entry.evaluation())
        extra = {"pairs": len(pick)}
    else:
        cleanser = UBT(seed=seed, show_progress=False, **ABLATIONS.get(method, {}))
        cleanser.cleanse(entry.model, (entry.images, entry.tokens), evaluation=entry.evaluation())
        suspicious = cleanser.report.details["suspicious"]
        hits = sum(i in truth for i in suspicious)
        extra = {"suspicious": len(suspicious), "precision": hits / len(suspicious), "recall": hits / len(truth)}
    report = cleanser.report
    return {"attack": entry.config.attack, "method": method, "seed": seed,
            "ca_before": report.before["clean_accuracy"], "asr_before": report.before["attack_success_rate"],
            "ca": report.after["clean_accuracy"], "asr": report.after["attack_success_rate"], **extra,
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attacks", nargs="+", default=["badnets", "blended", "wanet", "issba", "filter", "lowfreq"])
    parser.add_argument("--methods", nargs="+",
                        default=["ubt", *ABLATIONS, "cleanclip_clean", "cleanclip_poisoned"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the plain ubt rows")
    parser.add_argument("--cleanclip-lr", type=float, default=1e-2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    done = {(r["attack"], r["method"], r["seed"]) for r in read_rows(args.out)}
    for attack in args.attacks:
        entry = get_poisoned_clip(CLIPZooConfig(attack=attack), show_progress=False)
        for method in args.methods:
            for seed in args.seeds if method == "ubt" else [0]:
                if (attack, method, seed) not in done:
                    emit(run_row(entry, method, seed, args.cleanclip_lr), args.out)


if __name__ == "__main__":
    main()
