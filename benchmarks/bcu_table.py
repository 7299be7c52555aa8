"""BCU on the attack zoo: the results table and the re-initialisation ablation (issue 5).

    .venv/bin/python benchmarks/bcu_table.py                       # small CNN: table + ablation
    .venv/bin/python benchmarks/bcu_table.py --arch resnet18_cifar --attacks badnets blended --rules authors adaptive

For every (architecture, attack, data source, rule) BCU runs with its defaults and reports CA / ASR before
and after, DER (METHODS.md §6) and seconds. In-distribution data = the clean half of the zoo model's training
set, labels withheld (:func:`trojanguard.cleanse.unlabeled.clean_half`); out-of-distribution data = 2 000 crops
of natural photos adapted to the model (:func:`trojanguard.cleanse.unlabeled.ood_images` with ``model=``);
``ood:dead_leaves`` / ``ood:fractal``: 2 000 procedural images, adapted the same way. Results are kept in a JSON file next to the
zoo cache, so an interrupted run resumes; the markdown tables go to stdout (and to ``--markdown``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from trojanguard.cleanse import BCU
from trojanguard.cleanse.bcu import adaptive_scale, rule_ratios
from trojanguard.cleanse.unlabeled import clean_half, ood_images
from trojanguard.metrics import defense_effectiveness_rating
from trojanguard.models import build_model
from trojanguard.zoo import ZooConfig, cache_dir, get_backdoored_model

ATTACKS = ("badnets", "blended", "sig", "wanet", "trojan")
SOURCES = ("in", "ood")
RULES = ("none", "uniform", "authors", "adaptive")
SOURCE_NAMES = {"in": "in-distribution", "ood": "out-of-distribution", "ood:dead_leaves": "OOD dead leaves",
                "ood:fractal": "OOD fractal noise"}


def reinit_rule(rule: str, model: torch.nn.Module):
    """A rule name of BCU, or ``adaptive@F``: the adaptive shape scaled so that a fraction F of the paths along
    ``model``'s least-perturbed route stays intact (the default rule is ``adaptive@0.01``)."""
    if "@" not in rule:
        return rule
    intact = float(rule.split("@", 1)[1])
    return lambda layers: rule_ratios("adaptive", layers, adaptive_scale(layers, model, -math.log(intact)))


def run_one(arch: str, attack: str, source: str, rule: str, epochs: int | None, seed: int, image_size: int) -> dict:
    config = ZooConfig(attack=attack, arch=arch, seed=seed, image_size=image_size)
    entry = get_backdoored_model(config, show_progress=False)
    channels = entry.test.x.shape[1]
    ood_info: dict = {}
    data_start = time.perf_counter()
    data = clean_half(entry, seed=seed) if source == "in" else ood_images(
        size=entry.test.x.shape[-1], channels=channels, seed=seed, model=entry.model, info=ood_info,
        source=source.partition(":")[2] or "photos")
    data_seconds = time.perf_counter() - data_start
    kwargs = {} if epochs is None else {"epochs": epochs}
    bcu = BCU(reinit=reinit_rule(rule, entry.model), seed=seed, show_progress=False,
              init=lambda: build_model(arch, num_classes=entry.test.num_classes, in_channels=channels), **kwargs)
    evaluation = entry.evaluation()
    cleansed = bcu.cleanse(entry.model, data)
    after = evaluation(cleansed)
    ca0, asr0 = entry.clean_accuracy, entry.attack_success_rate
    ca1, asr1 = after["clean_accuracy"], after["attack_success_rate"]
    return {"arch": arch, "attack": attack, "source": source, "rule": rule, "images": bcu.report.images,
            "image_size": image_size, "zoo_train_seconds": entry.train_seconds,
            "epochs": bcu.epochs, "ca_before": ca0, "asr_before": asr0, "ca_after": ca1, "asr_after": asr1,
            "der": defense_effectiveness_rating(asr0, asr1, ca0, ca1), "seconds": bcu.report.seconds,
            "cpu_seconds": bcu.report.details["cpu_seconds"],
            "ratios": [round(layer["ratio"], 4) for layer in bcu.report.details["layers"]],
            "reinitialised_fraction": bcu.report.details["reinitialised_fraction"],
            "normalisation_gap": bcu.report.details["normalisation_gap"],
            "batch_stat_agreement": bcu.report.details.get("batch_stat_agreement"), "domain": bcu.report.details["domain"],
            "ood_view": ood_info.get("view"), "data_seconds": data_seconds}


def key(arch: str, attack: str, source: str, rule: str, epochs: int | None, seed: int, image_size: int) -> str:
    size = "" if image_size == ZooConfig.image_size else f"/{image_size}px"
    return f"{arch}/{attack}/{source}/{rule}/{epochs or 'default'}/{seed}{size}"


