"""Which of BCU's view transformations evoke the backdoor? (issue 16)

    OMP_NUM_THREADS=1 python benchmarks/bcu_views.py                    # every zoo family, clean half + test
    OMP_NUM_THREADS=1 python benchmarks/bcu_views.py --attacks badnets filter --draws 2

BCU distils the teacher's answers on *augmented* unlabeled images (``cleanse/augment.py``: zero-padded random
crop, optionally a horizontal flip; the same view goes to teacher and student). A view that looks like a trigger
to the backdoored teacher makes it answer with the target class, and the student then learns the backdoor from
clean data. For every zoo family this applies each transformation, one at a time and exactly as BCU applies it,
to BCU's in-distribution unlabeled data (``clean_half(untouched=False)``: the benchmark's data before issue 16,
with the adaptive families' cover samples) and to the clean test set, and
measures on the views:

* ``target``  — share of views the teacher assigns to the backdoor target (identity row: the clean share);
* ``evoked``  — share of views sent to the target whose source image was *not* sent there (backdoor evoked);
* ``changed`` — share of views whose teacher prediction differs from that on the source image;
* ``acc``     — the teacher's accuracy on the views (labels used for the measurement only);
* ``top``     — the largest single-class share (what BCU's dominant-class warning looks at) and its class.

and, for the label-free rule "drop a view whose teacher prediction differs from that on its source"
(``kept target`` / ``kept evoked``: the same shares over the views the rule keeps, and ``dropped``).

Transformations: ``identity``; ``crop`` (BCU's default: per-image zero-padded random crop, pad = 1/8 of the side);
``crop_flip``; ``flip`` alone; ``shift_max`` (a crop at the largest offset, ±pad in both axes: the crop's worst
case); ``shift_1`` (a crop offset of one pixel); and ``pad_border`` (the image shrunk by the zero border the crop
adds, without moving content). Random views use ``--draws`` independent draws per image. Results as JSON to
``--results`` and markdown to stdout / ``--markdown``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from trojanguard.attacks import ATTACKS
from trojanguard.cleanse.augment import CROP_PAD_FRACTION, random_crop_flip
from trojanguard.cleanse.unlabeled import clean_half
from trojanguard.metrics import attack_success_rate, clean_accuracy
from trojanguard.models import SmallCNN
from trojanguard.train import train_classifier
from trojanguard.zoo import ZooConfig, cache_dir, get_backdoored_model

sys.path.insert(0, str(Path(__file__).parent))
from bcu_table import publish  # the benchmarks' shared print-and-write tail

TEACHERS = ("zoo", "noshift", "flat_noshift")


class FlatCNN(torch.nn.Module):
    """A position-sensitive small CNN: four conv blocks (the last without pooling) and a linear head on the
    flattened 4×4 map (no global pooling) — a second architecture for the view measurements."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int, pool: bool = True) -> torch.nn.Sequential:
            layers = [torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.BatchNorm2d(cout), torch.nn.ReLU()]
            return torch.nn.Sequential(*layers, *([torch.nn.MaxPool2d(2)] if pool else []))

        self.features = torch.nn.Sequential(block(in_channels, width), block(width, 2 * width),
                                            block(2 * width, 2 * width), block(2 * width, 2 * width, pool=False))
        self.head = torch.nn.Linear(2 * width * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def teacher_model(entry, teacher: str) -> tuple[torch.nn.Module, float, float]:
    """The zoo model, or a model trained on the same poisoned set without the zoo's random-shift augmentation
    (``noshift``: the zoo's small CNN; ``flat_noshift``: :class:`FlatCNN`). Cached next to the zoo models."""
    if teacher == "zoo":
        return entry.model.eval(), entry.clean_accuracy, entry.attack_success_rate
    path = cache_dir() / f"bcu_views_{teacher}_{entry.config.key()}.pt"
    torch.manual_seed(entry.config.seed)
    model = SmallCNN() if teacher == "noshift" else FlatCNN()
    if path.is_file():
        model.load_state_dict(torch.load(path))
    else:
        train_classifier(model, entry.train.dataset, epochs=entry.config.epochs, seed=entry.config.seed,
                         augment_shift=0, show_progress=False)
        torch.save(model.state_dict(), path)
    model.eval()
    return (model, clean_accuracy(model, entry.test.x, entry.test.y),
            attack_success_rate(model, entry.triggered_test(), entry.test.y, entry.config.target, entry.attack))


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Content moved by (dy, dx) pixels, the uncovered rows / columns zero: a BCU crop at a fixed offset."""
    h, w = x.shape[-2:]
    p = max(abs(dy), abs(dx), 1)
    padded = F.pad(x, (p, p, p, p))
    return padded[..., p - dy : p - dy + h, p - dx : p - dx + w]


def pad_of(x: torch.Tensor) -> int:
    return max(1, round(CROP_PAD_FRACTION * min(x.shape[-2:])))


def views(name: str, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The views of ``x (N, C, H, W)`` under transformation ``name`` (one draw for the random ones)."""
    pad = pad_of(x)
    if name == "identity":
        return x
    if name == "crop":
        return random_crop_flip(x, gen, flip=False)
    if name == "crop_flip":
        return random_crop_flip(x, gen, flip=True)
    if name == "flip":
        return x.flip(-1)
    if name == "shift_max":  # one of the four corner offsets, drawn per image
        signs = torch.randint(0, 2, (len(x), 2), generator=gen) * 2 - 1
        return torch.stack([shift(img[None], int(sy) * pad, int(sx) * pad)[0] for img, (sy, sx) in zip(x, signs)])
    if name == "shift_1":
        d = torch.randint(0, 4, (len(x),), generator=gen)
        moves = [(1, 0), (-1, 0), (0, 1), (0, -1)]
        return torch.stack([shift(img[None], *moves[int(k)])[0] for img, k in zip(x, d)])
    if name == "pad_border":  # content resized into the frame minus a pad-wide zero border on every side
        h, w = x.shape[-2:]
        inner = F.interpolate(x, size=(h - 2 * pad, w - 2 * pad), mode="bilinear", align_corners=False)
        return F.pad(inner, (pad, pad, pad, pad))
    raise ValueError(name)


TRANSFORMS = ("identity", "crop", "crop_flip", "flip", "shift_max", "shift_1", "pad_border")


@torch.no_grad()
def predict(model, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])


