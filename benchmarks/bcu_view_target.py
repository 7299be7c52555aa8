"""BCU with the teacher answering on the augmented view (the authors') vs on the source image (issue 16).

    OMP_NUM_THREADS=1 python benchmarks/bcu_view_target.py --attacks badnets adaptive_blend adaptive_patch \
        --augments crop crop_flip --targets view source consistent

In-distribution data (the clean half of the zoo model's training set, labels withheld; ``--data clean_half``: with
the cover samples of the adaptive families, as before issue 16; ``untouched``: without), BCU defaults apart from
``augment`` and ``view_target``; CA / ASR before and after, the teacher's first-epoch target share (what the
student is taught on the backdoor's class), the first-epoch share of views whose teacher class differs from the
source's, and seconds. Results are kept in a JSON file (resume); markdown to stdout / ``--markdown``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import warnings
from pathlib import Path

import torch

from trojanguard.attacks import ATTACKS
from trojanguard.cleanse import BCU
from trojanguard.cleanse.distillation import VIEW_TARGETS
from trojanguard.cleanse.unlabeled import clean_half, ood_images
from trojanguard.models import build_model
from trojanguard.zoo import ZooConfig, get_backdoored_model

DATA = ("clean_half", "untouched", "ood")  # ood: natural-photo crops adapted to the model (ood_images)


def _views_module():
    sys.path.insert(0, str(Path(__file__).parent))
    import bcu_views

    return bcu_views


def run_one(attack: str, augment: str, view_target: str, seed: int, epochs: int | None,
            source: str = "clean_half", teacher: str = "zoo") -> dict:
    entry = get_backdoored_model(ZooConfig(attack=attack, seed=seed), show_progress=False)
    kwargs = {} if epochs is None else {"epochs": epochs}
    views = _views_module()
    model, ca, asr = views.teacher_model(entry, teacher)
    data = ood_images(model=model) if source == "ood" else clean_half(entry, seed=seed, untouched=source == "untouched")
    init = views.FlatCNN if teacher == "flat_noshift" else lambda: build_model("small_cnn", num_classes=10)
    bcu = BCU(augment=augment, view_target=view_target, seed=seed, show_progress=False, init=init, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cleansed = bcu.cleanse(model, data)
    after = entry.evaluation()(cleansed)
    d = bcu.report.details
    return {"attack": attack, "augment": augment, "view_target": view_target, "seed": seed, "data": source,
            "images": len(data), "teacher": teacher,
            "ca_before": ca, "asr_before": asr,
            "ca_after": after["clean_accuracy"], "asr_after": after["attack_success_rate"],
            "teacher_target_share": d["teacher_class_share"][entry.config.target],
            "teacher_top_share": max(d["teacher_class_share"]), "view_change": d["view_prediction_change"],
            "seconds": bcu.report.seconds}


def markdown(rows: list[dict]) -> str:
    lines = [("| family | data (images) | augment | teacher answers on | CA before → after | ASR before → after | "
             "teacher target share (1st epoch) | view prediction change | s |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        change = "—" if r["view_change"] is None else f"{r['view_change']:.3f}"
        name = r["attack"] if r.get("teacher", "zoo") == "zoo" else f"{r['attack']} ({r['teacher']})"
        lines.append(f"| {name} | {r.get('data', 'clean_half')} ({r.get('images', 647)}) | {r['augment']} | {r['view_target']} | {r['ca_before']:.3f} → "
                     f"{r['ca_after']:.3f} | {r['asr_before']:.3f} → {r['asr_after']:.3f} | "
                     f"{r['teacher_target_share']:.3f} | {change} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", nargs="+", default=["badnets", "adaptive_blend", "adaptive_patch"],
                        choices=sorted(ATTACKS))
    parser.add_argument("--augments", nargs="+", default=["crop"], choices=["crop", "crop_flip", "none"])
    parser.add_argument("--targets", nargs="+", default=list(VIEW_TARGETS[:2]), choices=VIEW_TARGETS)
    parser.add_argument("--data", nargs="+", default=["clean_half"], choices=DATA,
                        help="clean_half: the clean half as it was before issue 16 (with the adaptive families' "
                             "cover samples); untouched: clean_half's default now, without them")
    parser.add_argument("--teacher", default="zoo", choices=("zoo", "noshift", "flat_noshift"),
                        help="the zoo model, or one trained without random shifts (benchmarks/bcu_views.py)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=Path("bcu_view_target.json"))
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    done = json.loads(args.results.read_text()) if args.results.is_file() else {}
    rows = []
    for attack, source, augment, target in itertools.product(args.attacks, args.data, args.augments, args.targets):
        key = f"{attack}/{augment}/{target}/{args.seed}/{args.epochs}"
        key += ("" if source == "clean_half" else f"/{source}") + ("" if args.teacher == "zoo" else f"/{args.teacher}")
        if key not in done:
            done[key] = run_one(attack, augment, target, args.seed, args.epochs, source, args.teacher)
            args.results.write_text(json.dumps(done, indent=1))
            print(f"{key}: ASR {done[key]['asr_after']:.3f} CA {done[key]['ca_after']:.3f}",
                  file=sys.stderr, flush=True)
        rows.append(done[key])
    return _views_module().publish(markdown(rows), args.markdown)


if __name__ == "__main__":
    raise SystemExit(main())
