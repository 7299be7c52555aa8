"""trojanguard cleanse: a cleanser from the registry (--method; trojanguard.cleanse.CLEANSERS) on a model file
with unlabeled images; writes the cleansed weights and a JSON report next to them."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from trojanguard.cli._options import (
    UsageError,
    add_arch_option,
    add_config_options,
    add_model_input_options,
    add_model_option,
    registry_help,
)

OUTPUTS = (("out", "file"),)
CLEANSE_OUT_SUFFIXES = (".safetensors", ".pt")
DEFAULT_METHOD = "bcu"


def add_parser(sub) -> None:
    from trojanguard.attacks import ATTACKS
    from trojanguard.attacks.ssl import SSL_ATTACKS
    from trojanguard.cleanse import CLEANSERS
    from trojanguard.cleanse.unlabeled import DEFAULT_OOD_IMAGES, VIEW_RULES

    p = sub.add_parser("cleanse", help="cleanse a suspicious model on unlabeled images (--method, default BCU)",
                       description="Cleanse a suspicious classifier on unlabeled images with --method (default bcu: "
                                   "re-initialise part of its weights by depth, distil it from itself), or a "
                                   "self-supervised encoder (--method mimic), or an image–text model on its "
                                   "(poisoned) image–caption pairs (--method ubt, cleanclip). Writes the cleansed weights "
                                   "(safetensors) and a JSON report next to them.")
    add_model_option(p, "model file (safetensors / weights-only .pt state dict, ...)")
    add_arch_option(p, required=True, help="architecture: small_cnn, resnet18_cifar or torchvision:<name>; an "
                    "image–text model (--method ubt / cleanclip): tiny_clip or open_clip:<name>, whose tokenizer "
                    "reads the captions")
    p.add_argument("--data", required=True,
                   help="unlabeled images: an image folder, an .npz, 'ood' (natural-photo crops adapted to the "
                        "model; 'ood:dead_leaves', 'ood:fractal' or 'ood:strokes': procedural images, generated; "
                        "'ood:photos+strokes': half each) or 'digits'; "
                        "image–caption pairs for ubt / cleanclip: an .npz with 'images' and 'captions', or a folder "
                        "with captions.csv (file, caption)")
    p.add_argument("--out", required=True, help="where to write the cleansed weights (.safetensors or .pt)")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(CLEANSERS),
                   help="cleansing method; " + registry_help(CLEANSERS, DEFAULT_METHOD))
    p.add_argument("--ood-images", type=int, default=DEFAULT_OOD_IMAGES,
                   help=f"images to draw with --data ood (default {DEFAULT_OOD_IMAGES})")
    p.add_argument("--ood-view", default="entropy", choices=VIEW_RULES,
                   help="how --data ood picks the view it renders the images in: entropy (default: the most even "
                        "spread of the model's classes) or gap (the closest to its batch-norm statistics)")
    add_config_options(p, [(entry.name, entry.config, entry.options) for entry in _methods(CLEANSERS)
                           if entry.config is not None])
    p.add_argument("--eval", help="labelled data to report CA per epoch: an image folder, an .npz or 'digits' (an "
                                  "encoder: a linear probe fitted on one half, measured on the other)")
    p.add_argument("--attack", choices=sorted(set(ATTACKS) | set(SSL_ATTACKS)),
                   help="with --eval: trigger to report ASR per epoch (an encoder: an SSL attack's), at the zoo's "
                   "settings (tact: Blended on source classes 1, 2, 3, whose ASR counts those classes only)")
    p.add_argument("--target", type=int, help="with --attack: the attack's target class (default 0)")
    add_model_input_options(p, " for the distillation")


def _methods(cleansers: dict) -> list:
    """The registered cleansers, the default first (its options lead --help), then by name."""
    return sorted(cleansers.values(), key=lambda entry: (entry.name != DEFAULT_METHOD, entry.name))


def _data_seed(args: argparse.Namespace, method) -> int:
    """The seed of the data the command draws (ood crops, the digits split): --seed when the method takes one and it
    was given, else the method config's default seed, else 0."""
    if hasattr(args, "seed"):
        return args.seed
    default = {f.name: f.default for f in fields(method.config)}.get("seed", 0) if method.config is not None else 0
    return default if isinstance(default, int) else 0