def measure(model, x: torch.Tensor, y: torch.Tensor | None, target: int, transform: str, draws: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    source = predict(model, x)
    rows = {"target": [], "evoked": [], "changed": [], "acc": [], "kept_target": [], "kept_evoked": [], "dropped": []}
    counts = torch.zeros(10, dtype=torch.long)
    n_draws = 1 if transform in ("identity", "flip", "pad_border") else draws
    for _ in range(n_draws):
        pred = predict(model, views(transform, x, gen))
        counts += torch.bincount(pred, minlength=10)[:10]
        hit = pred == target
        evoked = hit & (source != target)
        changed = pred != source
        kept = ~changed
        rows["target"].append(hit.double().mean())
        rows["evoked"].append(evoked.double().mean())
        rows["changed"].append(changed.double().mean())
        if y is not None:
            rows["acc"].append((pred == y).double().mean())
        rows["dropped"].append(changed.double().mean())
        rows["kept_target"].append((hit & kept).double().sum() / kept.sum().clamp_min(1))
        rows["kept_evoked"].append((evoked & kept).double().sum() / kept.sum().clamp_min(1))
    out = {k: float(torch.stack(v).mean()) for k, v in rows.items() if v}
    shares = counts.double() / counts.sum()
    out["top_share"], out["top_class"] = float(shares.max()), int(shares.argmax())
    return out


def run_family(attack: str, draws: int, seed: int, teacher: str = "zoo") -> dict:
    entry = get_backdoored_model(ZooConfig(attack=attack, seed=seed), show_progress=False)
    model, ca, asr = teacher_model(entry, teacher)
    target = entry.config.target
    half_idx_data = clean_half(entry, seed=seed, untouched=False)  # as measured: with the cover samples
    result = {"attack": attack, "teacher": teacher, "ca": ca, "asr": asr, "target": target, "sets": {}}
    for set_name, x, y in (("clean_half", half_idx_data, None), ("test", entry.test.x, entry.test.y)):
        result["sets"][set_name] = {t: measure(model, x, y, target, t, draws, seed) for t in TRANSFORMS}
    # the clean half's labels: the training labels of the kept (unpoisoned) images
    clean = (~entry.train.is_poisoned).nonzero().flatten()
    order = clean[torch.randperm(len(clean), generator=torch.Generator().manual_seed(seed))]
    keep = order[: max(1, int(len(clean) * 0.5))].sort().values
    y_half = entry.train.dataset.y[keep]
    for t in TRANSFORMS:
        gen = torch.Generator().manual_seed(seed)
        accs = []
        for _ in range(1 if t in ("identity", "flip", "pad_border") else draws):
            accs.append(float((predict(model, views(t, half_idx_data, gen)) == y_half).double().mean()))
        result["sets"]["clean_half"][t]["acc"] = sum(accs) / len(accs)
    return result


def _name(r: dict) -> str:
    return r["attack"] if r.get("teacher", "zoo") == "zoo" else f"{r['attack']} ({r['teacher']})"


def markdown(results: list[dict]) -> str:
    lines = []
    for set_name in ("clean_half", "test"):
        lines += [f"\n### {set_name}: teacher target share / evoked / prediction change / accuracy on the views\n",
                  "| family | CA / ASR | " + " | ".join(TRANSFORMS) + " |",
                  "|---|---|" + "---|" * len(TRANSFORMS)]
        for r in results:
            s = r["sets"][set_name]
            cells = [f"{s[t]['target']:.2f} / {s[t]['evoked']:.2f} / {s[t]['changed']:.2f} / {s[t]['acc']:.2f}"
                     for t in TRANSFORMS]
            lines.append(f"| {_name(r)} | {r['ca']:.3f} / {r['asr']:.3f} | " + " | ".join(cells) + " |")
    lines += [("\n### clean_half, label-free rule 'drop a view whose prediction differs from its source's': "
               "target share of the kept views (evoked) and share dropped\n"),
              "| family | " + " | ".join(t for t in TRANSFORMS if t != "identity") + " |",
              "|---|" + "---|" * (len(TRANSFORMS) - 1)]
    for r in results:
        s = r["sets"]["clean_half"]
        cells = [f"{s[t]['kept_target']:.2f} ({s[t]['kept_evoked']:.3f}), drop {s[t]['dropped']:.2f}"
                 for t in TRANSFORMS if t != "identity"]
        lines.append(f"| {_name(r)} | " + " | ".join(cells) + " |")
    lines += ["\n### clean_half: largest single-class share of the views (class) — BCU's dominant-class warning\n",
              "| family | " + " | ".join(TRANSFORMS) + " |", "|---|" + "---|" * len(TRANSFORMS)]
    for r in results:
        s = r["sets"]["clean_half"]
        lines.append(f"| {_name(r)} | " + " | ".join(f"{s[t]['top_share']:.2f} ({s[t]['top_class']})"
                                                           for t in TRANSFORMS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", nargs="+", default=sorted(ATTACKS), choices=sorted(ATTACKS))
    parser.add_argument("--draws", type=int, default=3, help="independent draws per image of the random views")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher", default="zoo", choices=TEACHERS,
                        help="zoo: the zoo's model; noshift / flat_noshift: the small CNN / a flatten-head CNN "
                             "trained on the same poisoned set without random-shift augmentation")
    parser.add_argument("--results", type=Path, default=Path("bcu_views.json"))
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    done = json.loads(args.results.read_text()) if args.results.is_file() else {}
    keys = [a if args.teacher == "zoo" else f"{a}/{args.teacher}" for a in args.attacks]
    for attack, key in zip(args.attacks, keys):
        if key not in done:
            done[key] = run_family(attack, args.draws, args.seed, args.teacher)
            args.results.write_text(json.dumps(done, indent=1))
            print(f"{key}: done", file=sys.stderr, flush=True)
    return publish(markdown([done[k] for k in keys]), args.markdown)


if __name__ == "__main__":
    raise SystemExit(main())
