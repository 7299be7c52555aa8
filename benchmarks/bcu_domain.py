"""BCU's recipe switch on the attack zoo: batch-statistics agreement (and the normalisation gap) per data source.

    .venv/bin/python benchmarks/bcu_domain.py small_cnn:badnets small_cnn:blended resnet18_cifar:badnets

For each zoo model (``arch:attack``; ResNet-18 at 16 px) and each data source — held-out training images
(:func:`~trojanguard.cleanse.unlabeled.clean_half`), test images, photo crops adapted to the model
(:func:`~trojanguard.cleanse.unlabeled.ood_images`) and raw colour crops, 256 images each — prints the share of
predictions unchanged under batch statistics (:func:`~trojanguard.cleanse.batch_statistics_agreement`, the
switch) and the normalisation gap (reported only). Forward passes only; models are trained on first use.
"""

from __future__ import annotations

import argparse

from trojanguard.cleanse import batch_statistics_agreement, normalisation_gap
from trojanguard.cleanse.distillation import AGREEMENT_KEEP
from trojanguard.cleanse.unlabeled import clean_half, ood_images
from trojanguard.data import load_ood_crops
from trojanguard.zoo import ZooConfig, get_backdoored_model

SAMPLE = 256
RESNET_SIZE = 16  # the ResNet-18 rows of benchmarks/RESULTS.md use 16 px digits (CPU budget)


def sources(entry) -> dict:
    size = entry.test.x.shape[-1]
    return {"held-out training": clean_half(entry)[:SAMPLE], "test": entry.test.x[:SAMPLE],
            "adapted photo crops": ood_images(SAMPLE, size=size, model=entry.model),
            "raw colour crops": load_ood_crops(n=SAMPLE, size=size, channels=3, seed=0).x}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="arch:attack, e.g. small_cnn:badnets resnet18_cifar:blended")
    args = parser.parse_args()
    print(f"| model | data | agreement | recipe (≥ {AGREEMENT_KEEP} → in-distribution) | normalisation gap |")
    print("|---|---|---|---|---|")
    for spec in args.models:
        arch, attack = spec.split(":")
        size = RESNET_SIZE if arch.startswith("resnet") else ZooConfig.image_size
        entry = get_backdoored_model(ZooConfig(attack=attack, arch=arch, image_size=size))
        for name, x in sources(entry).items():
            agreement = batch_statistics_agreement(entry.model, x)
            recipe = "in-distribution" if agreement >= AGREEMENT_KEEP else "out-of-distribution"
            print(f"| {spec} | {name} | {agreement:.3f} | {recipe} | {normalisation_gap(entry.model, x):.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
