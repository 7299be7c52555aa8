"""The durable results file of a screening run: one CSV row per sample, appended and fsync'ed per batch.

Layout of ``results.csv``::

    # trojanguard-screen {"format": 1, "run": {...what must match to resume...}, "threshold": ..., ...}
    index,id,label,predicted,score,flagged,error
    0,cat/001.png,cat,3,0.0123456789,0,
    ...

The first line is a comment holding JSON: ``run`` records the model's hash, the detector and its options, the
data's fingerprint and the threshold rule — a resumed run must match it exactly, or it refuses (it never mixes
results of different runs). Rows are written in index order; a batch's rows are flushed and fsync'ed before the
next batch starts, so a killed run loses at most the batch in flight. Reading back drops a torn last line
(a kill during a write). ``score`` is written with ``repr`` (exact round trip of the float); ``flagged`` is
empty while the threshold is not known yet (adaptive rule), and filled in when the run is finalised, which
rewrites the file atomically (temporary file, fsync, rename).

Text cells (``id``, ``label``, ``error``) that start with ``= + - @``, a tab or a carriage return would run as a
formula when the file is opened in a spreadsheet; such a cell, and one that starts with ``'``, is written with
one ``'`` in front (the header says ``"cells": "formula-safe"``), and :meth:`ResultsFile.read` removes it again.
Files written before (no ``cells`` key) are read as they are and upgraded when a run resumes them.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trojanguard.errors import TrojanGuardError

MAGIC = "# trojanguard-screen "
FORMAT = 1
COLUMNS = ("index", "id", "label", "predicted", "score", "flagged", "error")
CELLS_KEY, FORMULA_SAFE = "cells", "formula-safe"  # header entry of files whose text cells are escaped
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
ESCAPE = "'"
# pandas.read_csv keyword arguments that read results.csv back exactly (text stays text, empty numbers are NaN)
PANDAS_READ_OPTIONS = {"skiprows": 1, "dtype": {"id": str, "label": str, "error": str}, "keep_default_na": False,
                       "na_values": {"predicted": [""], "score": [""], "flagged": [""]}}


def escape_cell(text: str) -> str:
    """A text cell a spreadsheet will not run as a formula: ``'`` in front of a formula prefix (or of ``'``)."""
    return ESCAPE + text if text.startswith((*FORMULA_PREFIXES, ESCAPE)) else text


def unescape_cell(text: str) -> str:
    """The original text of a cell written by :func:`escape_cell`."""
    return text.removeprefix(ESCAPE)


def write_row(buffer: io.StringIO, row: list) -> None:
    """One CSV row ending in ``\n``. A row with a carriage return in a cell is quoted whole (the csv module
    quotes only the line terminator's characters, and an unquoted ``\r`` cannot be read back)."""
    quoting = csv.QUOTE_ALL if any("\r" in str(cell) for cell in row) else csv.QUOTE_MINIMAL
    csv.writer(buffer, lineterminator="\n", quoting=quoting).writerow(row)


class ResumeError(TrojanGuardError, ValueError):
    """An existing results file that belongs to a different run, or cannot be read back."""


@dataclass
class Rows:
    """Columns of the rows read back (``len(rows)`` samples, in index order)."""

    ids: list[str]
    labels: list[str]
    predicted: np.ndarray  # int64, -1 where unreadable
    scores: np.ndarray  # float64, NaN where unreadable
    flagged: np.ndarray  # int8: 1, 0, or -1 when not decided yet / unreadable
    errors: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def readable(self) -> np.ndarray:
        return np.array([not e for e in self.errors], dtype=bool)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` all or nothing: a temporary file beside it, fsync, rename, fsync the folder."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    _fsync_dir(path.parent)


def header_line(meta: dict) -> str:
    return MAGIC + json.dumps(meta, sort_keys=True) + "\n"


def read_header(path: Path) -> dict:
    with open(path, encoding="utf-8", newline="") as f:
        first = f.readline()
    if not first.startswith(MAGIC) or not first.endswith("\n"):
        raise ResumeError(f"{path}: not a trojanguard screening results file (first line {first[:60]!r}); "
                          "choose another output folder or pass overwrite=True (CLI: --restart)")
    try:
        return json.loads(first[len(MAGIC):])
    except json.JSONDecodeError as exc:
        raise ResumeError(f"{path}: unreadable header line ({exc}); pass overwrite=True (CLI: --restart)") from exc


class ResultsFile:
    """Append-only writer and reader of ``results.csv`` (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -------------------------------------------------------------------------------------------- writing
    def create(self, meta: dict) -> None:
        """Start a new file: header and column names, durable before the first batch."""
        write_atomic(self.path, header_line({**meta, CELLS_KEY: FORMULA_SAFE}) + ",".join(COLUMNS) + "\n")

    def append(self, start: int, ids: list[str], labels: list[str], predicted: list[int], scores: list[float],
               flagged: list[int | None], errors: list[str]) -> None:
        """Append one batch of rows (samples ``start …``) and make them durable (flush + fsync). Text cells are
        escaped: the file must have been written by :meth:`create`, or upgraded by ``read(repair=True)``."""
        buffer = io.StringIO()
        for offset, (sample_id, label, prediction, score, flag, error) in enumerate(
                zip(ids, labels, predicted, scores, flagged, errors)):
            write_row(buffer, [start + offset, escape_cell(sample_id), escape_cell(label), "" if error else prediction,
                             "" if error else repr(float(score)), "" if flag is None or error else int(flag),
                             escape_cell(error)])
        with open(self.path, "a", encoding="utf-8", newline="") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())

    def rewrite(self, meta: dict, rows: Rows) -> None:
        """Replace the whole file (header ``meta`` and ``rows``) atomically: used to write final flags."""
        buffer = io.StringIO()
        buffer.write(header_line({**meta, CELLS_KEY: FORMULA_SAFE}) + ",".join(COLUMNS) + "\n")
        for i in range(len(rows)):
            error = rows.errors[i]
            write_row(buffer, [i, escape_cell(rows.ids[i]), escape_cell(rows.labels[i]),
                             "" if error else int(rows.predicted[i]), "" if error else repr(float(rows.scores[i])),
                             "" if error or rows.flagged[i] < 0 else int(rows.flagged[i]), escape_cell(error)])
        write_atomic(self.path, buffer.getvalue())

    # -------------------------------------------------------------------------------------------- reading
    def read(self, *, repair: bool = False) -> tuple[dict, Rows]:
        """Header and rows, text cells as they were before escaping. A torn last line (no newline: killed
        mid-write) is dropped, and with ``repair`` cut from the file too, so appending continues on a clean line;
        ``repair`` also rewrites a file of an earlier version (text cells not escaped) in the escaped form, so
        the rows appended next are written the same way."""
        meta = read_header(self.path)
        with open(self.path, "rb") as f:
            data = f.read()
        complete_end = data.rfind(b"\n") + 1
        if complete_end < len(data) and repair:
            with open(self.path, "r+b") as f:
                f.truncate(complete_end)
                f.flush()
                os.fsync(f.fileno())
        stream = io.StringIO(data[:complete_end].decode("utf-8"), newline="\n")
        stream.readline()  # the header
        if stream.readline().rstrip("\n") != ",".join(COLUMNS):
            raise ResumeError(f"{self.path}: missing the column line {','.join(COLUMNS)!r}; "
                              "pass overwrite=True (CLI: --restart)")
        text = unescape_cell if meta.get(CELLS_KEY) == FORMULA_SAFE else str
        ids, labels, predicted, scores, flagged, errors = [], [], [], [], [], []
        reader = csv.reader(stream)
        for record in reader:
            number = reader.line_num + 2
            try:
                index, sample_id, label, prediction, score, flag, error = record
                if int(index) != len(ids):
                    raise ValueError(f"expected index {len(ids)}, got {index}")
                predicted.append(int(prediction) if prediction else -1)
                scores.append(float(score) if score else math.nan)
                flagged.append(int(flag) if flag else -1)
            except ValueError as exc:
                raise ResumeError(f"{self.path}, line {number}: not a results row ({exc}); the file was changed "
                                  "by hand? pass overwrite=True (CLI: --restart) to start over") from None
            ids.append(text(sample_id))
            labels.append(text(label))
            errors.append(text(error))
        rows = Rows(ids, labels, np.array(predicted, dtype=np.int64), np.array(scores, dtype=np.float64),
                    np.array(flagged, dtype=np.int8), errors)
        if repair and meta.get(CELLS_KEY) != FORMULA_SAFE:
            self.rewrite(meta, rows)
            meta = {**meta, CELLS_KEY: FORMULA_SAFE}
        return meta, rows
