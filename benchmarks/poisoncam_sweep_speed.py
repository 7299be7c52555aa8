"""PoisonCAM's candidate search before and after issue 22's sweep (ops + prepared encoder), same run, same images.

    OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python benchmarks/poisoncam_sweep_speed.py --image-size 16

"before": the sweep as it was — the encoder as given and the reference ops (``use_backend("reference")``); "after":
the defaults; "coarse_to_fine": the defaults with ``coarse_to_fine=True``. Each fits ``PoisonCAM`` on the SSL zoo's poisoned set (``SSLZooConfig(image_size=...)``) with a brief
classifier (``iterations=50``, one round: the search is what changed, the classifier is not), and report the
search's seconds, the flagged set's precision / recall and the locate rate (candidate box covers ≥ half the patch).
"""

from __future__ import annotations

import argparse
import json

import torch
from poisoncam_zoo import locate_rate

from trojanguard.detect.poisoncam import PoisonCAM
from trojanguard.ops import use_backend
from trojanguard.zoo import SSLZooConfig, get_poisoned_encoder


def fit(entry, before: bool, **options) -> dict:
    detector = PoisonCAM(entry.encoder, iterations=50, rounds=1, show_progress=False, **options)
    if before:
        detector._sweep_encoder = lambda: detector.encoder  # the encoder as given, as before issue 22
        with use_backend("reference"):
            detector.fit(entry.train.x)
    else:
        detector.fit(entry.train.x)
    result = detector.result
    truth, flagged = entry.train.is_poisoned, result.flagged
    hits = int((flagged & truth).sum())
    index = torch.nonzero(truth).squeeze(1)
    return {"search_s": round(result.seconds["search"], 2), "precision": round(hits / max(1, int(flagged.sum())), 3),
            "recall": round(hits / int(truth.sum()), 3),
            "locate": round(locate_rate(detector.locate(entry.train.x[index]), entry.train.boxes[index],
                                        tuple(entry.train.x.shape[2:])), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=16)
    args = parser.parse_args()
    entry = get_poisoned_encoder(SSLZooConfig(image_size=args.image_size), show_progress=False)
    row = {"image_size": args.image_size, "images": len(entry.train.x), "threads": torch.get_num_threads(),
           "before": fit(entry, before=True), "after": fit(entry, before=False),
           "coarse_to_fine": fit(entry, before=False, coarse_to_fine=True)}
    row["search_speedup"] = round(row["before"]["search_s"] / row["after"]["search_s"], 2)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