def run(args: argparse.Namespace) -> int:
    """Cleanse a model file with the --method cleanser on unlabeled images; save the model (safetensors) and the
    JSON report."""
    from trojanguard.cleanse import CLEANSERS
    from trojanguard.models import Encoder, ImageText, build_model, load_model, save_model

    out = Path(args.out)
    if out.suffix not in CLEANSE_OUT_SUFFIXES:
        raise UsageError(f"--out: expected a path ending in {' or '.join(CLEANSE_OUT_SUFFIXES)} (weights only, never "
                         f"a pickled module), got {str(out)!r}")
    if args.attack is not None and args.eval is None:
        raise UsageError(f"--attack: reports ASR on --eval data; expected --eval with it, got --attack {args.attack} "
                         "alone")
    if args.target is not None and args.attack is None:
        raise UsageError(f"--target: the target class of --attack; expected --attack with it, got --target "
                         f"{args.target} alone")
    method = CLEANSERS[args.method]
    args.data_seed = _data_seed(args, method)
    if getattr(method.build, "model_kind", None) is ImageText:
        return _run_image_text(args, method, out)
    model = load_model(args.model, args.arch, num_classes=args.num_classes, in_channels=args.in_channels,
                       allow_pickle=args.allow_pickle).to(args.device)
    encoder = getattr(method.build, "model_kind", None) is Encoder  # MIMIC cleanses encoders, BCU classifiers
    evaluation = None if args.eval is None else _evaluation(args, model, encoder=encoder)
    ood_info: dict = {}
    data = _unlabeled_data(args.data, args, model, ood_info)
    print(f"cleansing {args.model} ({args.arch}) with {method.display_name} on {len(data)} unlabeled images from "
          f"{args.data!r}", file=sys.stderr)
    settings = {name: getattr(args, name) for name in method.options if hasattr(args, name)}
    if "init" in {f.name for f in fields(method.config)}:  # fresh weights of the architecture (BCU's re-init)
        settings["init"] = lambda: build_model(args.arch, num_classes=args.num_classes, in_channels=args.in_channels)
    cleanser = method.build(**settings)
    cleansed = cleanser.cleanse(model, data, evaluation=evaluation)
    save_model(cleansed, out)
    report_path = out.with_name(out.stem + ".report.json")
    cleanser.report.details["model"] = str(args.model)
    cleanser.report.details["data"] = str(args.data)
    if ood_info:
        cleanser.report.details["ood"] = ood_info
    cleanser.report.to_json(report_path)
    print(cleanser.report.format())
    print(f"cleansed model: {out}\nreport:         {report_path}")
    return 0


def _run_image_text(args: argparse.Namespace, method, out: Path) -> int:
    """An image–text cleanser (UBT, CleanCLIP): --arch tiny_clip or open_clip:<name> (its tokenizer), --data a pairs
    file; --eval digits measures zero-shot CA (and ASR of --attack) with the digits' class prompts. UBT also writes
    every pair's suspicion score (<out>.pairs.csv)."""
    import torch

    from trojanguard.clip.loading import get_tokenizer, is_image_text_arch
    from trojanguard.data.pairs import load_pairs
    from trojanguard.models import load_model, save_model

    if not is_image_text_arch(args.arch):
        raise UsageError(f"--arch: {method.display_name} cleanses image–text models; expected tiny_clip or "
                         f"open_clip:<name>, got {args.arch!r}")
    if args.data in ("ood", "digits") or args.data.startswith("ood:"):
        raise UsageError(f"--data: {method.display_name} needs image–caption pairs (an .npz with images and captions, "
                         f"or a folder with captions.csv), got {args.data!r}")
    model = load_model(args.model, args.arch, in_channels=args.in_channels,
                       allow_pickle=args.allow_pickle).to(args.device)
    tokenizer = get_tokenizer(args.arch)
    loaded = load_pairs(args.data, size=args.image_size, channels=args.in_channels)
    if loaded.skipped:
        print(f"skipped {len(loaded.skipped)} unreadable image(s), e.g. {loaded.skipped[0][0]}", file=sys.stderr)
    tokens = torch.as_tensor(tokenizer(loaded.captions)).long()
    evaluation = None if args.eval is None else _zero_shot_evaluation(args, tokenizer, int(loaded.images.shape[-1]))
    print(f"cleansing {args.model} ({args.arch}) with {method.display_name} on {len(tokens)} image–caption pairs from "
          f"{args.data!r}", file=sys.stderr)
    settings = {name: getattr(args, name) for name in method.options if hasattr(args, name)}
    cleanser = method.build(**settings)
    cleansed = cleanser.cleanse(model, (loaded.images, tokens), evaluation=evaluation)
    save_model(cleansed, out)
    report_path = out.with_name(out.stem + ".report.json")
    cleanser.report.details["model"] = str(args.model)
    cleanser.report.details["data"] = str(args.data)
    written = [f"report:         {report_path}"]
    screening = getattr(cleanser, "screening", None)
    if screening is not None:
        pairs_path = screening.to_csv(out.with_name(out.stem + ".pairs.csv"))
        written.append(f"pair scores:    {pairs_path}")
    cleanser.report.to_json(report_path)
    print(cleanser.report.format())
    print(f"cleansed model: {out}\n" + "\n".join(written))
    return 0


