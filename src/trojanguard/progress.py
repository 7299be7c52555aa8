"""One place for progress bars (tqdm), silenced when not on a terminal or when asked."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Self


def _shown(enable: bool) -> bool:
    forced = os.environ.get("TROJANGUARD_PROGRESS")
    return enable and (forced == "1" or (forced != "0" and sys.stderr.isatty()))


def progress(iterable: Iterable, desc: str = "", enable: bool = True, total: int | None = None):
    """Wrap ``iterable`` in a tqdm bar when ``enable`` and stderr is a terminal (or TROJANGUARD_PROGRESS=1)."""
    if not _shown(enable):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


class _NoBar:
    """What :func:`progress_bar` returns when bars are off: accepts the same calls, does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress_bar(total: int | None, desc: str = "", unit: str = "it", initial: int = 0, enable: bool = True):
    """A manually advanced bar (``bar.update(n)``) that shows the rate in ``unit``/s, e.g. images per second
    when a batch of n images is counted as n; same visibility rules as :func:`progress`."""
    if not _shown(enable):
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, unit_scale=False, leave=True, smoothing=0.1)