def table(rows: list[dict]) -> str:
    lines = ["| attack | data | CA before | CA after | ΔCA (pts) | ASR before | ASR after | DER | wall s | CPU s | data s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['attack']} | {SOURCE_NAMES[r['source']]} | {r['ca_before']:.3f} | {r['ca_after']:.3f} | "
                     f"{100 * (r['ca_after'] - r['ca_before']):+.1f} | {r['asr_before']:.3f} | {r['asr_after']:.3f} | "
                     f"{r['der']:.3f} | {r['seconds']:.0f} | {r['cpu_seconds']:.0f} | "
                     + (f"{r['data_seconds']:.0f} |" if "data_seconds" in r else "— |"))
    return "\n".join(lines)


def ablation(rows: list[dict], rules: list[str]) -> str:
    head = "| attack | data | " + " | ".join(f"{r}: CA / ASR" for r in rules) + " |"
    lines = [head, "|---|---|" + "---|" * len(rules)]
    cells: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        cells.setdefault((r["attack"], r["source"]), {})[r["rule"]] = r
    for (attack, source), by_rule in cells.items():
        parts = [f"{by_rule[rule]['ca_after']:.3f} / {by_rule[rule]['asr_after']:.3f}" if rule in by_rule else "—"
                 for rule in rules]
        lines.append(f"| {attack} | {SOURCE_NAMES[source]} | " + " | ".join(parts) + " |")
    ratios = {rule: next((r["ratios"] for r in rows if r["rule"] == rule), None) for rule in rules}
    lines.append("")
    lines.append("Per-layer ratios (forward order): " + "; ".join(
        f"{rule} {runs(ratios[rule])}" for rule in rules if ratios[rule] is not None))
    return "\n".join(lines)


def runs(ratios: list[float]) -> str:
    """Ratios with repeats folded, e.g. ``0.08 ×5, 0.22 ×5, 0.58`` for a ResNet-18's 21 layers."""
    groups = [(value, len(list(group))) for value, group in itertools.groupby(round(r, 3) for r in ratios)]
    return ", ".join(f"{value:g}" + (f" ×{count}" if count > 1 else "") for value, count in groups)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """The machine a table was measured on: CPU, cores, torch threads, the CPU instruction set torch uses."""
    return (f"Machine: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, "
            f"python {platform.python_version()}")


def publish(text: str, markdown: Path | None) -> int:
    """Print a benchmark's tables and write them to ``markdown`` when given; the script's exit status (0)."""
    print(text)
    if markdown:
        markdown.write_text(text + "\n")
    return 0


def rule_arg(text: str) -> str:
    if text in RULES or (text.startswith("adaptive@") and 0 < float(text.split("@", 1)[1]) < 1):
        return text
    raise argparse.ArgumentTypeError(f"expected one of {RULES} or adaptive@F with F in (0, 1), got {text!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCE_NAMES))
    parser.add_argument("--rules", nargs="+", default=list(RULES), type=rule_arg,
                        help="re-initialisation rules (none, uniform, authors, adaptive, or adaptive@F: the adaptive "
                             "shape with a fraction F of paths intact); the first table uses 'adaptive'")
    parser.add_argument("--epochs", type=int, help="override BCU's default epochs (reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=ZooConfig.image_size,
                        help="side of the zoo's digits images (default 32; 16 makes ResNet-18 4× cheaper)")
    parser.add_argument("--results", type=Path, default=None, help="JSON file of finished runs (resume)")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    parser.add_argument("--cached-only", action="store_true", help="only tabulate finished runs, start none")
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    results_path = args.results or cache_dir() / "bcu_table.json"
    done = json.loads(results_path.read_text()) if results_path.is_file() else {}
    rows = []
    order = sorted(args.rules, key=lambda r: r != "adaptive")  # the main table first
    for rule, source, attack in itertools.product(order, args.sources, args.attacks):
        k = key(args.arch, attack, source, rule, args.epochs, args.seed, args.image_size)
        if k not in done and args.cached_only:
            continue
        if k not in done:
            start = time.perf_counter()
            done[k] = run_one(args.arch, attack, source, rule, args.epochs, args.seed, args.image_size)
            results_path.parent.mkdir(parents=True, exist_ok=True)
            results_path.write_text(json.dumps(done, indent=1))
            print(f"[{time.perf_counter() - start:5.0f}s] {k}: CA {done[k]['ca_after']:.3f} "
                  f"ASR {done[k]['asr_after']:.3f}", file=sys.stderr, flush=True)
        rows.append(done[k])
    rows.sort(key=lambda r: (args.attacks.index(r["attack"]), args.sources.index(r["source"])))
    out = [machine_line(),
           f"Command: .venv/bin/python benchmarks/bcu_table.py {' '.join(argv if argv is not None else sys.argv[1:])}",
           "", f"### BCU (adaptive) on {args.arch}, {args.image_size}×{args.image_size} digits", "", table([r for r in rows if r["rule"] == "adaptive"])]
    if len(args.rules) > 1:
        out += ["", f"### Ablation of the re-initialisation rule on {args.arch} (CA / ASR after BCU)", "",
                ablation(rows, args.rules)]
    return publish("\n".join(out), args.markdown)


if __name__ == "__main__":
    sys.exit(main())
