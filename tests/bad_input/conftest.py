"""Shared harness of the bad-input suite (issue 13): run the CLI as a user would and check that a mistake ends in
one clear line. Exit codes: 2 for a wrong command line (usage), 1 for bad data, model or file.

The ``cli`` fixture: ``cli(*argv)`` runs ``trojanguard`` in this process (fast; ``SystemExit`` from argparse is caught) and
``cli(*argv, subprocess=True)`` runs the real entry point in a child process. Both return a :class:`CliResult`.
The ``expect_error`` fixture, ``expect_error(result, code, *words)``, asserts the exit code, that standard error ends in exactly one
``trojanguard …: error: …`` line containing every word (case-insensitive), and that no traceback was printed.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess as child
import sys
from dataclasses import dataclass

import helpers
import pytest

SRC = str(helpers.SRC)


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if "error:" in line]


def run_cli(*argv: str, subprocess: bool = False, env: dict | None = None, timeout: float = 300) -> CliResult:
    argv = tuple(str(a) for a in argv)
    if subprocess:
        environment = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
                       "TROJANGUARD_PROGRESS": "0", **(env or {})}
        done = child.run([sys.executable, "-m", "trojanguard", *argv], capture_output=True, text=True,
                         env=environment, timeout=timeout, check=False)
        return CliResult(done.returncode, done.stdout, done.stderr)
    from trojanguard.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 1
    return CliResult(int(code or 0), out.getvalue(), err.getvalue())


def check_error(result: CliResult, code: int, *words: str) -> str:
    """The one error line of a failed command; every word in ``words`` must appear in it (case-insensitive)."""
    assert "Traceback" not in result.err and "Traceback" not in result.out, result.err
    assert result.code == code, f"exit {result.code}, expected {code}\nstdout: {result.out}\nstderr: {result.err}"
    lines = result.error_lines()
    assert len(lines) == 1, f"expected exactly one error line, got {lines}\nstderr: {result.err}"
    line = lines[0]
    assert line.startswith("trojanguard"), line
    for word in words:
        assert word.lower() in line.lower(), f"{word!r} not in the error line: {line}"
    return line


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def expect_error():
    return check_error
