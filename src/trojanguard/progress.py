"""One place for progress reporting: a tqdm bar on a terminal, plain periodic lines elsewhere (CI logs, files).

``TROJANGUARD_PROGRESS``: unset — bars on a terminal, plain lines when stderr is not a terminal; ``1`` — bars
always; ``0`` — silent. Plain lines keep a log readable: none for a task that ends within PLAIN_MIN_SECONDS,
then one each time another PLAIN_STEP of the work is done (at most one per PLAIN_MIN_SECONDS, at least one
per PLAIN_MAX_SECONDS while it runs), and a last line when it ends.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Self

PROGRESS_ENV = "TROJANGUARD_PROGRESS"
PLAIN_STEP = 0.10  # a plain line per 10 % of the work ...
PLAIN_MIN_SECONDS = 30.0  # ... but not more often than this
PLAIN_MAX_SECONDS = 300.0  # and not less often than this while the work goes on (slow or of unknown size)


def _mode(enable: bool) -> str:
    """``"bar"``, ``"plain"`` or ``"off"``."""
    forced = os.environ.get(PROGRESS_ENV)
    if not enable or forced == "0":
        return "off"
    if forced == "1" or sys.stderr.isatty():
        return "bar"
    return "plain"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class PlainProgress:
    """Progress as plain lines on stderr, for logs (see the module docstring); the calls of a tqdm bar."""

    def __init__(self, total: int | None, desc: str = "", unit: str = "it", initial: int = 0):
        self.total, self.desc, self.unit = total, desc or "progress", unit
        self.count = self.initial = initial
        self.postfix = ""
        self.started = self.last_time = time.monotonic()
        self.last_count = initial
        self.lines = 0
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.count += n
        now = time.monotonic()
        since = now - self.last_time
        step_done = self.total is not None and self.total > 0 and (self.count - self.last_count) >= PLAIN_STEP * self.total
        if since >= PLAIN_MAX_SECONDS or (since >= PLAIN_MIN_SECONDS and step_done):
            self._line(now)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        """A last line (``done``), only when earlier lines were printed: short tasks stay silent."""
        if not self.closed and self.lines:
            self._line(time.monotonic(), done=True)
        self.closed = True

    def _line(self, now: float, done: bool = False) -> None:
        elapsed = now - self.started
        rate = (self.count - self.initial) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.count}/{self.total} {self.unit}" if self.total else f"{self.count} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.count / self.total:.0f} %)"
        parts.append(f"{rate:.3g} {self.unit}/s")
        parts.append(f"{_duration(elapsed)} elapsed")
        if not done and self.total and rate > 0 and self.count < self.total:
            parts.append(f"about {_duration((self.total - self.count) / rate)} left")
        if self.postfix:
            parts.append(self.postfix)
        print(f"{self.desc}: {'done, ' if done else ''}{', '.join(parts)}", file=sys.stderr, flush=True)
        self.last_time, self.last_count = now, self.count
        self.lines += 1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _plain_iter(iterable: Iterable, bar: PlainProgress) -> Iterator:
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()


def progress(iterable: Iterable, desc: str = "", enable: bool = True, total: int | None = None):
    """``iterable`` with progress reporting when ``enable`` (a tqdm bar on a terminal, plain lines otherwise)."""
    mode = _mode(enable)
    if mode == "off":
        return iterable
    if mode == "plain":
        if total is None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        return _plain_iter(iterable, PlainProgress(total, desc))
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


class _NoBar:
    """What :func:`progress_bar` returns when progress is off: accepts the same calls, does nothing."""

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
    mode = _mode(enable)
    if mode == "off":
        return _NoBar()
    if mode == "plain":
        return PlainProgress(total, desc, unit, initial)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, unit_scale=False, leave=True, smoothing=0.1)
