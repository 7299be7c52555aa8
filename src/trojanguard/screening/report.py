"""The report of a screening run, written into its output folder:

- ``summary.json``: counts, threshold and rule, detector, model hash, data, throughput, score statistics, flags
  per predicted label, the most suspicious samples, and detection metrics when the truth is known;
- ``histogram.png``: the score distribution of the screened data (and of the clean reference data, scaled to
  the same total) with the threshold;
- ``suspicious.png``: the most suspicious samples — for Cognitive Distillation each with its mask and its
  cognitive pattern (image × mask: what the model needs to keep its decision);
- ``index.html``: one self-contained page tying them together (relative links only).

Figures use matplotlib's object API with the Agg canvas (no pyplot, no display, the caller's backend is left
alone).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np
import torch

HISTOGRAM_BINS = 60  # at most; 2·√N for small N
LOG_SCALE_FROM = 50  # the count axis turns logarithmic once a bin holds this many samples
GRID_COLUMNS = 8
TOP_TABLE_ROWS = 50
UNREADABLE_LISTED = 50
CELL_INCHES = 1.25


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def write_histogram(path: Path, scores: np.ndarray, threshold: float, rule: str, *,
                    calibration: np.ndarray | None = None, truth: np.ndarray | None = None,
                    detector: str = "") -> Path:
    """Score histogram of the screened data (split into known poisoned / clean when ``truth`` is given), the
    clean reference data's histogram scaled to the same total, and the threshold as a vertical line."""
    scores = scores[np.isfinite(scores)]
    finite_calibration = None if calibration is None else calibration[np.isfinite(calibration)]
    pooled = scores if finite_calibration is None else np.concatenate([scores, finite_calibration])
    low, high = (float(pooled.min()), float(pooled.max())) if len(pooled) else (0.0, 1.0)
    low, high = min(low, threshold), max(high, threshold)
    if high <= low:
        high = low + 1.0
    bins = np.linspace(low, high, int(np.clip(2 * math.sqrt(max(len(pooled), 1)), 10, HISTOGRAM_BINS)) + 1)
    figure = _figure(8, 4.2)
    axes = figure.add_subplot(1, 1, 1)
    if truth is not None:
        axes.hist(scores[~truth], bins=bins, histtype="stepfilled", alpha=0.55, color="#4c72b0",
                  label=f"screened, clean (truth known) — {int((~truth).sum())}")
        axes.hist(scores[truth], bins=bins, histtype="stepfilled", alpha=0.6, color="#dd8452",
                  label=f"screened, poisoned (truth known) — {int(truth.sum())}")
    else:
        axes.hist(scores, bins=bins, histtype="stepfilled", alpha=0.6, color="#4c72b0",
                  label=f"screened data — {len(scores)}")
    if finite_calibration is not None and len(finite_calibration):
        weights = np.full(len(finite_calibration), len(scores) / len(finite_calibration))
        axes.hist(finite_calibration, bins=bins, weights=weights, histtype="step", linewidth=1.6, color="#2a2a2a",
                  label=f"clean reference — {len(finite_calibration)} (scaled to the same total)")
    axes.axvline(threshold, color="#c44e52", linestyle="--", linewidth=1.8,
                 label=f"threshold {threshold:.4g} ({rule})")
    counts, _ = np.histogram(scores, bins=bins)
    if counts.max(initial=0) >= LOG_SCALE_FROM:  # a few poisoned samples next to thousands of clean ones
        axes.set_yscale("log")
    axes.set_xlabel(f"suspicion score{f' ({detector})' if detector else ''} — higher = more suspicious")
    axes.set_ylabel("samples per bin" + (" (log scale)" if axes.get_yscale() == "log" else ""))
    axes.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.01), ncol=2, frameon=False)
    axes.grid(alpha=0.25)
    figure.tight_layout()
    figure.savefig(path)
    return path


def _as_picture(image: torch.Tensor) -> tuple[np.ndarray, str | None]:
    """(H, W[, 3]) array in [0, 1] and the colour map (gray for one channel)."""
    image = image.detach().float().clamp(0, 1).cpu()
    if image.shape[0] == 1:
        return image[0].numpy(), "gray"
    return image.permute(1, 2, 0).numpy(), None


