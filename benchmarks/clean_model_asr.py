"""The attack success rate a never-poisoned model already has: each family's test trigger on a model trained on the
clean digits (same split, architecture and training as the zoo's), so a cleanser's residual ASR can be read against
what no backdoor at all gives (issue 16: the colour filter changes grey digits enough that a clean model sends some
of them to the target class).

Run: ``python benchmarks/clean_model_asr.py [--arch small_cnn] [--image-size 32] [--seeds 0 1] [--attacks tact]
[--results benchmarks/clean_model_asr_results.jsonl]``; rows already in the results file are skipped. ASR counts the
test images the attack counts (a source-specific family: its source classes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bcu_families import FAMILIES, UNSEEN
from jsonl_rows import emit, read_rows

from trojanguard.metrics import attack_success_rate, clean_accuracy
from trojanguard.zoo import ZooConfig, load_dataset, train_zoo_classifier, triggered_test_images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--image-size", type=int, default=ZooConfig.image_size)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--attacks", nargs="+", default=list(FAMILIES), choices=FAMILIES + UNSEEN)
    args = parser.parse_args(argv)
    done = {(r["arch"], r["image_size"], r["seed"], r["attack"]) for r in read_rows(args.results)}
    for seed in args.seeds:
        todo = [a for a in args.attacks if (args.arch, args.image_size, seed, a) not in done]
        if not todo:
            continue
        config = ZooConfig(arch=args.arch, image_size=args.image_size, seed=seed)
        train, test = load_dataset(config.dataset, config.image_size, seed)
        model = train_zoo_classifier(config, train, show_progress=False).eval()
        ca = clean_accuracy(model, test.x, test.y)
        for attack in todo:
            zoo = ZooConfig(attack=attack, arch=args.arch, image_size=args.image_size, seed=seed)
            trigger = zoo.make_attack()
            triggered = triggered_test_images(trigger, test.x, seed)
            emit({"arch": args.arch, "image_size": args.image_size, "seed": seed, "attack": attack,
                  "clean_accuracy": ca,
                  "clean_model_asr": attack_success_rate(model, triggered, test.y, zoo.target, trigger)},
                 args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
