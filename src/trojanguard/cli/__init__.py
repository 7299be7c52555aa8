"""The trojanguard command: build_parser() from one module per command (info, demo, screen, export, cleanse),
and main(), whose one error handler turns every failure into one line on standard error."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from trojanguard.cli import cleanse, demo, export, info, screen
from trojanguard.cli._options import UsageError, check_output_path

__all__ = ["COMMANDS", "UsageError", "build_parser", "main"]

# each module: add_parser(sub), run(args) -> exit code, OUTPUTS (argument dest, "file" or "folder") checked
# before any work
COMMANDS = {"info": info, "demo": demo, "screen": screen, "export": export, "cleanse": cleanse}
DESCRIPTION = ("The trojanguard command: info (versions, devices, backends), demo (the main job), screen (score a "
               "dataset for poisoned samples, with a report), export (a guard as ONNX and as a Triton model "
               "repository) and cleanse (a cleanser such as BCU on a model file with unlabeled images).")
DEBUG_ENV = "TROJANGUARD_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trojanguard", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every failure ends in one line on standard error: ``trojanguard <command>: error: ...``
    (exit 2 for a command line that cannot work, 1 for bad data, model or file) or, for a bug,
    ``... internal error: ...`` (exit 1; TROJANGUARD_DEBUG=1 re-raises it with its traceback)."""
    from trojanguard.errors import TrojanGuardError

    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    args.argv = argv  # the exact command line, for reports
    command = f"trojanguard {args.command}"
    module = COMMANDS[args.command]
    try:
        for dest, kind in module.OUTPUTS:
            if getattr(args, dest, None) is not None:
                check_output_path(getattr(args, dest), "--" + dest.replace("_", "-"), kind)
        return module.run(args)
    except UsageError as exc:
        return _print_error(command, str(exc), 2)
    except (TrojanGuardError, ValueError) as exc:  # ValueError: argument checks of the library (names the argument)
        return _print_error(command, str(exc) or type(exc).__name__, 1)
    except OSError as exc:
        return _print_error(command, _os_error_text(exc, args), 1)
    except KeyboardInterrupt:
        print(f"{command}: interrupted (finished work is kept; run the same command again to resume where it "
              "can)", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        print(f"{command}: internal error: {type(exc).__name__}: {_one_line(str(exc))} (set {DEBUG_ENV}=1 for "
              "the traceback; please report it)", file=sys.stderr)
        return 1


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _print_error(command: str, message: str, code: int) -> int:
    print(f"{command}: error: {_one_line(message)}", file=sys.stderr)
    return code


def _os_error_text(exc: OSError, args: argparse.Namespace) -> str:
    """``<argument> <file>: <reason>`` of an OSError (never a bare ``[Errno N]``); the argument when one of the
    command's path arguments is the file or a folder above it."""
    if exc.filename is None:
        return exc.strerror or str(exc) or type(exc).__name__
    path = Path(os.fsdecode(exc.filename))
    argument = next((f"--{dest.replace('_', '-')} " for dest, value in sorted(vars(args).items())
                     if isinstance(value, str) and value and (path == Path(value) or Path(value) in path.parents)),
                    "")
    where = f"{argument}{str(path)!r}" + (f" -> {os.fsdecode(exc.filename2)!r}" if exc.filename2 else "")
    return f"{where}: {exc.strerror or exc}"
