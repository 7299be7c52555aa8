"""One place for progress bars (tqdm), silenced when not on a terminal or when asked."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable


def progress(iterable: Iterable, desc: str = "", enable: bool = True, total: int | None = None):
    """Wrap ``iterable`` in a tqdm bar when ``enable`` and stderr is a terminal (or TROJANGUARD_PROGRESS=1)."""
    forced = os.environ.get("TROJANGUARD_PROGRESS")
    show = enable and (forced == "1" or (forced != "0" and sys.stderr.isatty()))
    if not show:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)
