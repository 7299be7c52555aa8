"""BCU's defaults chosen leave one family out, on two architectures (issue 16).

    OMP_NUM_THREADS=1 python benchmarks/bcu_families.py --teachers zoo flat_noshift noshift \
        --results benchmarks/bcu_families_results.jsonl                       # run what is missing, then report
    python benchmarks/bcu_families.py --report-only --results benchmarks/bcu_families_results.jsonl

For every (teacher, family, candidate setting) BCU cleanses the teacher in distribution (the clean half of its
training set without the images the attack changed, labels withheld: ``clean_half``; ``--data ood``: photo crops
adapted to the model; ``--data folder``: a user's folder of neighbouring images, read as the CLI reads a folder;
``--data folder_adapted``: that folder through the photo crops' adaptation) and the row keeps CA / ASR before and
after. ``--seeds 0 1 2``: each seed is another zoo model and its own cell of the choice (far data: issue 16's
far-data defaults were chosen over 14 families at seed 0 and three families at seeds 1 and 2). Teachers: ``zoo`` (the zoo's small CNN, trained
with ±2 px shifts), ``flat_noshift`` (a flatten-head CNN trained on the same poisoned set without shifts: another
architecture *and* another training recipe, ``benchmarks/bcu_views.py``), ``noshift`` (the zoo's small CNN
trained without shifts) and ``resnet18`` (the zoo's CIFAR ResNet-18 at 16 px: a held-out architecture). Candidates are named BCU settings (``SETTINGS``), one or two knobs away from the defaults
before issue 16 (``old_default``, among them). A cell counts only where the attack implanted on that teacher (ASR
before ≥ 0.9, CA before ≥ 0.95: the zoo's bar).

Leave one family out: for each family F the setting is chosen on the *other* families (every teacher), by the
number of (teacher, family) cells that meet the issue's bar (ASR ≤ 5 % and a CA drop ≤ 3 points), ties broken by
the smaller mean excess over the bar, then by the shorter mean run time; the held-out table reports the chosen
setting's result on F. The in-sample table (every setting on every family) is printed beside it, never used to
report a default.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torchvision.transforms.functional import to_pil_image

sys.path.insert(0, str(Path(__file__).parent))
from bcu_table import machine_line, publish
from bcu_views import FlatCNN, teacher_model
from jsonl_rows import emit, read_rows

from trojanguard.cleanse import BCU
from trojanguard.cleanse.unlabeled import DEFAULT_OOD_IMAGES, adapt_to_model, clean_half, ood_images
from trojanguard.data import load_image_folder
from trojanguard.data.digits import COLOUR_SEED, colourize
from trojanguard.models import build_model
from trojanguard.zoo import ZooConfig, get_backdoored_model

# label_consistent does not implant on the digits (RESULTS.md, "Attack zoo: families"): nothing to remove
FAMILIES = ("badnets", "blended", "sig", "wanet", "trojan", "issba", "lowfreq", "filter", "refool", "adaptive_blend",
            "ftrojan", "patch_random", "input_aware", "adaptive_patch")
# families added to the zoo after BCU's defaults were chosen (never in a choice): run by name, held out by construction
UNSEEN = ("bpp", "tact")
TEACHERS = ("zoo", "flat_noshift", "noshift", "resnet18")
# teachers that are another zoo model: the zoo's CIFAR ResNet-18 at 16 px (a 2-core budget, as issue 15's
# held-out architecture), never seen by any choice of BCU's defaults
ZOO_TEACHERS = {"resnet18": {"arch": "resnet18_cifar", "image_size": 16}}
# Candidate settings: BCU keywords one or two knobs away from OLD_DEFAULT (BCU's defaults before this benchmark
# chose new ones), each pinned on top of it, so a rerun measures the same thing whatever BCU's defaults are now.
OLD_DEFAULT = {"augment": "crop", "intact_paths": 0.01, "view_target": "auto", "epochs": 20, "reinit": "adaptive"}
SETTINGS: dict[str, dict] = {
    "old_default": {},
    "view": {"view_target": "view"},
    "source": {"view_target": "source"},
    "epochs40": {"epochs": 40},
    "intact5%": {"intact_paths": 0.05},
    "intact0.2%": {"intact_paths": 0.002},
    "no_augment": {"augment": "none"},
    # two knobs: a stronger perturbation with more epochs to recover clean accuracy, and without augmentation
    "intact0.2%+epochs40": {"intact_paths": 0.002, "epochs": 40},
    "intact0.2%+no_augment": {"intact_paths": 0.002, "augment": "none"},  # chosen: BCU's in-distribution default
    "epochs40+no_augment": {"epochs": 40, "augment": "none"},
    # the re-initialisation rule (eleventh session): the in-distribution default with the adaptive rule's total
    # hazard spread evenly over the layers (``uniform``), which removed Blended from the ResNet-18 (issue 5's ablation)
    "uniform": {"reinit": "uniform", "intact_paths": 0.002, "augment": "none"},
    "uniform+epochs40+no_augment": {"reinit": "uniform", "epochs": 40, "augment": "none"},  # far data's, uniform
    # far data (eighteenth session): every weight re-initialised (a fresh student; normalisation statistics copied),
    # since data far from the training set cannot retrain what a kept weight still carries (BadNets' seed spread)
    "fresh+epochs40+no_augment": {"reinit": 1.0, "epochs": 40, "augment": "none"},
    # far data (nineteenth session): uniform (removes what adaptive keeps of BadNets) with Gaussian noise on the
    # student's view, the teacher answering on the source, so the student learns to ignore a blend-sized change
    # (uniform alone left Blended's far tail at 0.135)
    "uniform+noise+epochs40": {"reinit": "uniform", "epochs": 40, "augment": "noise"},
    # ... with half as many steps again (twenty-ninth session): its clean-accuracy misses on the seed spread were
    # 3.1-3.9 points, and more steps won back clean accuracy before (images4000 / epochs40 in the tenth session)
    "uniform+noise+epochs60": {"reinit": "uniform", "epochs": 60, "augment": "noise"},
    # far data (--data ood): a weaker perturbation, to keep more of the clean accuracy photos cannot restore
    "intact2%+no_augment": {"intact_paths": 0.02, "augment": "none"},
    # ... or more steps: twice the photo crops ("images": the size of --data ood's set; or epochs40+no_augment)
    "images4000+no_augment": {"images": 4000, "augment": "none"},
    # far data (thirty-second session): the far default on another source ("ood_source": --data ood's source), half
    # photo crops and half strokes (line drawings; the photo crops did not teach a thin "1"), or strokes alone
    "mix+epochs40+no_augment": {"ood_source": "photos+strokes", "epochs": 40, "augment": "none"},
    "strokes+epochs40+no_augment": {"ood_source": "strokes", "epochs": 40, "augment": "none"},
    # ... the mix in the view with the least normalisation gap ("ood_view_rule"; the entropy rule's grey photo view
    # lost the random-place patch's "1")
    "mix+gapview+epochs40+no_augment": {"ood_source": "photos+strokes", "ood_view_rule": "gap", "epochs": 40,
                                        "augment": "none"},
}
ASR_BAR, CA_DROP_BAR = 0.05, 0.03


def user_folder(entry, seed: int) -> torch.Tensor:
    """A user's own folder of neighbouring images: the clean half re-rendered as colour digits (other ink and paper
    colours, a texture), written as PNG files and read back the way ``trojanguard cleanse --data FOLDER`` reads them."""
    grey = clean_half(entry, seed=seed)
    with tempfile.TemporaryDirectory() as folder:
        for i, image in enumerate(colourize(grey, seed=COLOUR_SEED)):
            to_pil_image(image).save(Path(folder) / f"{i:05d}.png")
        return load_image_folder(folder, size=grey.shape[-1], channels=grey.shape[1]).x


def unlabeled(entry, model, source: str, seed: int, images: int = DEFAULT_OOD_IMAGES,
              ood_source: str = "photos", ood_view_rule: str = "entropy") -> torch.Tensor:
    if source == "in":
        return clean_half(entry, seed=seed)
    if source == "ood":
        return ood_images(images, model=model, seed=seed, source=ood_source, view_rule=ood_view_rule)
    folder = user_folder(entry, seed)
    return folder if source == "folder" else adapt_to_model(model, folder, len(folder) // 2, seed)


def run_one(teacher: str, attack: str, setting: str, seed: int, source: str = "in") -> dict:
    entry = get_backdoored_model(ZooConfig(attack=attack, seed=seed, **ZOO_TEACHERS.get(teacher, {})),
                                 show_progress=False)
    model, ca, asr = teacher_model(entry, "zoo" if teacher in ZOO_TEACHERS else teacher)
    kwargs = {**OLD_DEFAULT, **SETTINGS[setting]}
    data = unlabeled(entry, model, source, seed, kwargs.pop("images", DEFAULT_OOD_IMAGES),
                     kwargs.pop("ood_source", "photos"), kwargs.pop("ood_view_rule", "entropy"))
    init = FlatCNN if teacher == "flat_noshift" else (lambda: build_model(entry.config.arch, num_classes=10))
    bcu = BCU(seed=seed, show_progress=False, init=init, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cleansed = bcu.cleanse(model, data)
    after = entry.evaluation()(cleansed)
    d = bcu.report.details
    return {"teacher": teacher, "attack": attack, "setting": setting, "seed": seed, "data": source, "images": len(data),
            "ca_before": ca, "asr_before": asr, "ca_after": after["clean_accuracy"],
            "asr_after": after["attack_success_rate"], "view_target": d["view_target"],
            "view_class_gain": d["view_class_gain"], "teacher_top_share": max(d["teacher_class_share"]),
            "reinitialised_fraction": d["reinitialised_fraction"],
            "teacher_student_agreement": d["teacher_student_agreement"], "seconds": bcu.report.seconds}


def implanted(row: dict) -> bool:
    return row["asr_before"] >= 0.9 and row["ca_before"] >= 0.95


def meets(row: dict) -> bool:
    return row["asr_after"] <= ASR_BAR and row["ca_before"] - row["ca_after"] <= CA_DROP_BAR


def excess(row: dict) -> float:
    """How far a row is from the bar: ASR above 5 % plus CA drop above 3 points (0 when met)."""
    return max(0.0, row["asr_after"] - ASR_BAR) + max(0.0, row["ca_before"] - row["ca_after"] - CA_DROP_BAR)


def choose(rows: list[dict], settings: list[str], held_out: str, held_out_teacher: str | None = None) -> str:
    """The setting a user would pick without family ``held_out``: most cells met on the other families (every
    teacher), then the smallest mean excess, then the cheapest (mean seconds). Only settings measured on every one
    of those cells compete. ``held_out_teacher``: also choose without that teacher's rows."""
    rows = [r for r in rows if r["attack"] != held_out and r["teacher"] != held_out_teacher]
    cells = {(r["teacher"], r["attack"]) for r in rows}
    best, best_key = settings[0], None
    for setting in settings:
        mine = {(r["teacher"], r["attack"]): r for r in rows if r["setting"] == setting}
        if set(mine) != cells:
            continue
        n = max(1, len(mine))
        key = (-sum(meets(r) for r in mine.values()), sum(excess(r) for r in mine.values()) / n,
               sum(r["seconds"] for r in mine.values()) / n)
        if best_key is None or key < best_key:
            best, best_key = setting, key
    return best


