"""The report of a screening run, written into its output folder:

- ``summary.json``: counts, threshold and rule, detector, model hash, data and its fingerprint, the command
  line, timings, score statistics, the clean flags expected at the rule (:func:`clean_flag_expectation`),
  flags per predicted label and the likely target class (:func:`target_label_test`), the most suspicious
  samples, and detection metrics when the truth is known;
- ``histogram.png``: the score distribution of the screened data (and of the clean reference data, scaled to
  the same total) with the threshold;
- ``suspicious.png``: the most suspicious samples with their ids — for Cognitive Distillation each with its mask
  and its cognitive pattern (image × mask: what the model needs to keep its decision);
- ``masks.png`` (detectors with masks): the mean mask of flagged and of unflagged samples, side by side;
- ``index.html``: one self-contained page tying them together (relative links only).

Why the statistics: "10 flagged" at a 5 % false-positive rate on 100 images is what clean data gives, and a
backdoor's poison is predicted as its target class, so flags piling up on one predicted label point at it.

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

TARGET_ALPHA = 0.01  # a predicted label is reported as the likely target below this (corrected) p-value
CHANCE_LEVEL = 0.95  # the clean-flag count chance reaches with this probability is reported
CAPTION_CHARACTERS = 18
FLAGGED_NAME, KEPT_NAME = "flagged.txt", "kept.txt"  # the id lists the screening run writes  # sample ids in the grid captions are shortened from the left to this
HISTOGRAM_BINS = 60  # at most; 2·√N for small N
LOG_SCALE_FROM = 50  # the count axis turns logarithmic once a bin holds this many samples
GRID_COLUMNS = 8
TOP_TABLE_ROWS = 50
UNREADABLE_LISTED = 50
CELL_INCHES = 1.25


# ------------------------------------------------------------------------------------------------ statistics
def clean_flag_expectation(flagged: int, screened: int, rule: str, *, fpr: float | None = None,
                           calibration: np.ndarray | None = None, threshold: float | None = None) -> dict:
    """How many of ``screened`` samples the rule flags when all of them are clean, and whether ``flagged`` is more.

    ``quantile`` with the clean reference scores: a threshold set so that c of n clean scores lie above it flags
    a fresh clean sample with probability Beta(c + 1, n − c), so the clean flags among N samples follow a
    beta-binomial distribution (the calibration set's size is part of the chance). Without the reference scores:
    binomial(N, fpr). ``robust_z``: the rate for normally distributed clean scores only (the rule does not control
    it: no p-value). ``fixed``: unknown. Returns ``expected``, ``chance_upper`` (the count chance stays at or
    under with probability CHANCE_LEVEL), ``excess`` (flagged − expected), ``beyond_chance`` (flagged −
    chance_upper, at least 0), ``p_value`` (one-sided, P(at least ``flagged`` clean flags)) and ``model``."""
    from scipy import stats

    out = {"flagged": int(flagged), "screened": int(screened), "expected": None, "chance_upper": None,
           "excess": None, "beyond_chance": None, "p_value": None, "chance_level": CHANCE_LEVEL}
    scores = None if calibration is None else np.asarray(calibration, dtype=np.float64)
    scores = None if scores is None else scores[np.isfinite(scores)]
    if rule == "quantile" and scores is not None and len(scores) and threshold is not None:
        n, above = len(scores), int((scores > threshold).sum())
        null = stats.betabinom(screened, above + 1, n - above)
        out["model"] = (f"beta-binomial: the threshold leaves {above} of {n} clean reference scores above it, so a "
                        f"clean sample is flagged with probability Beta({above + 1}, {n - above})")
    elif rule == "quantile" and fpr is not None:
        null = stats.binom(screened, fpr)
        out["model"] = f"binomial({screened}, {fpr:g}) (the clean reference scores were not at hand)"
    elif rule == "robust_z":
        from trojanguard.thresholds import ROBUST_Z

        rate = float(stats.norm.sf(ROBUST_Z))
        out["expected"] = screened * rate
        out["model"] = (f"{100 * rate:.3g} % of normally distributed clean scores; not controlled (heavier tails "
                        "give more clean flags), so no p-value")
        return out
    else:
        out["model"] = "unknown: a fixed threshold without clean reference scores"
        return out
    out["expected"] = float(null.mean())
    out["chance_upper"] = int(null.ppf(CHANCE_LEVEL))
    out["excess"] = flagged - out["expected"]
    out["beyond_chance"] = max(0, flagged - out["chance_upper"])
    out["p_value"] = float(null.sf(flagged - 1)) if flagged > 0 else 1.0
    return out


def target_label_test(predicted: np.ndarray, flagged: np.ndarray) -> dict | None:
    """Do the flags concentrate on one predicted label (a backdoor's target)? For every label L, a one-sided
    binomial test: of the K flagged samples, k_L are predicted L, against p_L, L's share among the unflagged
    samples (add-½ smoothed). The label with the smallest p-value is reported, its p-value Bonferroni-corrected
    over the M labels; ``likely`` when that is below TARGET_ALPHA. None without flags. ``predicted`` and
    ``flagged`` hold the screened (readable) samples only."""
    from scipy import stats

    predicted, flagged = np.asarray(predicted), np.asarray(flagged, dtype=bool)
    total = int(flagged.sum())
    if total == 0:
        return None
    labels = sorted(set(predicted.tolist()))
    unflagged = predicted[~flagged]
    best = None
    for label in labels:
        k = int((predicted[flagged] == label).sum())
        share = (float((unflagged == label).sum()) + 0.5) / (len(unflagged) + 0.5 * len(labels))
        p = float(stats.binom.sf(k - 1, total, share)) if k > 0 else 1.0
        if best is None or p < best[1]:
            best = (label, p, k, share)
    label, p, k, share = best
    corrected = min(1.0, p * len(labels)) if len(labels) > 1 else 1.0
    return {"label": str(label), "flagged": k, "flagged_total": total, "share_of_flagged": k / total,
            "share_of_unflagged": float((unflagged == label).mean()) if len(unflagged) else 0.0,
            "labels": len(labels), "p_value": corrected, "likely": corrected < TARGET_ALPHA,
            "test": (f"one-sided binomial test of the flagged samples' predicted labels against the unflagged "
                     f"samples' label shares, Bonferroni-corrected over {len(labels)} predicted label(s)")}


def short_id(sample_id: str, width: int = CAPTION_CHARACTERS) -> str:
    """``sample_id`` shortened from the left (the file name end is what tells samples apart)."""
    return sample_id if len(sample_id) <= width else "…" + sample_id[-(width - 1):]


# ------------------------------------------------------------------------------------------------ figures
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
               masks: torch.Tensor | None = None, patterns: torch.Tensor | None = None,
               row_names: tuple[str, str] = ("mask", "image × mask")) -> Path:
    """The most suspicious samples in rows of GRID_COLUMNS; with ``masks`` / ``patterns`` each sample shows as a
    column of three: image, mask (white = kept), pattern (image × mask) — ``row_names`` label the last two rows
    (PoisonCAM: heat map, candidate box). Captions of flagged samples are red."""
    count = len(images)
    parts = [("image", images)] + ([(row_names[0], masks)] if masks is not None else []) + (
        [(row_names[1], patterns)] if patterns is not None else [])
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
                if tensor is masks:
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


def write_mask_means(path: Path, flagged: torch.Tensor, unflagged: torch.Tensor) -> Path:
    """Where the masks fall: the mean mask (``(K, M, H, W)`` masks averaged over samples and mask channels) of
    flagged and of unflagged samples on one scale (0 black … the larger maximum white: CD's masks are small,
    so the grid's 0…1 scale would show them nearly black), and their difference. A trigger shows as a bright spot
    in the flagged mean that the unflagged mean lacks."""
    means = [m.detach().float().mean((0, 1)).cpu().numpy() for m in (flagged, unflagged)]
    top = max(float(max(m.max() for m in means)), 1e-6)
    difference = means[0] - means[1]
    spread = max(float(np.abs(difference).max()), 1e-6)
    figure = _figure(7.5, 2.8)
    figure.set_layout_engine("constrained")
    axes = figure.subplots(1, 3)
    panels = [(f"flagged (mean of {len(flagged)})", means[0], "gray", 0, top),
              (f"not flagged (mean of {len(unflagged)})", means[1], "gray", 0, top),
              ("flagged − not flagged", difference, "coolwarm", -spread, spread)]
    for ax, (title, picture, cmap, low, high) in zip(axes, panels):
        shown = ax.imshow(picture, cmap=cmap, vmin=low, vmax=high, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        figure.colorbar(shown, ax=ax, shrink=0.8)
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
.banner { background: #fff4e5; border: 1px solid #f0b429; padding: 0.6rem 0.9rem; }
pre { background: #f3f3f3; padding: 0.4rem 0.6rem; white-space: pre-wrap; word-break: break-all; }
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


def chance_sentence(clean_flags: dict) -> str:
    """One sentence: how many clean flags the rule gives by chance and whether the flags exceed that."""
    c = clean_flags
    if c["expected"] is None:
        return "The number of clean samples this threshold flags is unknown (a fixed threshold, no clean reference)."
    if c["p_value"] is None:
        return (f"About {c['expected']:.2g} clean flags would be expected if clean scores were normally distributed; "
                "the robust rule does not control this, so the flags cannot be compared with chance.")
    head = (f"About {c['expected']:.1f} of them are expected from clean samples alone at this rule (up to "
            f"{c['chance_upper']} by chance, {100 * c['chance_level']:.0f} %)")
    if c["beyond_chance"]:
        return (f"{head}: at least {c['beyond_chance']} flag(s) are more than chance explains "
                f"(one-sided p = {c['p_value']:.2g}).")
    return f"{head}: the flags are not more than chance explains (one-sided p = {c['p_value']:.2g})."


def target_sentence(target: dict | None) -> str:
    """One sentence on the flags' predicted labels: the likely target class, or that none stands out."""
    if target is None:
        return "No flags: no target class to point at."
    t = target
    shares = (f"{t['flagged']} of the {t['flagged_total']} flags ({100 * t['share_of_flagged']:.0f} %) are predicted "
              f"{t['label']}, against {100 * t['share_of_unflagged']:.0f} % of the unflagged samples")
    verdict = f"Likely target class: {t['label']}" if t["likely"] else "No predicted label stands out among the flags"
    return f"{verdict} — {shares} (p = {t['p_value']:.2g}; {t['test']})."


def fragile_sentence(test: dict, kind: str = "fragile") -> str:
    """The ensemble's noise-fragile or noise-stable class test (``kind``) in words (``summary["fit"]
    ["noise_fragile_class"]`` / ``["noise_stable_class"]``)."""
    held = f"{100 * test['share']:.0f} % of the most noise-{kind} images, p = {test['p_value']:.2g}"
    if test["class"] is None and test.get("vetoed_class") is not None:
        return (f"none raised: predicted class {test['vetoed_class']} holds {held}, but the members' own outliers shun "
                "that class and gather in another, so its fragile images were read as hard clean images (a noise-like "
                "trigger makes noise evoke the target), not poison")
    if test["class"] is None:
        reason = ("no predicted class holds most of them" if kind == "fragile" else
                  "no predicted class holds most of them, or class concentration already raised it")
        return f"none: {reason} (the largest {held})"
    why = ("images whose prediction small pixel noise takes away gather there, as poison of a precisely read trigger "
           "(WaNet-like) do" if kind == "fragile" else
           "images whose prediction small pixel noise cannot move gather there, as poison of a strong trigger do")
    return f"predicted class {test['class']} holds {held}: {why}; their scores were raised"


def timing_text(run: dict) -> str:
    """The run's time split (fit, calibration, scoring, report) and its throughput, scoring only and end to end."""
    parts = [f"{name} {run[key]:.1f} s" for name, key in (("fit", "fit_seconds"), ("calibration", "calibration_seconds"),
                                                         ("scoring", "seconds"), ("report", "report_seconds"))
             if key == "seconds" or run.get(key, 0) >= 0.05]  # scoring always; the others when they took time
    text = f"{run['total_seconds']:.1f} s in all" + (f" ({', '.join(parts)})" if parts else "")
    if run.get("images_per_second"):
        text += (f"; {run['screened_now']} images: {run['images_per_second']:.2f} images/s scoring only, "
                 f"{run['end_to_end_images_per_second']:.2f} images/s end to end")
    return text


ROBUST_BANNER = ("No clean calibration data: the threshold comes from the robust outlier rule on the screened "
                 "scores themselves, which does not control the false-positive rate — some flags may be clean "
                 "samples with unusual scores, and poison that is not an outlier of the whole set is missed. "
                 "Pass clean reference images (--calibration / calibration=) for a threshold at a known rate.")


def write_html(path: Path, summary: dict, *, histogram: str | None, grid: str | None, masks: str | None = None,
               gallery: str | None = None) -> Path:
    """The report page: verdict, chance and target lines, summary table, histogram, grid, mask means, flags per
    predicted label, top samples."""
    s = summary
    threshold = s["threshold"]
    verdict = (f"{s['flagged']} of {s['screened']} readable samples flagged ({100 * s['flagged_fraction']:.2f} %) "
               f"by <b>{html.escape(s['detector']['name'])}</b> at threshold {threshold['value']:.6g} "
               f"({html.escape(threshold['rule'])}). {html.escape(chance_sentence(s['clean_flags']))}")
    facts = [
        ["command", s.get("command") or "screen() called from Python"],
        ["working directory", s.get("working_directory", "")],
        ["data", s["data"]["description"]],
        ["data fingerprint", (f"{s['data']['fingerprint'].get('kind', '')} {s['data']['digest']} "
                             f"({_fingerprint_basis(s['data']['fingerprint'])})")],
        ["samples", s["samples"]],
        ["unreadable images", s["unreadable"]],
        ["read but not scored (non-finite detector score)", s.get("unscored", 0)],
        ["detector", s["detector"]["repr"]],
        ["model (sha256 of the weights)", s["model"]["sha256"]],
        ["threshold rule", threshold["description"]],
        ["threshold", threshold["value"]],
        ["clean flags expected", s["clean_flags"]["model"]],
    ]
    if threshold.get("calibration"):
        facts.append(["clean reference data", threshold["calibration"]])
    for kind in ("fragile", "stable"):
        test = (s.get("fit") or {}).get(f"noise_{kind}_class")
        if test:
            facts.append([f"noise-{kind} class", fragile_sentence(test, kind)])
    run = s["run"]
    facts.append(["time (this invocation)", timing_text(run)])
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
    ]
    if threshold["rule"] == "robust_z":
        parts.append(f'<p class="banner"><b>Threshold without clean data.</b> {html.escape(ROBUST_BANNER)}</p>')
    parts += [
        f'<p class="verdict">{verdict}</p>',
        f"<p>{html.escape(target_sentence(s.get('target')))}</p>",
        "<h2>Summary</h2>",
        _facts(facts),
        ('<p class="note">Files: <a href="results.csv">results.csv</a> (one row per sample: id, given label, '
         'predicted label, score, flag, read error) · <a href="summary.json">summary.json</a> · '
         f'<a href="{FLAGGED_NAME}">{FLAGGED_NAME}</a> and <a href="{KEPT_NAME}">{KEPT_NAME}</a> (one sample id per '
         "line: flagged / screened and not flagged)</p>"),
    ]
    if histogram:
        parts += ["<h2>Score distribution</h2>",
                  f'<img src="{html.escape(histogram)}" alt="histogram of suspicion scores with the threshold">',
                  '<p class="note">Higher = more suspicious. Samples right of the dashed line are flagged.</p>']
    if grid:
        note = ("Each column: the image, the mask Cognitive Distillation learned (white = pixels the model needs "
                "to keep its decision) and the cognitive pattern (image × mask). A trigger shows up as a small, "
                "compact mask.") if s["detector"]["name"] == "cd" else (
            "Each column: the image, its cluster-masking heat map (bright = filling that region drops the image's "
            "activation to its own cluster most) and its candidate trigger window (red). The predicted label is "
            "the image's k-means cluster.") if s["detector"]["name"] == "poisoncam" else (
            "The most suspicious samples, highest first.")
        parts += [f"<h2>The {len(s['top'][:s['grid_size']])} most suspicious samples</h2>",
                  f'<img src="{html.escape(grid)}" alt="grid of the most suspicious samples">',
                  (f'<p class="note">{html.escape(note)} Caption: rank and sample id, score → predicted label; '
                  "flagged samples in red.</p>")]
    if gallery and s.get("gallery"):
        parts += [f"<h2>{html.escape(s['gallery']['title'])}</h2>",
                  f'<img src="{html.escape(gallery)}" alt="{html.escape(s["gallery"]["title"])}">']
    if masks and s.get("mask_means"):
        m = s["mask_means"]
        parts += ["<h2>Where the masks fall</h2>",
                  f'<img src="{html.escape(masks)}" alt="mean mask of flagged and of unflagged samples">',
                  (f'<p class="note">Mean mask of {m["flagged"]} flagged and {m["unflagged"]} unflagged samples '
                   f"(evenly spaced, at most {m['per_group']} of each; mean mask value {m['flagged_mean']:.3g} "
                   f"vs {m['unflagged_mean']:.3g}). A trigger at a fixed place shows as a bright spot in the "
                   "flagged mean and in the difference.</p>")]
    per_label = s["flags_by_predicted_label"]
    if per_label:
        rows = [[label, v["screened"], v["flagged"], f"{100 * v['flagged'] / v['screened']:.1f}" if v["screened"] else "–"]
                for label, v in per_label.items()]
        target = s.get("target")
        row_classes = ["flagged" if target and target["likely"] and label == target["label"] else ""
                       for label in per_label]
        parts += ["<h2>Flags by predicted label</h2>",
                  ('<p class="note">A backdoor sends its poison to one target class: flags concentrated on one '
                   "predicted label point at it; the test is under the verdict above.</p>"),
                  _table(["predicted label", "screened", "flagged", "flagged (%)"], rows, row_classes)]
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


def _fingerprint_basis(fingerprint: dict) -> str:
    """What the data fingerprint hashes, in words."""
    return {"folder": "each file's path, size and modification time", "npz": "the array's CRC-32 from the zip",
            "tensor": "the tensor's bytes"}.get(fingerprint.get("kind"), "the source's own fingerprint")


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
