"""How much BCU's out-of-distribution result moves with the zoo model, the data and BCU's own randomness (issue 13).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bcu_seed_spread.py --results spread.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bcu_seed_spread.py --results spread.json --zoo-seeds 0 \\
        --bcu-seeds 0 --tag avx2      # with ATEN_CPU_CAPABILITY=avx2 and a cache of its own: another "machine"

For every attack, zoo seed (the backdoored model: its data split, poison draw and training) and BCU seed (the
photo crops drawn, the view and class-balanced subset, the re-initialisation masks and fresh values, the batch
order), BCU runs with its defaults on out-of-distribution data, as ``tests/cleanse`` does, and CA / ASR after are
recorded. ``--source in`` does the same with the clean half of the training set. Finished runs are kept in the
results JSON, so an interrupted run resumes; the table of every run and its spread (min / median / max) goes to
stdout and to ``--markdown``.
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

from bcu_table import machine_line, publish  # benchmarks/ is on the path when run as a script

from trojanguard.cleanse import BCU
from trojanguard.cleanse.augment import AUGMENTATIONS
from trojanguard.cleanse.bcu import parse_reinit
from trojanguard.cleanse.unlabeled import clean_half, ood_images
from trojanguard.models import build_model
from trojanguard.zoo import ZooConfig, cache_dir, get_backdoored_model

SOURCES = ("in", "ood")


def run_one(attack: str, zoo_seed: int, bcu_seed: int, source: str, arch: str, reinit=None,
            augment: str | None = None) -> dict:
    entry = get_backdoored_model(ZooConfig(attack=attack, arch=arch, seed=zoo_seed), show_progress=False)
    channels = entry.test.x.shape[1]
    data = (clean_half(entry, seed=bcu_seed) if source == "in"
            else ood_images(size=entry.test.x.shape[-1], channels=channels, seed=bcu_seed, model=entry.model))
    candidate = {**({} if reinit is None else {"reinit": reinit}), **({} if augment is None else {"augment": augment})}
    bcu = BCU(seed=bcu_seed, show_progress=False, **candidate,
              init=lambda: build_model(arch, num_classes=entry.test.num_classes, in_channels=channels))
    cleansed = bcu.cleanse(entry.model, data)
    after = entry.evaluation()(cleansed)
    return {"attack": attack, "zoo_seed": zoo_seed, "bcu_seed": bcu_seed, "source": source, "arch": arch,
            "ca_before": entry.clean_accuracy, "asr_before": entry.attack_success_rate,
            "ca_after": after["clean_accuracy"], "asr_after": after["attack_success_rate"],
            "domain": bcu.report.details["domain"], "agreement": bcu.report.details.get("batch_stat_agreement"),
            "seconds": bcu.report.seconds, "zoo_train_seconds": entry.train_seconds}


def spread(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def tables(rows: list[dict]) -> str:
    lines = ["| machine | attack | zoo seed | CA / ASR before | CA / ASR after, BCU seed 0, 1, 2 … |", "|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["tag"], r["attack"], r["zoo_seed"]), []).append(r)
    for (tag, attack, zoo_seed), runs in sorted(groups.items()):
        runs.sort(key=lambda r: r["bcu_seed"])
        after = ", ".join(f"{r['ca_after']:.3f} / {r['asr_after']:.3f}" for r in runs)
        lines.append(f"| {tag} | {attack} | {zoo_seed} | {runs[0]['ca_before']:.3f} / {runs[0]['asr_before']:.3f} | "
                     f"{after} |")
    lines += ["", "| machine | attack | runs | ASR after: min / median / max | CA drop (pts): min / median / max |",
              "|---|---|---|---|---|"]
    by_attack: dict[tuple, list[dict]] = {}
    for r in rows:
        by_attack.setdefault((r["tag"], r["attack"]), []).append(r)
    for (tag, attack), runs in sorted(by_attack.items()):
        drops = [100 * (r["ca_before"] - r["ca_after"]) for r in runs]
        lines.append(f"| {tag} | {attack} | {len(runs)} | {spread([r['asr_after'] for r in runs])} | "
                     f"{min(drops):.1f} / {statistics.median(drops):.1f} / {max(drops):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", nargs="+", default=["badnets", "blended"])
    parser.add_argument("--zoo-seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--bcu-seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--source", choices=SOURCES, default="ood")
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--reinit", type=parse_reinit, default=None,
                        help="BCU's re-initialisation rule or ratio instead of its default (a candidate; the table "
                             "names it beside the machine)")
    parser.add_argument("--augment", choices=AUGMENTATIONS, default=None,
                        help="BCU's augmentation instead of its default (a candidate; named beside the machine)")
    parser.add_argument("--tag", default="this machine", help="name of the machine setting, e.g. avx2 (table column)")
    parser.add_argument("--shard", default="0/1", help="K/N: run only every N-th configuration from the K-th "
                                                         "(two processes on two cores)")
    parser.add_argument("--results", type=Path, default=None, help="JSON file of finished runs (resume)")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    parser.add_argument("--report-only", action="store_true", help="only tabulate finished runs, start none")
    args = parser.parse_args(argv)
    shard, shards = (int(part) for part in args.shard.split("/"))
    results_path = args.results or cache_dir() / "bcu_seed_spread.json"
    done = json.loads(results_path.read_text()) if results_path.is_file() else {}
    configs = list(itertools.product(args.attacks, args.zoo_seeds, args.bcu_seeds))
    tag = args.tag + ("" if args.reinit is None else f", reinit {args.reinit}") + (
        "" if args.augment is None else f", augment {args.augment}")
    for attack, zoo_seed, bcu_seed in configs[shard::shards]:
        key = f"{tag}/{args.arch}/{args.source}/{attack}/zoo{zoo_seed}/bcu{bcu_seed}"
        done = json.loads(results_path.read_text()) if results_path.is_file() else {}  # other shards write too
        if key in done or args.report_only:
            continue
        start = time.perf_counter()
        row = {"tag": tag, **run_one(attack, zoo_seed, bcu_seed, args.source, args.arch, args.reinit, args.augment)}
        results_path.parent.mkdir(parents=True, exist_ok=True)
        with open(results_path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # shards share the file: read, add, replace under one lock
            done = json.loads(results_path.read_text()) if results_path.is_file() else {}
            done[key] = row
            temporary = results_path.with_suffix(".tmp")
            temporary.write_text(json.dumps(done, indent=1))
            temporary.replace(results_path)
        print(f"[{time.perf_counter() - start:5.0f}s] {key}: CA {row['ca_after']:.3f} ASR {row['asr_after']:.3f}",
              file=sys.stderr, flush=True)
    done = json.loads(results_path.read_text()) if results_path.is_file() else {}
    rows = [r for r in done.values() if r["source"] == args.source and r["arch"] == args.arch]
    return publish("\n".join([machine_line(), f"Command: benchmarks/bcu_seed_spread.py {' '.join(argv or sys.argv[1:])}",
                                "", tables(rows)]), args.markdown)


if __name__ == "__main__":
    sys.exit(main())
