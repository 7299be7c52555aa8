"""MIMIC on the SSL encoder zoo (issue 18): per encoder, clean-data fraction and method, what is left of the backdoor.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/mimic_zoo.py --rows badencoder:0 --out mimic.jsonl
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/mimic_zoo.py --rows patch_random:0 patch_random:1 \\
        --methods mimic uniform finetune --fractions 0.02 0.05 0.1 --out mimic.jsonl

Each row takes a zoo encoder (``SSLZooConfig(attack, seed, arch, image_size)``: BadEncoder backdoors a clean SimCLR
encoder; ``patch_random`` / ``patch_fixed`` are SimCLR encoders trained on poisoned data), a seeded random
``fraction`` of its pre-training images as the clean unlabeled data, and one method:

* ``mimic``: MIMIC at its defaults (``--options`` JSON overrides them);
* ``uniform``: the same distillation with uniform stage weights (``mi_weight=0``), the no-MI baseline;
* ``finetune``: SimCLR fine-tuning of the backdoored encoder on the clean subset (the zoo's SimCLR recipe, as many
  optimiser steps as MIMIC's default);
* ``bcu``: BCU-style partial re-initialisation (BCU's adaptive rule, by depth) of a copy of the encoder, then
  feature distillation from the backdoored encoder (the clone term alone: negative cosine on SimCLR views), the
  same optimiser, epochs and views as MIMIC.

Reported: probe CA / ASR (a linear probe on all clean labelled training images), few-shot probe CA (5 labelled
images per class, mean of 3 draws: on the digits a *random* encoder reaches full-probe CA 0.99, so only the
few-shot probe tells features from noise), the same for the input encoder and for a random encoder of the same
architecture, and seconds. One JSON line per row to ``--out``; a rerun skips rows already there.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from jsonl_rows import emit, read_rows

from trojanguard.cleanse import MIMIC, LinearProbeEvaluation
from trojanguard.cleanse.mimic import random_student
from trojanguard.zoo import SSLZooConfig, get_poisoned_encoder

FEW_SHOT = 5  # labelled images per class of the few-shot probe
FEW_SHOT_DRAWS = 3


def few_shot_accuracy(encoder, entry, draws: int = FEW_SHOT_DRAWS) -> float:
    """Mean probe CA over ``draws`` seeded draws of FEW_SHOT labelled training images per class."""
    y = entry.probe_train.y
    total = 0.0
    for draw in range(draws):
        gen = torch.Generator().manual_seed(draw)
        index = torch.cat([torch.nonzero(y == k).squeeze(1)[torch.randperm(int((y == k).sum()), generator=gen)[:FEW_SHOT]]
                           for k in y.unique().tolist()])
        probe = LinearProbeEvaluation(entry.probe_train.x[index], y[index], entry.test.x, entry.test.y)
        total += probe(encoder)["clean_accuracy"]
    return total / draws


def bcu_feature_distillation(encoder, x: torch.Tensor, config, seed: int):
    """The BCU-style baseline: BCU's adaptive re-initialisation of a copy of ``encoder``, then distillation of its
    features (negative cosine to the frozen encoder's, on two SimCLR views per image) with MIMIC's optimiser,
    schedule, epochs and batches."""
    import torch.nn.functional as F

    from trojanguard.cleanse import train
    from trojanguard.cleanse.base import UnlabeledImages
    from trojanguard.cleanse.bcu import layer_ratios, reinitialize
    from trojanguard.ssl import SimCLRAugmentation

    teacher = copy.deepcopy(encoder).eval().requires_grad_(False)
    student = copy.deepcopy(encoder).requires_grad_(True)
    layers, _ = layer_ratios(student.module, x[:2], "adaptive")
    reinitialize(student.module, layers, seed=seed)
    augment = SimCLRAugmentation(image_size=int(x.shape[-1]))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)

    def step(batch, epoch, index):
        views = torch.cat([augment(batch, generator), augment(batch, generator)])
        with torch.no_grad():
            target = teacher(views)
        return -F.cosine_similarity(student(views), target, dim=1).mean()

    student.train()
    train(student, step, UnlabeledImages(x, config.batch_size, seed, minimum=2, recommended=2),
          optimizer=optimizer, scheduler=scheduler, epochs=config.epochs, device=torch.device("cpu"),
          show_progress=False, desc="bcu-features")
    return student.eval()


def run_row(attack: str, seed: int, method: str, fraction: float, options: dict, arch: str, image_size: int) -> dict:
    config = SSLZooConfig(attack=attack, seed=seed, arch=arch, image_size=image_size)
    entry = get_poisoned_encoder(config, show_progress=False)
    x = entry.train.x
    count = round(fraction * len(x))
    clean_pool = torch.nonzero(~entry.train.is_poisoned).squeeze(1)  # the defender's clean images
    subset = x[clean_pool[torch.randperm(len(clean_pool), generator=torch.Generator().manual_seed(seed))[:count]]]
    evaluation = LinearProbeEvaluation(entry.probe_train.x, entry.probe_train.y, entry.test.x, entry.test.y,
                                       trigger=entry.attack.apply_test, target=config.target)
    start = time.perf_counter()
    details: dict = {}
    if method in ("mimic", "uniform"):
        settings = {**options, **({"mi_weight": 0.0} if method == "uniform" else {})}
        cleanser = MIMIC(show_progress=False, **settings)
        cleansed = cleanser.cleanse(entry.encoder, subset)
        details = {k: cleanser.report.details[k] for k in ("stages", "mutual_information", "weights")}
        details["last_epoch"] = cleanser.report.epochs[-1].to_dict()
    elif method == "finetune":
        from dataclasses import replace

        from trojanguard.ssl import train_simclr

        reference = MIMIC(**options).config
        simclr = replace(config.simclr_config(), epochs=reference.epochs, batch_size=reference.batch_size,
                         lr=reference.lr)
        backbone = copy.deepcopy(entry.encoder.module)  # the backdoored weights, trained on
        cleansed = train_simclr(subset, backbone, simclr, show_progress=False).encoder
    elif method == "bcu":
        cleansed = bcu_feature_distillation(entry.encoder, subset, MIMIC(**options).config, seed)
    else:
        raise ValueError(f"method: expected mimic, uniform, finetune or bcu, got {method!r}")
    seconds = time.perf_counter() - start
    after = evaluation(cleansed)
    before = evaluation(entry.encoder)
    random_encoder = random_student(entry.encoder, seed).eval()
    return {"attack": attack, "seed": seed, "arch": arch, "image_size": image_size, "method": method,
            "fraction": fraction, "images": count, "options": options, "seconds": seconds,
            "probe_ca_before": before["clean_accuracy"], "probe_asr_before": before["attack_success_rate"],
            "probe_ca_after": after["clean_accuracy"], "probe_asr_after": after["attack_success_rate"],
            "few_shot_ca_before": few_shot_accuracy(entry.encoder, entry),
            "few_shot_ca_after": few_shot_accuracy(cleansed, entry),
            "few_shot_ca_random": few_shot_accuracy(random_encoder, entry),
            "probe_ca_random": evaluation(random_encoder)["clean_accuracy"], **details}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=["badencoder:0"], help="attack:seed pairs")
    parser.add_argument("--methods", nargs="+", default=["mimic"], choices=["mimic", "uniform", "finetune", "bcu"])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.1])
    parser.add_argument("--options", default="{}", help="MIMIC options, as JSON")
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per row here")
    args = parser.parse_args()
    options = json.loads(args.options)
    done = {(r["attack"], r["seed"], r["arch"], r["image_size"], r["method"], r["fraction"],
             json.dumps(r["options"], sort_keys=True)) for r in read_rows(args.out)}
    for spec in args.rows:
        attack, seed = spec.split(":")
        for fraction in args.fractions:
            for method in args.methods:
                key = (attack, int(seed), args.arch, args.image_size, method, fraction, json.dumps(options, sort_keys=True))
                if key in done:
                    continue
                emit(run_row(attack, int(seed), method, fraction, options, args.arch, args.image_size), args.out)


if __name__ == "__main__":
    main()
