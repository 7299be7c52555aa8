"""The resumable row files of the zoo benchmarks: one JSON object per line, appended as each row finishes, so that
a rerun reads what is done and skips it."""

from __future__ import annotations

import json
from pathlib import Path


def read_rows(path: Path | None) -> list[dict]:
    """The rows already in ``path`` (none when it is None or does not exist yet)."""
    if path is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def emit(row: dict, path: Path | None) -> None:
    """Print ``row`` as one JSON line and append it to ``path`` (when given)."""
    line = json.dumps(row)
    print(line, flush=True)
    if path is not None:
        with path.open("a") as f:
            f.write(line + "\n")
