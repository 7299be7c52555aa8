"""PoisonCAM's candidate search before and after issue 22's sweep (ops + prepared encoder), same run, same images.

    OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python benchmarks/poisoncam_sweep_speed.py --image-size 16
    PYTHONPATH=src python benchmarks/poisoncam_sweep_speed.py --arch torchvision:resnet18 --image-size 224 \
        --images 300 --device cuda      # a GPU: a random-weight ResNet-18 at 224 px on upscaled digits

"before": the sweep as it was — the encoder as given and the reference ops (``use_backend("reference")``); "after":
the defaults; "coarse_to_fine": the defaults with ``coarse_to_fine=True``. Each fits ``PoisonCAM`` on the SSL zoo's poisoned set (``SSLZooConfig(image_size=...)``) with a brief
classifier (``iterations=50``, one round: the search is what changed, the classifier is not), and report the
search's seconds, the flagged set's precision / recall and the locate rate (candidate box covers ≥ half the patch).
``--arch``: instead of the zoo, a random-weight encoder of that architecture (``sweep_end_to_end.build_encoder``) on
``--images`` digits at ``--image-size``: the search's seconds and the share of candidate boxes "after" finds
identical to "before" (the encoder's features carry no trigger, so precision and recall mean nothing there).
"""

from __future__ import annotations

import argparse
import json

import torch
from poisoncam_zoo import locate_rate

from trojanguard.data import load_digits
from trojanguard.detect.poisoncam import PoisonCAM
from trojanguard.ops import use_backend
from trojanguard.zoo import SSLZooConfig, get_poisoned_encoder


def fitted(encoder, x: torch.Tensor, before: bool, **options) -> PoisonCAM:
    detector = PoisonCAM(encoder, iterations=50, rounds=1, show_progress=False, **options)
    if before:
        detector._sweep_encoder = lambda: detector.encoder  # the encoder as given, as before issue 22
        with use_backend("reference"):
            return detector.fit(x)
    return detector.fit(x)


def fit(entry, before: bool, **options) -> dict:
    detector = fitted(entry.encoder, entry.train.x, before, **options)
    result = detector.result
    truth, flagged = entry.train.is_poisoned, result.flagged
    hits = int((flagged & truth).sum())
    index = torch.nonzero(truth).squeeze(1)
    return {"search_s": round(result.seconds["search"], 2), "precision": round(hits / max(1, int(flagged.sum())), 3),
            "recall": round(hits / int(truth.sum()), 3),
            "locate": round(locate_rate(detector.locate(entry.train.x[index]), entry.train.boxes[index],
                                        tuple(entry.train.x.shape[2:])), 3)}


def random_encoder_row(args) -> dict:
    from sweep_end_to_end import build_encoder

    torch.manual_seed(0)
    encoder = build_encoder(args.arch).to(args.device).eval()
    x = load_digits(size=args.image_size)[0].x[: args.images]
    row = {"arch": args.arch, "image_size": args.image_size, "images": len(x), "device": args.device,
           "torch": torch.__version__}
    if args.device.startswith("cuda"):
        row["gpu"] = torch.cuda.get_device_name(0)
    before_boxes = None
    for name, before, options in (("before", True, {}), ("after", False, {}), ("coarse_to_fine", False,
                                                                                  {"coarse_to_fine": True})):
        result = fitted(encoder, x, before, **options).result
        searched = result.boxes[:, 0] >= 0
        before_boxes = result.boxes if before_boxes is None else before_boxes
        row[name] = {"search_s": round(result.seconds["search"], 2), "fit_s": round(sum(result.seconds.values()), 2),
                     "searched": int(searched.sum()),
                     "same_boxes_as_before": round(float((result.boxes == before_boxes).all(1)[searched].float()
                                                         .mean()), 3)}
        print(json.dumps({name: row[name]}), flush=True)
    row["search_speedup"] = round(row["before"]["search_s"] / row["after"]["search_s"], 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--arch", help="a random-weight encoder instead of the SSL zoo's (e.g. torchvision:resnet18)")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.arch:
        print(json.dumps(random_encoder_row(args)), flush=True)
        return
    entry = get_poisoned_encoder(SSLZooConfig(image_size=args.image_size), show_progress=False)
    row = {"image_size": args.image_size, "images": len(entry.train.x), "threads": torch.get_num_threads(),
           "before": fit(entry, before=True), "after": fit(entry, before=False),
           "coarse_to_fine": fit(entry, before=False, coarse_to_fine=True)}
    row["search_speedup"] = round(row["before"]["search_s"] / row["after"]["search_s"], 2)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
