"""Does the SSL backdoor implant? A small grid of SimCLR settings on poisoned digits (issue 17).

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/ssl_implant.py      # the grid, seed 0 (~15 min)
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/ssl_implant.py --rows zoo --seeds 0,1,2

(One thread: on two shared cores, two torch threads competing with another job ran ~6× slower per epoch. The
thread count changes the float sums, so a row's numbers differ slightly from the zoo's with two threads.)

Each row trains a SimCLR encoder (``small_cnn``) on the digits training split with ``rate`` of it (images of class
0) carrying the trigger, and a clean encoder with the same SimCLR settings (trained once per setting), then
measures both with a linear probe and a k-NN vote (k = 20) fitted on the clean labelled training split: probe
CA, probe ASR (triggered non-0 test images called 0), k-NN ASR. The zoo defaults (`SSLZooConfig`) were chosen
on the ``patch_random`` rows; the ``patch_fixed`` and ``blended`` rows are held out (run once with the chosen
SimCLR settings, not tuned). Timings are wall seconds of one training on whatever CPU this runs on.
"""

from __future__ import annotations

import argparse
import time

import torch

from trojanguard.attacks.ssl import make_ssl_attack
from trojanguard.data import load_digits
from trojanguard.metrics import LinearProbe, knn_attack_success_rate
from trojanguard.ssl import SimCLRAugmentation, SimCLRConfig, train_simclr

TARGET = 0

# name -> settings; every key not given takes BASE's value
BASE = {"attack": "patch_random", "size": 0.25, "rate": 0.09, "image_size": 16, "epochs": 20, "batch_size": 256,
        "temperature": 0.5, "crop_low": 0.3, "jitter_p": 0.8, "grayscale_p": 0.2}
ROWS: dict[str, dict] = {  # in the order they were tried; "zoo" is SSLZooConfig's defaults
    "p4_crop08": {"size": 0.4, "crop_low": 0.08},
    "blend": {"attack": "blended"},
    "p4_crop08_b64": {"size": 0.4, "crop_low": 0.08, "batch_size": 64},
    "p5_crop08_b64": {"size": 0.5, "crop_low": 0.08, "batch_size": 64},
    "p4_crop08_b64_t02": {"size": 0.4, "crop_low": 0.08, "batch_size": 64, "temperature": 0.2},
    "zoo": {"size": 0.4, "crop_low": 0.08, "batch_size": 64, "jitter_p": 0.0, "grayscale_p": 0.0},
    "p4_crop08_b64_e40": {"size": 0.4, "crop_low": 0.08, "batch_size": 64, "epochs": 40},
    "p3_crop08_b64": {"size": 0.3, "crop_low": 0.08, "batch_size": 64},
    "p4_crop08_b64_t1": {"size": 0.4, "crop_low": 0.08, "batch_size": 64, "temperature": 1.0},
    "p4_crop08_b64_nogray": {"size": 0.4, "crop_low": 0.08, "batch_size": 64, "grayscale_p": 0.0},
    "zoo_rate05": {"size": 0.4, "crop_low": 0.08, "batch_size": 64, "jitter_p": 0.0, "grayscale_p": 0.0, "rate": 0.05},
    "zoo_t1": {"size": 0.4, "crop_low": 0.08, "batch_size": 64, "jitter_p": 0.0, "grayscale_p": 0.0,
               "temperature": 1.0},
    "zoo_rate095": {"size": 0.4, "crop_low": 0.08, "batch_size": 64, "jitter_p": 0.0, "grayscale_p": 0.0,
                    "rate": 0.095},
    "zoo_crop04": {"size": 0.4, "crop_low": 0.04, "batch_size": 64, "jitter_p": 0.0, "grayscale_p": 0.0},
    # held out: the other attacks, at the zoo's settings, not tuned
    "held_out_fixed": {"attack": "patch_fixed", "size": 0.4, "crop_low": 0.08, "batch_size": 64, "jitter_p": 0.0,
                       "grayscale_p": 0.0},
    "held_out_blended": {"attack": "blended", "crop_low": 0.08, "batch_size": 64, "jitter_p": 0.0, "grayscale_p": 0.0},
}


def train_encoder(x: torch.Tensor, s: dict, seed: int):
    aug = SimCLRAugmentation(s["image_size"], (s["crop_low"], 1.0), jitter_p=s["jitter_p"],
                             grayscale_p=s["grayscale_p"])
    config = SimCLRConfig(epochs=s["epochs"], batch_size=s["batch_size"], temperature=s["temperature"],
                          augmentation=aug, seed=seed)
    start = time.perf_counter()
    encoder = train_simclr(x, "small_cnn", config, show_progress=False).encoder
    return encoder, time.perf_counter() - start


def measure(encoder, train, test, triggered) -> dict:
    probe = LinearProbe(encoder, train.x, train.y)
    return {"ca": probe.accuracy(test.x, test.y), "asr": probe.attack_success_rate(triggered, test.y, TARGET),
            "knn_asr": knn_attack_success_rate(encoder, train.x, train.y, triggered, test.y, TARGET)}


def run(rows: list[str], seeds: list[int]) -> list[dict]:
    clean_cache: dict[tuple, dict] = {}
    results = []
    for seed in seeds:
        for name in rows:
            s = {**BASE, **ROWS[name]}
            train, test = load_digits(size=s["image_size"], seed=seed)
            kwargs = {} if s["attack"] == "blended" else {"size": s["size"]}
            attack = make_ssl_attack(s["attack"], **kwargs)
            poisoned = attack.poison(train, rate=s["rate"], target=TARGET, seed=seed)
            triggered = attack.apply_test(test.x, seed=seed + 1)
            encoder, seconds = train_encoder(poisoned.x, s, seed)
            row = {"name": name, "seed": seed, **measure(encoder, train, test, triggered), "s": seconds}
            clean_key = (seed, *(s[k] for k in ("image_size", "epochs", "batch_size", "temperature", "crop_low",
                                                "jitter_p", "grayscale_p")))
            if clean_key not in clean_cache:
                clean_cache[clean_key] = {"encoder": train_encoder(train.x, s, seed)[0]}
            clean = measure(clean_cache[clean_key]["encoder"], train, test, triggered)
            row.update({f"clean_{k}": v for k, v in clean.items()})
            results.append(row)
            print(format_row(row, s), flush=True)
    return results


def describe(s: dict) -> str:
    trigger = s["attack"] if s["attack"] == "blended" else f"{s['attack']} {s['size']}"
    return (f"{trigger}, {s['image_size']} px, {s['epochs']} ep, batch {s['batch_size']}, τ {s['temperature']}, "
            f"crop ≥ {s['crop_low']}, jitter {s['jitter_p']}, gray {s['grayscale_p']}")


HEADER = ("| row | settings | seed | poisoned probe CA / ASR / k-NN ASR | clean probe CA / ASR / k-NN ASR | "
          "train s |\n|---|---|---|---|---|---|")


def format_row(r: dict, s: dict) -> str:
    return (f"| {r['name']} | {describe(s)} | {r['seed']} | {r['ca']:.3f} / **{r['asr']:.3f}** / {r['knn_asr']:.3f} | "
            f"{r['clean_ca']:.3f} / {r['clean_asr']:.3f} / {r['clean_knn_asr']:.3f} | {r['s']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (data split, poison draw, training)")
    args = parser.parse_args()
    print(HEADER, flush=True)
    run(args.rows.split(","), [int(s) for s in args.seeds.split(",")])


if __name__ == "__main__":
    main()
