"""trojanguard demo: every defence on backdoored models of the embedded digits data, ending with the serving
guard run in ONNX Runtime."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

OUTPUTS = (("out", "folder"),)
DEMO_ATTACKS = ("badnets", "blended", "sig", "wanet", "trojan")
DEMO_GUARD_FPR = 0.05
DEMO_CD_CLEAN = 100  # clean training images screened next to every poisoned one (keeps the demo short)


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run every defence on backdoored models of the embedded digits data")
    p.add_argument("--attacks", nargs="+", choices=DEMO_ATTACKS, help="attacks to run (default: all)")
    p.add_argument("--arch", default="small_cnn", help="model architecture (default: small_cnn)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="trojanguard-out", help="where the demo writes the guard's ONNX graph")
    p.add_argument("--no-bcu", action="store_true", help="skip the BCU cleansing rows")


def run(args: argparse.Namespace) -> int:
    """Build (or load from cache) a backdoored digits model per attack, report CA / ASR, then cleanse each
    with BCU on in-distribution unlabeled data (the clean half of its training set) and report CA / ASR after;
    end by exporting the first model's guard to ONNX and running it in ONNX Runtime."""
    from trojanguard.zoo import ZooConfig, get_backdoored_model

    attacks = args.attacks or list(DEMO_ATTACKS)
    rows = []
    start = time.perf_counter()
    entries = []
    for name in attacks:
        entry = get_backdoored_model(ZooConfig(attack=name, arch=args.arch, seed=args.seed))
        entries.append(entry)
        rows.append((name, "none", entry.clean_accuracy, entry.attack_success_rate, "-"))
        print(f"[{time.perf_counter() - start:6.1f}s] {name}: model ready (trained in {entry.train_seconds:.1f}s)",
              file=sys.stderr)
        auroc, throughput = _demo_cd(entry)
        rows.append((name, "cd", entry.clean_accuracy, entry.attack_success_rate, f"{auroc:.3f}"))
        print(f"[{time.perf_counter() - start:6.1f}s] {name}: CD screened the training set sample at "
              f"{throughput:.1f} images/s", file=sys.stderr)
        if not args.no_bcu:
            ca, asr, seconds = _demo_bcu(entry, args)
            rows.append((name, "bcu", ca, asr, "-"))
            print(f"[{time.perf_counter() - start:6.1f}s] {name}: BCU done in {seconds:.1f}s", file=sys.stderr)
    print(f"\ntrojanguard demo — digits, {args.arch}, target class 0, zoo poison rates (see trojanguard.zoo)")
    print(f"cd: Cognitive Distillation (CD-P defaults) scoring every poisoned training image and {DEMO_CD_CLEAN} "
          "clean ones; AUROC against the true poison indices (the model itself is unchanged)")
    if not args.no_bcu:
        print("bcu: BCU with its defaults (re-initialisation + distillation) on the clean half of the "
              "training set, labels withheld")
    print(f"{'attack':10s} {'defence':12s} {'CA':>6s} {'ASR':>6s} {'AUROC':>6s}")
    for name, defence, ca, asr, auroc in rows:
        print(f"{name:10s} {defence:12s} {ca:6.3f} {asr:6.3f} {auroc:>6s}")
    _demo_guard(entries[0], Path(args.out))
    print(f"\nfinished in {time.perf_counter() - start:.1f}s")
    return 0


def _demo_guard(entry, out_dir: Path) -> None:
    """The serving guard for ``entry``'s model: robust feature-space detector fitted on its (poisoned) training
    set, threshold for DEMO_GUARD_FPR on half the clean test set, one ONNX graph run by ONNX Runtime on the
    other half, clean and triggered."""
    import numpy as np

    from trojanguard.detect import FeatureMahalanobis
    from trojanguard.guard import Guard, GuardSession, export_onnx

    half = len(entry.test.x) // 2
    calibration, clean = entry.test.x[:half], entry.test.x[half:]
    triggered = entry.triggered_test()[half:][entry.test.y[half:] != entry.config.target]
    detector = FeatureMahalanobis(entry.model, show_progress=False).fit(entry.train.dataset.x)
    guard = Guard(entry.model, detector).eval()
    guard.calibrate(calibration, fpr=DEMO_GUARD_FPR)
    path = export_onnx(guard, out_dir / f"guard-{entry.config.attack}.onnx", clean[:2])
    session = GuardSession(path, providers="auto")
    on_clean, on_triggered = session.run(clean.numpy()), session.run(triggered.numpy())
    reference = guard.run(clean)
    gap = float(np.abs(on_clean.logits - reference.logits.numpy()).max())
    print(f"\nguard ({entry.config.attack} model): {path} in ONNX Runtime ({', '.join(session.providers)}); "
          f"threshold for {DEMO_GUARD_FPR:.0%} FPR on clean test images")
    print(f"flagged: clean {on_clean.flagged.mean():.3f}, triggered {on_triggered.flagged.mean():.3f}; "
          f"max |logit| gap vs PyTorch {gap:.1e}")


def _demo_cd(entry) -> tuple[float, float]:
    """Cognitive Distillation (defaults) on every poisoned training image plus DEMO_CD_CLEAN clean ones:
    AUROC against the true poison indices and images per second."""
    import torch

    from trojanguard.detect import CognitiveDistillation
    from trojanguard.metrics import auroc

    poisoned = entry.train.is_poisoned
    clean = torch.nonzero(~poisoned).flatten()
    clean = clean[torch.randperm(len(clean), generator=torch.Generator().manual_seed(0))[:DEMO_CD_CLEAN]]
    index = torch.cat([torch.nonzero(poisoned).flatten(), clean])
    start = time.perf_counter()
    scores = CognitiveDistillation(entry.model).score(entry.train.dataset.x[index])
    return auroc(poisoned[index], scores), len(index) / (time.perf_counter() - start)


def _demo_bcu(entry, args: argparse.Namespace) -> tuple[float, float, float]:
    """BCU with its defaults on the clean half of ``entry``'s training set: CA, ASR and seconds."""
    from trojanguard.cleanse import BCU
    from trojanguard.cleanse.unlabeled import clean_half
    from trojanguard.metrics import attack_success_rate, clean_accuracy
    from trojanguard.models import build_model

    shape = entry.test.x.shape
    bcu = BCU(seed=args.seed, show_progress=True,
              init=lambda: build_model(args.arch, num_classes=entry.test.num_classes, in_channels=shape[1]))
    cleansed = bcu.cleanse(entry.model, clean_half(entry, seed=args.seed))
    ca = clean_accuracy(cleansed, entry.test.x, entry.test.y)
    asr = attack_success_rate(cleansed, entry.triggered_test(), entry.test.y, entry.config.target, entry.attack)
    return ca, asr, bcu.report.seconds