def _zero_shot_evaluation(args: argparse.Namespace, tokenizer, size: int):
    """--eval digits for an image–text model: zero-shot CA on the digits' test split with the digits' class prompts
    (and ASR of --attack, with the image–text zoo's settings of that attack)."""
    import torch

    from trojanguard.attacks import ATTACKS, make_attack
    from trojanguard.cleanse import ZeroShotEvaluation
    from trojanguard.clip import class_prompt_tokens
    from trojanguard.data import load_digits
    from trojanguard.zoo import CLIP_ATTACK_SETTINGS

    if args.eval != "digits":
        raise UsageError(f"--eval: an image–text model is measured by zero-shot classification with class prompts; "
                         f"expected 'digits' (its prompts are built in), got {args.eval!r}")
    test = load_digits(size=size, channels=args.in_channels, seed=args.data_seed)[1]
    trigger, target = None, None
    if args.attack is not None:
        if args.attack not in ATTACKS:
            raise UsageError(f"--attack: expected a classifier attack (its trigger on the images), one of "
                             f"{sorted(ATTACKS)}, got {args.attack!r}")
        trigger = make_attack(args.attack, **CLIP_ATTACK_SETTINGS.get(args.attack, {}))
        target = 0 if args.target is None else args.target
        if not 0 <= target < 10:
            raise UsageError(f"--target: expected a digit class (0 … 9), got {target}")
    return ZeroShotEvaluation(test.x, test.y, torch.as_tensor(class_prompt_tokens(tokenizer)), trigger, target)


