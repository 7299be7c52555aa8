"""The attack zoo's families (issue 15): CA / ASR of a zoo model per family × poison rate.

    .venv/bin/python benchmarks/zoo_families.py                               # small CNN, 10 families × 1/5/10 %
    .venv/bin/python benchmarks/zoo_families.py --rates 0.1 --arch resnet18_cifar --attacks filter ftrojan

Every model is trained through ``get_backdoored_model(ZooConfig(attack=..., poison_rate=...))`` with the zoo's
settings (``ZOO_ATTACK_DEFAULTS``), seed ``--seed``, target class 0. Rate semantics: dirty-label families poison
``rate`` × the training set (non-target samples relabelled); cover / cross samples of the adaptive and input-aware
families come on top, with true labels. Clean-label families (label_consistent) poison target-class samples only:
the same *number* of samples as a dirty-label family at that rate, i.e. ``rate × N / N_target`` of the target class,
capped at the zoo's clean-label default (80 % of the class: poisoning the whole class leaves no clean example of
it, and the model then knows the class only by its trigger). Results are kept in a JSON file (resume); the markdown table goes to stdout (and to
``--markdown``). The key holds the attack's repr, so a changed zoo setting is a new row (retrain it with
``--retrain``, as the zoo's model cache is keyed by the ZooConfig alone).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from trojanguard.attacks import FAMILIES
from trojanguard.data import load_digits
from trojanguard.zoo import DEFAULT_CLEAN_LABEL_RATE, ZooConfig, cache_dir, get_backdoored_model

RATES = (0.01, 0.05, 0.1)
BAR_CA, BAR_ASR = 0.95, 0.9
SOURCE_SPECIFIC_NOTE = ("A source-specific family's ASR counts triggered test images of its source classes; (others …): "
                        "its ASR on the other non-target classes, low when the backdoor is source-specific.")


def machine_line() -> str:
    return _bcu_table().machine_line()


def publish(text: str, markdown: Path | None) -> int:
    return _bcu_table().publish(text, markdown)


def _bcu_table():
    """benchmarks/bcu_table.py, the shared machine line and table output of the benchmark scripts."""
    sys.path.insert(0, str(Path(__file__).parent))
    import bcu_table

    return bcu_table


def zoo_rate(attack: str, rate: float, config: ZooConfig) -> float:
    """The ``poison_rate`` handed to the zoo: ``rate`` as is, or its clean-label equivalent (see the module doc)."""
    clean_label = config.make_attack().clean_label
    if not clean_label:
        return rate
    train, _ = load_digits(size=config.image_size, seed=config.seed)
    in_target = int((train.y == config.target).sum())
    return min(DEFAULT_CLEAN_LABEL_RATE, rate * len(train) / in_target)


def run_one(arch: str, attack: str, rate: float, seed: int, retrain: bool, image_size: int = ZooConfig.image_size
            ) -> dict:
    base = ZooConfig(attack=attack, arch=arch, seed=seed, image_size=image_size)
    config = ZooConfig(attack=attack, arch=arch, seed=seed, poison_rate=zoo_rate(attack, rate, base),
                       image_size=image_size)
    start = time.perf_counter()
    entry = get_backdoored_model(config, retrain=retrain, show_progress=False)
    return {"arch": arch, "attack": attack, "rate": rate, "zoo_poison_rate": config.poison_rate,
            "poisoned": len(entry.train.poison_indices), "attack_repr": repr(entry.attack),
            "clean_label": entry.attack.clean_label, "ca": entry.clean_accuracy, "asr": entry.attack_success_rate,
            "asr_others": entry.other_classes_attack_success_rate, "train_seconds": entry.train_seconds,
            "seconds": time.perf_counter() - start}


def key(arch: str, attack: str, rate: float, seed: int, image_size: int = ZooConfig.image_size) -> str:
    size = "" if image_size == ZooConfig.image_size else f"/{image_size}px"
    return f"{arch}/{attack}/{rate:g}/{seed}{size}"


def table(rows: list[dict], rates: list[float]) -> str:
    head = "| family | " + " | ".join(f"{100 * r:g} %: CA / ASR" for r in rates) + " | train s (10 %) |"
    lines = [head, "|---|" + "---|" * (len(rates) + 1)]
    cells: dict[str, dict[float, dict]] = {}
    for r in rows:
        cells.setdefault(r["attack"], {})[r["rate"]] = r
    for attack, by_rate in cells.items():
        parts = []
        for rate in rates:
            r = by_rate.get(rate)
            if r is None:
                parts.append("—")
                continue
            mark = "" if r["ca"] >= BAR_CA and r["asr"] >= BAR_ASR else " ✗"
            others = "" if r.get("asr_others") is None else f" (others {r['asr_others']:.3f})"
            parts.append(f"{r['ca']:.3f} / {r['asr']:.3f}{others}{mark}")
        seconds = by_rate.get(0.1, {}).get("train_seconds")
        lines.append(f"| {attack} | " + " | ".join(parts) + f" | {'—' if seconds is None else f'{seconds:.0f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--attacks", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--rates", nargs="+", type=float, default=list(RATES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=None, help="JSON file of finished runs (resume)")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--retrain", action="store_true", help="retrain zoo models even when cached")
    parser.add_argument("--cached-only", action="store_true", help="only tabulate finished runs, start none")
    parser.add_argument("--image-size", type=int, default=ZooConfig.image_size,
                        help="digits upscaled to this side (ResNet-18 on 2 cores: 16)")
    args = parser.parse_args(argv)
    results_path = args.results or cache_dir() / "zoo_families.json"
    done = json.loads(results_path.read_text()) if results_path.is_file() else {}
    rows = []
    for attack in args.attacks:
        for rate in args.rates:
            k = key(args.arch, attack, rate, args.seed, args.image_size)
            expected = repr(ZooConfig(attack=attack).make_attack())
            stale = k in done and done[k]["attack_repr"] != expected  # the zoo setting changed since
            if (k not in done or stale or args.retrain) and not args.cached_only:
                done[k] = run_one(args.arch, attack, rate, args.seed, args.retrain or stale, args.image_size)
                results_path.parent.mkdir(parents=True, exist_ok=True)
                results_path.write_text(json.dumps(done, indent=1))
                others = done[k].get("asr_others")
                print(f"[{done[k]['seconds']:5.0f}s] {k}: CA {done[k]['ca']:.3f} ASR {done[k]['asr']:.3f}"
                      + ("" if others is None else f" (other classes {others:.3f})"), file=sys.stderr, flush=True)
            if k in done:
                rows.append(done[k])
    out = [machine_line(),
           f"Command: .venv/bin/python benchmarks/zoo_families.py {' '.join(argv if argv is not None else sys.argv[1:])}",
           f"Seed {args.seed}, target 0, {args.image_size}×{args.image_size} digits, {ZooConfig.epochs} epochs; ✗: below CA {BAR_CA} or ASR {BAR_ASR}.",
           *([SOURCE_SPECIFIC_NOTE] if any(r.get("asr_others") is not None for r in rows) else []),
           "", f"### Attack zoo families on {args.arch}", "", table(rows, args.rates)]
    return publish("\n".join(out), args.markdown)


if __name__ == "__main__":
    sys.exit(main())