def cell(row: dict | None) -> str:
    if row is None:
        return "—"
    drop = 100 * (row["ca_before"] - row["ca_after"])
    text = f"{row['asr_after']:.3f} / {-drop:+.1f}"
    return text if meets(row) else f"**{text}**"


def report(rows: list[dict], settings: list[str], teachers: list[str], families: list[str]) -> str:
    index = {(r["teacher"], r["attack"], r["setting"]): r for r in rows}
    out = ["### Held out: the setting chosen on the other families (cell: ASR after / ΔCA points; bold: bar not met)",
           "", "| family | chosen on the others | " + " | ".join(f"{t}: before (CA / ASR)" for t in teachers)
           + " | " + " | ".join(f"{t}: after" for t in teachers) + " |",
           "|---|---|" + "---|" * (2 * len(teachers))]
    met = total = 0
    for family in families:
        chosen = choose(rows, settings, family)
        picked = [index.get((t, family, chosen)) for t in teachers]
        before = [f"{r['ca_before']:.3f} / {r['asr_before']:.3f}" if r else "—" for r in picked]
        met += sum(meets(r) for r in picked if r)
        total += sum(r is not None for r in picked)
        out.append(f"| {family} | {chosen} | " + " | ".join(before) + " | " + " | ".join(cell(r) for r in picked) + " |")
    # stricter: the teacher is held out too (another architecture or training recipe than any the choice saw)
    double = []
    for teacher, family in itertools.product(teachers, families):
        name = choose(rows, settings, family, teacher)
        double.append((name, index.get((teacher, family, name))))
    chosen_double = sorted({name for name, _ in double})
    out += ["", f"Held out: the bar is met on {met} of {total} (teacher, family) cells. With the teacher held out as "
            f"well (chosen on the other teachers' other families): met on {sum(meets(r) for _, r in double if r)} of "
            f"{sum(r is not None for _, r in double)}; chosen: " + ", ".join(
                f"{name} ({sum(n == name for n, _ in double)} folds)" for name in chosen_double), "",
            "### In sample: every setting on every family (not a reported default)", ""]
    for teacher in teachers:
        out += [f"Teacher `{teacher}` (ASR after / ΔCA points):", "",
                "| family | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
        for family in families:
            out.append(f"| {family} | " + " | ".join(cell(index.get((teacher, family, s))) for s in settings) + " |")
        counts = [sum(meets(index[(teacher, f, s)]) for f in families if (teacher, f, s) in index) for s in settings]
        out += ["| met | " + " | ".join(str(c) for c in counts) + " |", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", nargs="+", default=list(TEACHERS[:2]), choices=TEACHERS)
    parser.add_argument("--attacks", nargs="+", default=list(FAMILIES), choices=FAMILIES + UNSEEN)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", "--seed", nargs="+", type=int, default=[0],
                        help="zoo and BCU seeds; with several, each (teacher, seed) pair is one cell of the choice")
    parser.add_argument("--data", default="in", choices=("in", "ood", "folder", "folder_adapted"),
                        help="in: the clean half (in distribution); ood: photo crops adapted to the model (ood_images); "
                             "folder: a user's folder of neighbouring images (the clean half as colour digits, PNG); "
                             "folder_adapted: that folder in the model's most even view, a class-balanced half")
    parser.add_argument("--results", type=Path, default=Path("bcu_families_results.jsonl"))
    parser.add_argument("--report-only", action="store_true", help="only report the rows already in --results")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    rows = [r for r in read_rows(args.results) if r["seed"] in args.seeds and r.get("data", "in") == args.data]
    done = {(r["teacher"], r["attack"], r["setting"], r["seed"]) for r in rows}
    if not args.report_only:
        # setting-major order: a partial run already holds every family for the first settings
        for setting, seed, teacher, attack in itertools.product(args.settings, args.seeds, args.teachers, args.attacks):
            if (teacher, attack, setting, seed) in done:
                continue
            start = time.perf_counter()
            row = run_one(teacher, attack, setting, seed, args.data)
            print(f"[{time.perf_counter() - start:4.0f}s]", file=sys.stderr, end=" ")
            emit(row, args.results)
            rows.append(row)
    rows = [r for r in rows if r["teacher"] in args.teachers and r["attack"] in args.attacks
            and r["setting"] in args.settings and implanted(r)]
    teachers = args.teachers
    if len(args.seeds) > 1:  # another seed is another zoo model: its own cell
        rows = [{**r, "teacher": f"{r['teacher']} seed {r['seed']}"} for r in rows]
        teachers = [f"{t} seed {s}" for t in args.teachers for s in args.seeds]
    text = "\n".join([machine_line(), (f"Command: python benchmarks/bcu_families.py "
                      f"{' '.join(argv if argv is not None else sys.argv[1:])}"), "",
                      report(rows, args.settings, teachers, args.attacks)])
    return publish(text, args.markdown)


if __name__ == "__main__":
    raise SystemExit(main())