def _unlabeled_data(spec: str, args: argparse.Namespace, model, info: dict):
    """--data: ood[:source] (natural-photo crops, or procedural images, adapted to ``model``, see
    trojanguard.cleanse.unlabeled.ood_images; ``info`` receives the chosen view), digits (half of the embedded
    training split), a folder or an .npz."""
    from trojanguard.cleanse.unlabeled import ood_images
    from trojanguard.data import load_digits, load_image_folder, load_npz
    from trojanguard.data.core import DEFAULT_IMAGE_SIZE

    if spec == "ood" or spec.startswith("ood:"):
        from trojanguard.data import OOD_SOURCES
        from trojanguard.errors import DataError

        source = spec.partition(":")[2] or "photos"
        if source not in OOD_SOURCES:
            raise DataError(f"--data: expected ood or ood:<source> with a source of {', '.join(OOD_SOURCES)}, got "
                            f"{spec!r}")
        return ood_images(args.ood_images, size=args.image_size or DEFAULT_IMAGE_SIZE, channels=args.in_channels,
                          seed=args.data_seed, model=model, info=info, source=source, view_rule=args.ood_view)
    if spec == "digits":
        train, _ = load_digits(size=args.image_size or DEFAULT_IMAGE_SIZE, channels=args.in_channels, seed=args.data_seed)
        import torch

        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.data_seed))
        return train.x[order[: len(train) // 2]]
    path = Path(spec)
    if path.suffix.lower() == ".npz":
        return load_npz(path, size=args.image_size).x
    return load_image_folder(path, size=args.image_size, channels=args.in_channels).x


def _evaluation(args: argparse.Namespace, model, encoder: bool = False):
    """The labelled --eval data (with the --attack trigger) as an Evaluation, checked against ``model``'s
    classes: labels and --target outside them are refused before any cleansing. For an ``encoder``, a linear
    probe fitted on half of the data (seeded) and measured on the other half."""
    import torch

    from trojanguard.attacks import make_attack
    from trojanguard.cleanse import Evaluation
    from trojanguard.cleanse.base import model_device, preflight
    from trojanguard.data import load_digits, load_image_folder, load_npz
    from trojanguard.data.core import DEFAULT_IMAGE_SIZE
    from trojanguard.errors import DataError
    from trojanguard.zoo import ZOO_ATTACK_DEFAULTS

    where = f"--eval {args.eval!r}"
    if args.eval == "digits":
        labelled = load_digits(size=args.image_size or DEFAULT_IMAGE_SIZE, channels=args.in_channels, seed=args.data_seed)[1]
    elif Path(args.eval).suffix.lower() == ".npz":
        labelled = load_npz(args.eval, size=args.image_size)
    else:
        labelled = load_image_folder(args.eval, size=args.image_size, channels=args.in_channels)
    if labelled.y is None:
        raise DataError(f"{where}: evaluation data needs labels (class sub-folders or an npz 'y')")
    if encoder:
        return _probe_evaluation(args, labelled, where)
    was_training = model.training
    try:
        with torch.no_grad():
            classes = preflight(model.eval(), labelled.x[:2], model_device(model))
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
    finally:
        model.train(was_training)
    outside = sorted({int(label) for label in labelled.y.unique() if not 0 <= int(label) < classes})
    if outside:
        shown = ", ".join(map(str, outside[:5])) + (", ..." if len(outside) > 5 else "")
        raise DataError(f"{where}: expected labels of the model's {classes} classes (0 … {classes - 1}), got "
                        f"labels {shown}")
    trigger, target = None, None
    if args.attack is not None:
        target = 0 if args.target is None else args.target
        if not 0 <= target < classes:
            raise UsageError(f"--target: expected a class of the model (0 … {classes - 1}), got {target}")
        from trojanguard.attacks import ATTACKS

        if args.attack not in ATTACKS:
            raise UsageError(f"--attack: {args.attack!r} is an SSL attack (an encoder's); expected a classifier "
                             f"attack, one of {sorted(ATTACKS)}")
        trigger = make_attack(args.attack, **ZOO_ATTACK_DEFAULTS.get(args.attack, {}))
    return Evaluation(labelled.x, labelled.y, trigger, target)


def _probe_evaluation(args: argparse.Namespace, labelled, where: str):
    """An encoder's --eval: a linear probe on a seeded half of the labelled data, CA (and ASR of --attack, an SSL
    attack's test trigger) on the other half."""
    import torch

    from trojanguard.attacks.ssl import SSL_ATTACKS, make_ssl_attack
    from trojanguard.cleanse import LinearProbeEvaluation
    from trojanguard.errors import DataError

    order = torch.randperm(len(labelled.x), generator=torch.Generator().manual_seed(args.data_seed))
    fit, held = order[: len(order) // 2], order[len(order) // 2 :]
    trigger, target = None, None
    if args.attack is not None:
        if args.attack not in SSL_ATTACKS:
            raise UsageError(f"--attack: an encoder's ASR is measured with an SSL attack's trigger; expected one of "
                             f"{sorted(SSL_ATTACKS)}, got {args.attack!r}")
        trigger, target = make_ssl_attack(args.attack).apply_test, 0 if args.target is None else args.target
    try:
        return LinearProbeEvaluation(labelled.x[fit], labelled.y[fit], labelled.x[held], labelled.y[held], trigger,
                                     target)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
