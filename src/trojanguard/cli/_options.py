"""What the commands share: the model, data-shape and device options, their argument types, options derived from
a config dataclass, model loading, a help line built from a registry, and the check of output paths made before
any work."""

from __future__ import annotations

import argparse
import errno
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, Field, fields
from pathlib import Path


class UsageError(Exception):
    """A command line that cannot work, found before any work starts: one error line, exit code 2."""


MODEL_FILE_HELP = "model file (safetensors / weights-only .pt state dict, TorchScript, .pt2)"
ARCH_HELP = "architecture of a state-dict file: small_cnn, resnet18_cifar, torchvision:<name>"
DEVICE_HELP = ("torch device: auto (default: cuda when torch.cuda.is_available(), else cpu), cpu, cuda or "
               "cuda:<index>")
IMAGE_SIZE_HELP = ("side every image is resized to, for every kind of data; default: the data's own size for .npz "
                   "arrays and zoo data, 32 for image folders, digits and ood")
ALLOW_PICKLE_HELP = "allow loading a pickled model (runs its code!)"


def device_arg(text: str) -> str:
    """--device: auto resolved to cuda when a GPU is usable, else cpu; other names checked now (a usage error
    before any work, not a CUDA traceback later)."""
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError("CUDA is not available here (no GPU / torch built without CUDA); use "
                                             "--device cpu (or auto)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"expected one of this machine's {count} CUDA device(s) (cuda:0 … "
                                             f"cuda:{count - 1}), got {text!r}")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return str(device)


def image_size_arg(text: str) -> int:
    """--image-size: a positive integer."""
    try:
        size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {size}")
    return size


# ---------------------------------------------------------------------------------------------------------
# option adders: each command calls them where the option belongs in its --help


def add_model_option(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--model", required=True, help=help)


def add_arch_option(parser: argparse.ArgumentParser, *, required: bool = False, help: str = ARCH_HELP) -> None:
    parser.add_argument("--arch", required=required, help=help)


def add_shape_options(parser: argparse.ArgumentParser) -> None:
    """--num-classes and --in-channels: what a state-dict file does not say about its model."""
    parser.add_argument("--num-classes", type=int, default=10, help="classes of a state-dict model (default 10)")
    parser.add_argument("--in-channels", type=int, default=3, help="image channels, 1 or 3 (default 3)")


def add_image_size_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-size", type=image_size_arg, help=IMAGE_SIZE_HELP)


def add_device_option(parser: argparse.ArgumentParser, purpose: str = "") -> None:
    """--device; ``purpose`` ends the help line (" for fitting")."""
    parser.add_argument("--device", default="auto", type=device_arg, help=DEVICE_HELP + purpose)


def add_allow_pickle_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)


def add_model_input_options(parser: argparse.ArgumentParser, device_purpose: str = "") -> None:
    """What every command that runs a model file on images takes after its own options: the state-dict shape
    (--num-classes, --in-channels), --image-size, --device and --allow-pickle."""
    add_shape_options(parser)
    add_image_size_option(parser)
    add_device_option(parser, device_purpose)
    add_allow_pickle_option(parser)


def registry_help(registry: Mapping[str, object], default: str) -> str:
    """One help line for a choice taken from a registry: every name with its entry's ``summary``."""
    return "; ".join(f"{name}{' (default)' if name == default else ''}: {entry.summary}"
                     for name, entry in sorted(registry.items()))


def add_config_options(parser: argparse.ArgumentParser, sources: Sequence[tuple[str, type, Sequence[str]]]) -> None:
    """One ``--<field>`` option (dashes for underscores) per config field named by ``sources``: ``(method, config
    dataclass, field names)`` each. A field several methods share is one option. An option the user does not give
    is absent from the parsed arguments (``argparse.SUPPRESS``), so each method keeps its own config's default;
    the help states that default (per method where they differ) and which methods take the option when not all
    do. Help, choices and a type come from the first method's field: its ``help``, ``choices`` and ``parse``
    metadata (text → value; a ValueError becomes the option's error), else the default's type (int, float)."""
    by_option: dict[str, list[tuple[str, Field]]] = {}
    for method, config_type, names in sources:
        by_name = {f.name: f for f in fields(config_type)}
        for name in names:
            field = by_name[name]
            if field.default is MISSING:
                raise ValueError(f"{config_type.__name__}.{name}: a command-line option needs a field with a default")
            by_option.setdefault(name, []).append((method, field))
    methods = [method for method, _, _ in sources]
    for name, owners in by_option.items():
        field = owners[0][1]
        defaults = {method: f.default for method, f in owners}
        help = field.metadata.get("help", "")
        shared = len(set(map(repr, defaults.values()))) == 1
        default_text = (f"default {field.default}" if shared else
                        "default " + "; ".join(f"{method} {value}" for method, value in defaults.items()))
        if len(owners) < len(methods):
            default_text = f"{', '.join(defaults)} only; {default_text}"
        elif shared and "default" in help:
            default_text = ""  # the help says it already
        help = f"{help} ({default_text})" if help and default_text else help or default_text
        options: dict[str, object] = {"default": argparse.SUPPRESS, "help": help}
        if "choices" in field.metadata:
            options["choices"] = tuple(field.metadata["choices"])
        if "parse" in field.metadata:
            options["type"] = _option_type(field.metadata["parse"])
        elif type(field.default) in (int, float):
            options["type"] = type(field.default)
        parser.add_argument("--" + name.replace("_", "-"), **options)


def _option_type(parse: Callable[[str], object]) -> Callable[[str], object]:
    """``parse`` as an argparse type: its ValueError message becomes the option's error line."""
    def convert(text: str) -> object:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__
    return convert


# ---------------------------------------------------------------------------------------------------------
# model loading and output paths


def load_command_model(spec: str, args: argparse.Namespace):
    """A model file (safe loading; --arch for state dicts), zoo:<attack> (the zoo's backdoored model) or
    ssl-zoo:<attack> (the SSL zoo's poisoned encoder), on --device in eval mode."""
    from trojanguard.models import load_model
    from trojanguard.screening.sources import SSL_ZOO_PREFIX, ZOO_PREFIX, ssl_zoo_entry, zoo_entry

    if spec.startswith(ZOO_PREFIX):
        model = zoo_entry(spec[len(ZOO_PREFIX):]).model
    elif spec.startswith(SSL_ZOO_PREFIX):
        model = ssl_zoo_entry(spec[len(SSL_ZOO_PREFIX):]).encoder
    else:
        model = load_model(spec, args.arch, num_classes=args.num_classes, in_channels=args.in_channels,
                           allow_pickle=args.allow_pickle)
    return model.to(args.device).eval()


def check_output_path(text: str, argument: str, kind: str) -> None:
    """An output path the command can write (checked before any work): a ``kind`` ("file" or "folder") that is
    not the other kind, inside a folder this process may write to."""
    path = Path(text)
    if path.exists():
        if kind == "folder" and not path.is_dir():
            raise UsageError(f"{argument}: expected a folder (existing or new), got the file {text!r}")
        if kind == "file" and path.is_dir():
            raise UsageError(f"{argument}: expected a file to write, got the folder {text!r}")
        folder = path if kind == "folder" else path.absolute().parent
    else:
        folder = next(p for p in path.absolute().parents if p.exists())
        if not folder.is_dir():
            raise UsageError(f"{argument}: expected a path that can be created, got {text!r} ({str(folder)!r} is a "
                             "file)")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.is_file() and not os.access(path, os.W_OK)):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), text)