def write_grid(path: Path, images: torch.Tensor, captions: list[str], *, flagged: list[bool] | None = None,
               masks: torch.Tensor | None = None, patterns: torch.Tensor | None = None) -> Path:
    """The most suspicious samples in rows of GRID_COLUMNS; with ``masks`` / ``patterns`` each sample shows as a
    column of three: image, mask (white = kept), pattern (image × mask). Captions of flagged samples are red."""
    count = len(images)
    parts = [("image", images)] + ([("mask", masks)] if masks is not None else []) + (
        [("image × mask", patterns)] if patterns is not None else [])
    columns = max(1, min(GRID_COLUMNS, count))
    groups = max(1, math.ceil(count / columns))
    figure = _figure(columns * CELL_INCHES + 0.5, groups * (len(parts) * CELL_INCHES + 0.3))
    figure.set_layout_engine("constrained")
    subfigures = figure.subfigures(groups, 1, squeeze=False)[:, 0]
    for group, subfigure in enumerate(subfigures):
        axes = subfigure.subplots(len(parts), columns, squeeze=False)
        for column in range(columns):
            i = group * columns + column
            for p, (name, tensor) in enumerate(parts):
                ax = axes[p, column]
                ax.set_xticks([])
                ax.set_yticks([])
                if i >= count:
                    ax.axis("off")
                    continue
                if name == "mask":
                    ax.imshow(tensor[i].detach().float().mean(0).cpu().numpy(), cmap="gray", vmin=0, vmax=1,
                              interpolation="nearest")
                else:
                    picture, cmap = _as_picture(tensor[i])
                    ax.imshow(picture, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
                if p == 0:
                    red = flagged is not None and flagged[i]
                    ax.set_title(captions[i], fontsize=7, color="#c44e52" if red else "#222222")
                if column == 0:
                    ax.set_ylabel(name, fontsize=7)
    figure.savefig(path)
    return path


# ------------------------------------------------------------------------------------------------ HTML
STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #222; padding: 0 1rem; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
.verdict { font-size: 1.15rem; background: #f6f6f6; border-left: 4px solid #c44e52; padding: 0.6rem 0.9rem; }
table { border-collapse: collapse; font-size: 0.9rem; margin: 0.5rem 0; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } table.facts th { font-weight: 600; white-space: nowrap; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.flagged td { background: #fdecea; }
img { max-width: 100%; border: 1px solid #eee; }
.note { color: #666; font-size: 0.85rem; }
code { background: #f3f3f3; padding: 0 0.2rem; }
"""


def _cell(value) -> str:
    if isinstance(value, float):
        return f'<td class="num">{value:.6g}</td>'
    if isinstance(value, int):
        return f'<td class="num">{value}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def _table(header: list[str], rows: list[list], row_classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        css = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{css}>" + "".join(_cell(v) for v in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _facts(rows: list[list]) -> str:
    """A two-column table of labelled facts (row headers on the left, values as text)."""
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_text(v))}</td></tr>" for k, v in rows)
    return f'<table class="facts"><tbody>{body}</tbody></table>'


def _text(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write_html(path: Path, summary: dict, *, histogram: str | None, grid: str | None) -> Path:
    """The report page: verdict, summary table, histogram, grid, flags per predicted label, top samples."""
    s = summary
    threshold = s["threshold"]
    verdict = (f"{s['flagged']} of {s['screened']} readable samples flagged ({100 * s['flagged_fraction']:.2f} %) "
               f"by <b>{html.escape(s['detector']['name'])}</b> at threshold {threshold['value']:.6g} "
               f"({html.escape(threshold['rule'])}).")
    facts = [
        ["data", s["data"]["description"]],
        ["samples", s["samples"]],
        ["unreadable images", s["unreadable"]],
        ["read but not scored (non-finite detector score)", s.get("unscored", 0)],
        ["detector", s["detector"]["repr"]],
        ["model (sha256 of the weights)", s["model"]["sha256"]],
        ["threshold rule", threshold["description"]],
        ["threshold", threshold["value"]],
    ]
    if threshold.get("calibration"):
        facts.append(["clean reference data", threshold["calibration"]])
    run = s["run"]
    if run.get("images_per_second"):
        facts.append(["throughput (this invocation)", (f"{run['images_per_second']:.2f} images/s "
                                                        f"({run['screened_now']} images in {run['seconds']:.1f} s)")])
    if run.get("resumed_from") and run.get("screened_now"):
        facts.append(["resumed", f"from sample {run['resumed_from']} (earlier samples were read back from results.csv)"])
    elif run.get("resumed_from"):
        facts.append(["resumed", "the run was already complete: every row was read back from results.csv"])
    scores = s["scores"]
    shown = " / ".join("–" if scores[k] is None else f"{scores[k]:.4g}" for k in ("min", "median", "max"))
    facts.append(["scores (min / median / max of the finite ones)", shown
                  + (f"; {scores['infinite']} infinite (most suspicious)" if scores.get("infinite") else "")])
    truth = s.get("truth")
    if truth:
        facts.append(["known poisoned samples", truth["poisoned"]])
        facts.append(["AUROC vs truth", "n/a (one class only)" if truth["auroc"] is None else f"{truth['auroc']:.3f}"])
        facts.append(["precision / recall of the flags", f"{truth['precision']:.3f} / {truth['recall']:.3f}"])
        facts.append(["clean samples flagged", f"{truth['false_positive_rate']:.4f}"])
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>trojanguard screening report — {html.escape(s['data']['description'])}</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>trojanguard screening report</h1>",
        f'<p class="note">{html.escape(s["created"])} · trojanguard {html.escape(s["trojanguard"])}</p>',
        f'<p class="verdict">{verdict}</p>',
        "<h2>Summary</h2>",
        _facts(facts),
        ('<p class="note">Files: <a href="results.csv">results.csv</a> (one row per sample: id, given label, '
         'predicted label, score, flag, read error) · <a href="summary.json">summary.json</a></p>'),
    ]
    if histogram:
        parts += ["<h2>Score distribution</h2>",
                  f'<img src="{html.escape(histogram)}" alt="histogram of suspicion scores with the threshold">',
                  '<p class="note">Higher = more suspicious. Samples right of the dashed line are flagged.</p>']
    if grid:
        note = ("Each column: the image, the mask Cognitive Distillation learned (white = pixels the model needs "
                "to keep its decision) and the cognitive pattern (image × mask). A trigger shows up as a small, "
                "compact mask.") if s["detector"]["name"] == "cd" else "The most suspicious samples, highest first."
        parts += [f"<h2>The {len(s['top'][:s['grid_size']])} most suspicious samples</h2>",
                  f'<img src="{html.escape(grid)}" alt="grid of the most suspicious samples">',
                  f'<p class="note">{html.escape(note)} Caption: rank, score, predicted label.</p>']
    per_label = s["flags_by_predicted_label"]
    if per_label:
        rows = [[label, v["screened"], v["flagged"], f"{100 * v['flagged'] / v['screened']:.1f}" if v["screened"] else "–"]
                for label, v in per_label.items()]
        parts += ["<h2>Flags by predicted label</h2>",
                  ('<p class="note">A backdoor sends its poison to one target class: flags concentrated on one '
                   "predicted label point at it.</p>"),
                  _table(["predicted label", "screened", "flagged", "flagged (%)"], rows)]
    top = s["top"][:TOP_TABLE_ROWS]
    rows = [[t["rank"], t["index"], t["id"], t["label"], t["predicted"], t["score"], "yes" if t["flagged"] else "no"]
            + ([("yes" if t["poisoned"] else "no")] if truth else []) for t in top]
    header = ["rank", "index", "id", "given label", "predicted", "score", "flagged"] + (["poisoned (truth)"] if truth else [])
    parts += [f"<h2>Top {len(top)} by score</h2>", _table(header, rows, ["flagged" if t["flagged"] else "" for t in top])]
    if s["unreadable_samples"]:
        listed = s["unreadable_samples"][:UNREADABLE_LISTED]
        parts += [f"<h2>Samples not screened ({len(s['unreadable_samples'])}: unreadable or not scored)</h2>",
                  _table(["index", "id", "error"], [[u["index"], u["id"], u["error"]] for u in listed])]
    parts.append("</body></html>\n")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def write_summary(path: Path, summary: dict) -> Path:
    """Strict JSON: an infinite score (the highest suspicion) is written as the string "inf" / "-inf"."""
    path.write_text(json.dumps(_finite_json(summary), indent=2, allow_nan=False, default=str) + "\n",
                    encoding="utf-8")
    return path


def _finite_json(value):
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value
