"""Detection across trigger families: every ensemble member alone, and every fusion rule over member sets, scoring
the poisoned training set itself (no clean data), per zoo attack; plus FPR control and leave-one-family-out.

Run: ``python benchmarks/detect_families.py [--attacks badnets ...] [--fraction 0.2 | --clean 100]
[--poison-rate 0.01] [--dataset colour_digits] [--zoo-seed 1] [--members cd-p,cd-l,features,...] [--fpr-attacks badnets] [--out results.json]``; ``--lofo`` only reads the results file and reports; ``--variants`` compares the options of
``spectral`` and ``clustering`` fitted on the whole training set; ``--rescore features`` refits feature members on
the results file's screened sets (its CD scores kept) after their fit changed; ``--labels`` gives the fit the
screened set's training labels (the label probe's regime: a training set has them; the records say which members
were fitted with them, ``labels_given``); ``--lofo --lofo-with other.json ...``
pools other settings' results (another dataset or poison rate) into leave-one-family-out; ``--spread a.json b.json
...`` reports how much each family's AUROC moves between results files of the same setting on other screened draws
(``--seed``), and the leave-one-family-out summary of each.

- The screened set: a seeded stratified ``--fraction`` of the zoo model's poisoned training set (poisoned and clean
  alike, so the poison rate is the zoo's), or with ``--clean N`` every poisoned sample plus N clean ones (as
  ``cd_effectiveness.py``; the poison is then most of the set, which the self-fitted members are not made for).
- Each attack: ``Ensemble(model, members=<all>).fit(screened)`` fits the feature members on the screened set and
  scores it with every member (CD members once each; ``member_seconds`` times them), so every member set and
  fusion rule is evaluated from the same scores, exactly as ``Ensemble`` fuses them (``detect.ensemble.fuse``).
- Every fused row is evaluated with and without class concentration (``… / zscore + class``: ``Ensemble``'s
  ``concentration="class"``, from the screened images' predicted classes the record keeps); the robust rule flags
  nothing on rank fusions, so only ``zscore`` gets the twin.
- The noise-fragile class (``Ensemble``'s ``fragility="class"``, the default) is applied to every row of a record
  that keeps the images' noise fragility (``fragility``; ``--rescore`` adds it): where it fires, the row is re-placed
  as ``Ensemble`` re-places it; where it does not, the row is unchanged. Each row also comes with the noise-stable
  class at each gate of ``STABLE_GATES`` (``… + stable≤g``; ``Ensemble``'s is ``STABLE_GATE``), so leave one family
  out chooses the gate. ``--no-fragility`` reports without either.
- Leave one family out also chooses among *gated* twins of the multi-member rows that hold ``typicality`` or
  ``clustering`` (``GATED_MEMBERS``): ``features+typicality[p<0.001]+probe / …`` is the row with ``typicality`` where
  its own robust outliers gather in one predicted class (``outlier_significance`` below ``MEMBER_GATES``), else the row
  without it, per record — ``Ensemble``'s ``member_gates``. The ``labelled default`` rows gate as ``Ensemble`` does.
- Cover samples (images the attack altered but left with their true label: ``PoisonedDataset.cover_indices``)
  count as clean, as the field counts them; leave-one-family-out also reports the held-out AUROC against the
  *untouched* images alone (cover samples left out), so what a family's misses are is on the table.
  ``--annotate`` adds the predicted classes and cover marks to a results file written before they were kept.
- ``--fpr-attacks``: every member also scores the zoo's clean test split; a threshold calibrated at ``--fpr`` on a
  random half is applied to the other half (``--splits`` random splits): the calibrated FPR. The robust rule's FPR
  (no clean data) is the fraction of clean screened samples above ``median + 3.5 · 1.4826 · MAD``.
- Attacks default to every name in ``trojanguard.attacks.ATTACKS`` (new families join without code change).
- The results file (JSON) is written after each attack and is resumed: attacks already in it are not rerun.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import re
import time
from pathlib import Path

import numpy as np
import torch

from trojanguard.attacks import ATTACKS
from trojanguard.detect.ensemble import (
    CD_MODES,
    DEFAULT_MEMBERS,
    FEATURE_MEMBERS,
    FUSIONS,
    LABELLED_MEMBER_GATES,
    LABELLED_MEMBERS,
    MEMBERS,
    RANK_FUSIONS,
    Ensemble,
    concentrate,
    concentration_of,
    fuse,
    gated_out_members,
    outlier_significance,
    parse_members,
)
from trojanguard.detect.fragility import (
    STABLE_GATE,
    fragile_class,
    outliers_gather_elsewhere,
    place_by_fragility,
    stable_class,
)
from trojanguard.metrics import auroc, predict_labels
from trojanguard.thresholds import quantile_threshold, robust_threshold
from trojanguard.zoo import ZOO_DATASETS, ZooConfig, get_backdoored_model

DIGIT_CLASSES = 10  # the digits' classes, balanced: a clean-label rate of the training set × 10 = of the target class
# member sets evaluated with every fusion rule (besides each member alone)
MEMBER_SETS = {
    "default": DEFAULT_MEMBERS,
    "labelled default": LABELLED_MEMBERS,  # Ensemble's members when its fit is given the labels (--labels)
    "cd-p+features+clustering": ("cd-p", "features", "clustering"),  # the default until issue 15's sixteenth session
    "all": MEMBERS,
    "cd-p+features": ("cd-p", "features"),
    "cd-p+cd-l+features": ("cd-p", "cd-l", "features"),
    "no-cd": ("features", "spectral", "clustering"),
}
MEMBER_SET_GATES = {"labelled default": LABELLED_MEMBER_GATES}  # a set's gated members, as Ensemble's fit gates them


def screened_subset(poisoned: torch.Tensor, fraction: float, clean: int, seed: int) -> torch.Tensor:
    """Indices of the screened set (module docstring), sorted."""
    g = torch.Generator().manual_seed(seed)
    pos, neg = torch.nonzero(poisoned).flatten(), torch.nonzero(~poisoned).flatten()
    if clean:
        return torch.cat([pos, neg[torch.randperm(len(neg), generator=g)[:clean]]]).sort().values
    pick = lambda idx: idx[torch.randperm(len(idx), generator=g)[: max(1, round(fraction * len(idx)))]]
    return torch.cat([pick(pos), pick(neg)]).sort().values


def zoo_config(attack: str, poison_rate: float | None, dataset: str = "digits", arch: str = "small_cnn",
               image_size: int = ZooConfig.image_size, seed: int = 0) -> ZooConfig:
    """The zoo model of ``attack`` at ``poison_rate`` (a fraction of the training set; None: the zoo's default) and
    training ``seed`` (another poisoned set and model; the zoo's is 0). A clean-label attack poisons only its target
    class, so its rate is converted to a fraction of that class (the digits' ten classes are balanced: ``10 ×
    poison_rate``)."""
    model = {"dataset": dataset, "arch": arch, "image_size": image_size, "seed": seed}
    if poison_rate is None:
        return ZooConfig(attack=attack, **model)
    clean_label = ZooConfig(attack=attack).make_attack().clean_label
    return ZooConfig(attack=attack, poison_rate=min(1.0, poison_rate * DIGIT_CLASSES) if clean_label else poison_rate,
                     **model)


def scored_members(records) -> tuple[str, ...]:
    """The members every record has scores of, in :data:`MEMBERS` order (``--members`` may have left some out)."""
    return tuple(m for m in MEMBERS if all(m in r["scores"] for r in records))


def screened(attack: str, args):
    """The zoo entry of ``attack`` and its screened set: ``(entry, images, truth, cover)`` (cover: the attack altered
    the image but kept its label)."""
    config = zoo_config(attack, args.poison_rate, args.dataset, args.arch, args.image_size, args.zoo_seed)
    entry = get_backdoored_model(config, show_progress=False)
    index = screened_subset(entry.train.is_poisoned, args.fraction, args.clean, args.seed)
    return entry, entry.train.dataset.x[index], entry.train.is_poisoned[index], entry.train.is_cover[index]


def screened_labels(entry, args) -> torch.Tensor | None:
    """The screened set's training labels (the poison's are the target's) with ``--labels``, else None: what
    ``Ensemble.fit`` is given (the label probe reads them; the feature members fit per label instead of per
    predicted class)."""
    if not args.labels:
        return None
    index = screened_subset(entry.train.is_poisoned, args.fraction, args.clean, args.seed)
    return entry.train.dataset.y[index]


def annotate(record: dict, args) -> None:
    """Add ``predicted`` (the model's classes of the screened set), ``cover`` (1 where the attack altered the image
    but kept its label) and, where the test split was scored, ``test_predicted`` to ``record`` (no member rerun)."""
    entry, x, truth, cover = screened(record["attack"], args)
    if truth.int().tolist() != record["truth"]:
        raise SystemExit(f"--annotate: {record['attack']}: the screened set differs from the results file's")
    record["predicted"] = predict_labels(entry.model, x).tolist()
    record["cover"] = cover.int().tolist()
    if "test_scores" in record:
        record["test_predicted"] = predict_labels(entry.model, entry.test.x).tolist()


def rescore(record: dict, members: tuple[str, ...], args) -> None:
    """Refit ``members`` (feature members: one shared pass) on ``record``'s screened set and replace their scores in
    it, the other members' scores kept: a member whose fit changed is measured without rerunning CD."""
    if any(m in ("cd-p", "cd-l", "cd-f") for m in members):
        raise SystemExit("--rescore: only one-pass members (features, spectral, clustering, typicality, probe) are "
                         "rescored")
    entry, x, truth, _ = screened(record["attack"], args)
    if truth.int().tolist() != record["truth"]:
        raise SystemExit(f"--rescore: {record['attack']}: the screened set differs from the results file's")
    ensemble = Ensemble(entry.model, members=members, member_gates=None, seed=args.seed, show_progress=False).fit(
        x, screened_labels(entry, args))
    for k, m in enumerate(ensemble.members):
        record["scores"][m] = ensemble.reference_scores[:, k].tolist()
    record["predicted"] = ensemble.reference_predicted.tolist()  # this model's classes, as the rescored members'
    record["fragility"] = ensemble.reference_fragility.tolist()
    if "test_scores" in record:
        test, predicted = ensemble.member_scores(entry.test.x, with_classes=True)
        for k, m in enumerate(ensemble.members):
            record["test_scores"][m] = test[:, k].tolist()
        record["test_predicted"] = predicted.tolist()
        record["test_fragility"] = ensemble.fragility_scores(entry.test.x).tolist()
    record.setdefault("rescored", {}).update({m: f"{ensemble.detectors[m]!r}" for m in members})
    record.setdefault("labels_given", {}).update({m: bool(args.labels) for m in members})
    if "features" in members:  # which label probe's easier half its class fits left out (Ensemble's probe_filter)
        record["probe_filter"] = ensemble.fitted_probe_filter
    record["member_seconds"].update(ensemble.member_seconds)  # the rescored passes' times (this machine)


def run_attack(attack: str, args) -> dict:
    entry, x, truth, cover = screened(attack, args)
    ensemble = Ensemble(entry.model, members=args.members, member_gates=None, steps=args.steps, seed=args.seed,
                        show_progress=False)
    started = time.perf_counter()
    ensemble.fit(x, screened_labels(entry, args))
    record = {"attack": attack, "images": len(x), "poisoned": int(truth.sum()), "truth": truth.int().tolist(),
              "cover": cover.int().tolist(), "predicted": ensemble.reference_predicted.tolist(),
              "clean_accuracy": entry.clean_accuracy, "attack_success_rate": entry.attack_success_rate,
              "seconds": time.perf_counter() - started, "member_seconds": ensemble.member_seconds,
              "scores": {m: ensemble.reference_scores[:, k].tolist() for k, m in enumerate(ensemble.members)},
              "fragility": ensemble.reference_fragility.tolist(),
              "labels_given": {m: bool(args.labels) for m in ensemble.members},
              "probe_filter": ensemble.fitted_probe_filter}
    if attack in args.fpr_attacks:
        test, predicted = ensemble.member_scores(entry.test.x, with_classes=True)
        record["test_scores"] = {m: test[:, k].tolist() for k, m in enumerate(ensemble.members)}
        record["test_predicted"] = predicted.tolist()
        record["test_fragility"] = ensemble.fragility_scores(entry.test.x).tolist()
    return record


CONCENTRATED = " + class"  # the suffix of a fused row with class concentration (Ensemble's concentration="class")


def fused_rows(reference: torch.Tensor, test: torch.Tensor | None, fusion: str, record: dict
               ) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """``{fusion: (screened, test)}`` fused as ``Ensemble`` fuses them, and for ``zscore`` also ``zscore + class``
    (concentrated by the record's predicted classes; left out when the record has none)."""
    fused = fuse(reference, reference, fusion)
    fused_test = None if test is None else fuse(reference, test, fusion)
    out = {fusion: (fused.numpy(), None if fused_test is None else fused_test.numpy())}
    if fusion in UNBOUNDED_FUSIONS and "predicted" in record:
        predicted = torch.tensor(record["predicted"])
        classes = max(record["predicted"] + record.get("test_predicted", [])) + 1
        threshold, factors = concentration_of(fused, predicted, classes)
        raised_test = None
        if fused_test is not None and "test_predicted" in record:
            raised_test = concentrate(fused_test, torch.tensor(record["test_predicted"]), threshold, factors).numpy()
        out[fusion + CONCENTRATED] = (concentrate(fused, predicted, threshold, factors).numpy(), raised_test)
    if not WITH_FRAGILITY or "fragility" not in record or "predicted" not in record:
        return out
    fragility, predicted = torch.tensor(record["fragility"]), torch.tensor(record["predicted"])
    test = None
    if "test_fragility" in record and "test_predicted" in record:
        test = (torch.tensor(record["test_fragility"]), torch.tensor(record["test_predicted"]))
    classes = max(record["predicted"] + record.get("test_predicted", [])) + 1
    fragile = fragile_class(fragility, predicted, classes)[0]
    stable = stable_class(fragility, predicted, torch.ones(classes), gate=math.inf)[0]  # each row gates it below
    placed = {}
    for name, (screened, test_scores) in out.items():
        # as Ensemble.score: the fragile class, then the stable class (gated by the plain fused row's enrichment)
        reference = torch.from_numpy(screened)
        test_scores = None if test_scores is None or test is None else torch.from_numpy(test_scores)
        plain = torch.from_numpy(out[name.removesuffix(CONCENTRATED)][0])
        threshold, enrichment = concentration_of(plain, predicted, classes)
        if fragile is not None and not outliers_gather_elsewhere(  # Ensemble's veto: the plain row's outliers go elsewhere
                plain.double() > threshold, predicted, fragile):
            reference, test_scores = placed_rows(reference, test_scores, fragility, predicted, test, 1, fragile)
        placed[name] = (reference.numpy(), None if test_scores is None else test_scores.numpy())
        for gate in STABLE_GATES:
            raised, raised_test = reference, test_scores
            if stable is not None and float(enrichment[stable]) <= gate:
                raised, raised_test = placed_rows(reference, test_scores, fragility, predicted, test, -1, stable)
            placed[f"{name}{STABLE}{gate:g}"] = (raised.numpy(), None if raised_test is None else raised_test.numpy())
    return placed


WITH_FRAGILITY = True  # --no-fragility: rows as without Ensemble's fragility="class"
STABLE = " + stable≤"  # the suffix of a row with the noise-stable class at a gate (Ensemble's: STABLE_GATE)
STABLE_GATES = (1.0, 1.5, STABLE_GATE, 3.0, math.inf)  # the gates leave one family out chooses among (and none)


def placed_rows(reference: torch.Tensor, test: torch.Tensor | None, fragility: torch.Tensor, predicted: torch.Tensor,
                test_fragility: tuple[torch.Tensor, torch.Tensor] | None, sign: int, fired: int
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A fused row of the screened set (and of the clean test split) re-placed by ``sign`` · fragility in class
    ``fired``, as ``Ensemble.score`` re-places it."""
    placed_test = None
    if test is not None:
        placed_test = place_by_fragility(reference, sign * fragility, predicted, test, sign * test_fragility[0],
                                         test_fragility[1], fired)
    return place_by_fragility(reference, sign * fragility, predicted, reference, sign * fragility, predicted,
                              fired), placed_test


def rows_of(record: dict, scored: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """``{row name: (screened-set scores, clean test scores or None)}`` for each member of ``scored`` and each
    member set (of them) × fusion."""
    reference = torch.tensor([record["scores"][m] for m in scored], dtype=torch.float64).T
    test = record.get("test_scores")
    test = None if test is None else torch.tensor([test[m] for m in scored], dtype=torch.float64).T
    out = {m: (reference[:, k].numpy(), None if test is None else test[:, k].numpy()) for k, m in enumerate(scored)}
    for (set_name, members), fusion in itertools.product(MEMBER_SETS.items(), FUSIONS):
        if not set(members) <= set(scored):
            continue
        members = joined_members(record, members, MEMBER_SET_GATES.get(set_name, {}))
        columns = [scored.index(m) for m in members]
        fused = fused_rows(reference[:, columns], None if test is None else test[:, columns], fusion, record)
        out.update({f"{set_name} / {name}": values for name, values in fused.items()})
    return out


def joined_members(record: dict, members: tuple[str, ...], gates: dict[str, float]) -> tuple[str, ...]:
    """``members`` less each gated one whose outliers do not gather in one class on the record's screened set, as
    ``Ensemble``'s fit leaves it out (``member_gates``; all join where the record keeps no predicted classes)."""
    out = gated_out_members(members, {m: record_p_value(record, m) for m in members if m in gates}, gates)
    return tuple(m for m in members if m not in out)


def record_p_value(record: dict, member: str) -> float:
    """``member``'s :func:`outlier_significance` on the record's screened set, by the predicted classes it keeps (0
    where it keeps none: a gated member then always joins)."""
    if not record.get("predicted"):
        return 0.0
    predicted = torch.tensor(record["predicted"])
    return outlier_significance(torch.tensor(record["scores"][member], dtype=torch.float64), predicted,
                              int(predicted.max()) + 1)


def seconds_of(row: str, record: dict) -> float:
    """Seconds the row's members took: the shared feature pass if a class-wise feature member is among them, plus the
    members timed on their own (CD, ``typicality``), plus the fragility pass for a fused row (``Ensemble`` runs it
    with any members)."""
    members = (row,) if row in MEMBERS else MEMBER_SETS[row.split(" / ")[0]]
    seconds = record["member_seconds"]
    feature = seconds["feature pass"] if any(m in FEATURE_MEMBERS for m in members) else 0.0
    fragility = seconds.get("fragility", 0.0) if WITH_FRAGILITY and row not in MEMBERS else 0.0
    return feature + fragility + sum(seconds[m] for m in members if m in seconds)


def report(results: dict, args) -> str:
    records = [results["attacks"][a] for a in results["attacks"]]
    attacks = [r["attack"] for r in records]
    scored = scored_members(records)
    rows = {a: rows_of(r, scored) for a, r in zip(attacks, records)}
    names = list(rows[attacks[0]])
    table = {name: {a: auroc(torch.tensor(r["truth"]).bool(), torch.tensor(rows[a][name][0]))
                    for a, r in zip(attacks, records)} for name in names}
    lines = [f"AUROC on the screened poisoned training set ({results['setting']})", "",
             "| detector | " + " | ".join(attacks) + " | min | images/s (vs CD-P) |",
             "|---|" + "---|" * (len(attacks) + 2)]
    cd_p_rate = np.mean([r["images"] / r["member_seconds"]["cd-p"] for r in records]) if "cd-p" in scored else None
    for name in names:
        rate = np.mean([r["images"] / seconds_of(name, r) for r in records])
        ratio = f" ({rate / cd_p_rate:.2f}×)" if cd_p_rate else ""
        lines.append(f"| {name} | " + " | ".join(f"{table[name][a]:.3f}" for a in attacks)
                     + f" | {min(table[name].values()):.3f} | {rate:.1f}{ratio} |")
    lines += ["", "Bar: never worse than CD-L by more than 0.02 (worst margin per row, ensemble rows):"]
    for name in names:
        if " / " in name and "cd-l" in table:
            margin = min(table[name][a] - table["cd-l"][a] for a in attacks)
            lines.append(f"- {name}: {margin:+.3f}")
    lines += ["", ("Robust rule without clean data (median + 3.5·1.4826·MAD of the screened scores): FPR on the "
              "screened clean samples, mean [min, max] over attacks; TPR likewise"), "",
              "| detector | FPR | TPR |", "|---|---|---|"]
    for name in names:
        fprs, tprs = [], []
        for a, r in zip(attacks, records):
            truth, scores = np.array(r["truth"], bool), rows[a][name][0]
            flagged = scores > robust_threshold(scores)
            fprs.append(flagged[~truth].mean())
            tprs.append(flagged[truth].mean())
        lines.append(f"| {name} | {np.mean(fprs):.3f} [{min(fprs):.3f}, {max(fprs):.3f}] | "
                     f"{np.mean(tprs):.3f} [{min(tprs):.3f}, {max(tprs):.3f}] |")
    calibrated = [a for a, r in zip(attacks, records) if "test_scores" in r]
    if calibrated:
        g = np.random.default_rng(args.seed)
        lines += ["", (f"Calibrated FPR (target {args.fpr}): threshold at the {1 - args.fpr:g} quantile of a random half "
                  f"of the clean test split, FPR on the other half; mean ± sd over {args.splits} splits "
                  f"({', '.join(calibrated)})"), "", "| detector | " + " | ".join(calibrated) + " |",
                  "|---|" + "---|" * len(calibrated)]
        for name in names:
            cells = []
            for a in calibrated:
                test = rows[a][name][1]
                rates = []
                for _ in range(args.splits):
                    order = g.permutation(len(test))
                    half = len(test) // 2
                    threshold = quantile_threshold(test[order[:half]], args.fpr)
                    rates.append((test[order[half:]] > threshold).mean())
                cells.append(f"{np.mean(rates):.3f} ± {np.std(rates):.3f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def candidate_sets(admissible_only: bool, scored: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Member subsets LOFO chooses among: with ``admissible_only``, those within the throughput bar (at most one CD
    member, CD-P: ≥ 0.8× CD-P alone); else every subset of the scored members."""
    pool = [m for m in scored if m not in ("cd-l", "cd-f")] if admissible_only else list(scored)
    return {"+".join(c): c for r in range(1, len(pool) + 1) for c in itertools.combinations(pool, r)}


IMPLANTED_ASR = 0.9  # a family counts in model selection only if its backdoor implanted (the bar)
CRITERIA = ("mean", "worst case")  # the criterion over the families' AUROCs; ties broken by the other one


def best_by(values: np.ndarray, criterion: str) -> int:
    """The row of ``values`` (settings × families) with the best ``criterion`` (``CRITERIA``), ties broken by the
    other criterion, then by the first row."""
    mean, worst = values.mean(1), values.min(1)
    first, second = (mean, worst) if criterion == "mean" else (worst, mean)
    return int(np.lexsort((-np.arange(len(values)), second, first))[-1])


UNBOUNDED_FUSIONS = tuple(f for f in FUSIONS if f not in RANK_FUSIONS)  # screen's robust rule works on these
# how the default is chosen (the first, with its full table) and the alternatives reported beside it:
# (name, settings within the throughput bar only, fusions, criterion)
PROCEDURES = [
    ("default's procedure: within the throughput bar, fusions that work without clean data, mean", True,
     UNBOUNDED_FUSIONS, "mean"),
    ("within the throughput bar, every fusion, mean", True, FUSIONS, "mean"),
    ("within the throughput bar, every fusion, worst case", True, FUSIONS, "worst case"),
    ("within the throughput bar, fusions that work without clean data, worst case", True, UNBOUNDED_FUSIONS,
     "worst case"),
    ("every member subset, every fusion, mean", False, FUSIONS, "mean"),
]


GATED_MEMBERS = ("typicality", "clustering")  # members leave one family out may take only where they concentrate
# the significance levels it chooses among: one, the SDK's (a level, not a tuned value; the twenty-fourth session's
# class-enrichment gates 2, 3 and 4 let a fold pick 2 and lose colour digits' adaptive blend held out)
MEMBER_GATES = (LABELLED_MEMBER_GATES["typicality"],)
GATED_MARK = re.compile(r"\[p<[\d.e-]+\]")  # "features+typicality[p<0.001]+probe": typicality joins where p < 0.001


def add_gated_rows(records: list[dict], scored: tuple[str, ...], tables: tuple[dict, ...]) -> None:
    """Add to each of ``tables`` (row name → unit → value) the *significance-gated* twin of every multi-member row
    that holds a member of ``GATED_MEMBERS``: per record, the row itself where that member's own robust outliers
    gather in one predicted class (:func:`outlier_significance` below the gate), else the same row without it. An
    all-to-one backdoor's poison is one class's; a member whose outliers spread over the classes is reading
    something else and only adds noise to the fusion."""
    p_value = {(r["unit"], m): record_p_value(r, m) for r in records for m in GATED_MEMBERS if m in scored}
    first = tables[0]
    for name in list(first):
        members, rule = name.split(" / ", 1) if " / " in name else (name, None)
        parts = members.split("+")
        for m in (m for m in GATED_MEMBERS if m in parts and len(parts) > 1 and rule is not None):
            without = f"{'+'.join(p for p in parts if p != m)} / {rule}"
            if without not in first:
                continue
            for gate in MEMBER_GATES:
                gated = f"{'+'.join(p + f'[p<{gate:g}]' if p == m else p for p in parts)} / {rule}"
                for table in tables:
                    table[gated] = {unit: table[name if p_value[unit, m] < gate else without][unit]
                                    for unit in table[name]}


def lofo(results: dict, others: tuple[dict, ...] = (), candidates: tuple[str, ...] = ()) -> str:
    """Leave one family out, by each of ``PROCEDURES``: on the implanted families but the held-out one, choose the
    setting (member subset × fusion rule) by the criterion over their AUROCs (``CRITERIA``: the mean, ties by the
    worst case; or the worst case, ties by the mean); report the held-out family's AUROC with it, and the robust
    rule's FPR / TPR on it (no clean data). Families whose attack did not implant (ASR < ``IMPLANTED_ASR``) are
    reported but never used to choose. ``others``: results files of other settings (a dataset, a poison rate) whose
    records join the pool as ``family @ setting``; holding out a family holds it out in every setting.
    ``candidates``: row names (``"features+probe / zscore + class"``) the procedures choose among instead of every
    setting — a choice between a default and its variants, made the same way."""
    records = [dict(r, unit=r["attack"]) for r in results["attacks"].values()]
    for other in others:
        label = other["setting"].split(", ")[-1]  # what differs: the dataset or the poison rate
        records += [dict(r, unit=f"{r['attack']} @ {label}") for r in other["attacks"].values()]
    attacks = [r["unit"] for r in records]
    family = {r["unit"]: r["attack"] for r in records}
    implanted = [r["unit"] for r in records if r["attack_success_rate"] >= IMPLANTED_ASR]
    if len(implanted) < 2:
        return "Leave one family out: needs results of at least two implanted attacks."
    scored = scored_members(records)
    table: dict[str, dict[str, float]] = {}
    untouched: dict[str, dict[str, float]] = {}  # AUROC against the untouched images (cover samples left out)
    robust: dict[str, dict[str, tuple[float, float]]] = {}
    for r in records:
        truth = torch.tensor(r["truth"]).bool()
        kept = ~torch.tensor(r["cover"]).bool() if "cover" in r else torch.ones_like(truth)
        reference = torch.tensor([r["scores"][m] for m in scored], dtype=torch.float64).T
        for set_name, members in candidate_sets(False, scored).items():
            columns = [scored.index(m) for m in members]
            for fusion in FUSIONS if len(members) > 1 else ("zscore",):
                for rule, (fused, _) in fused_rows(reference[:, columns], None, fusion, r).items():
                    name = f"{set_name} / {rule}"
                    table.setdefault(name, {})[r["unit"]] = auroc(truth, torch.from_numpy(fused))
                    untouched.setdefault(name, {})[r["unit"]] = auroc(truth[kept], torch.from_numpy(fused)[kept])
                    flagged = fused > robust_threshold(fused)
                    robust.setdefault(name, {})[r["unit"]] = (flagged[~truth.numpy()].mean(),
                                                              flagged[truth.numpy()].mean())
    add_gated_rows(records, scored, (table, untouched, robust))
    lines = []
    for k, (title, admissible, fusions, criterion) in enumerate(PROCEDURES):
        pool = candidate_sets(admissible, scored)
        members_of = lambda n: GATED_MARK.sub("", n.split(" / ")[0])
        fusion_of = lambda n: n.split(" / ")[1].split(STABLE)[0].removesuffix(CONCENTRATED)
        settings = [n for n in table if members_of(n) in pool and (fusion_of(n) in fusions or "+" not in members_of(n))]
        if candidates:
            unknown = [c for c in candidates if c not in table]
            if unknown:
                raise SystemExit(f"--lofo-candidates: no such setting {unknown[0]!r} (a row name of the table)")
            settings = list(candidates)
        grid = np.array([[table[n][a] for a in attacks] for n in settings])  # settings × units, for speed
        rows, held_out, held_untouched = [], [], []
        for held in attacks:
            others = [a for a in implanted if family[a] != family[held]]
            chosen = settings[best_by(grid[:, [attacks.index(a) for a in others]], criterion)]
            best = max(settings, key=lambda n: table[n][held])
            record = records[attacks.index(held)]
            cd_l = (f"{auroc(torch.tensor(record['truth']).bool(), torch.tensor(record['scores']['cd-l'])):.3f}"
                    if "cd-l" in scored else "not scored")
            fpr, tpr = robust[chosen][held]
            mark = "" if held in implanted else " (not implanted)"
            rows.append(f"| {held}{mark} | {chosen} | {table[chosen][held]:.3f} | {untouched[chosen][held]:.3f} | "
                        f"{fpr:.3f} / {tpr:.3f} | {best} ({table[best][held]:.3f}) | {cd_l} |")
            if held in implanted:
                held_out.append(table[chosen][held])
                held_untouched.append(untouched[chosen][held])
        overall = settings[best_by(grid[:, [attacks.index(a) for a in implanted]], criterion)]
        summary = (f"held out: ≥ 0.95 on {sum(v >= 0.95 for v in held_out)} of {len(held_out)} implanted "
                   f"{'families' if not others else 'family settings'}, "
                   f"≥ 0.9 on {sum(v >= 0.9 for v in held_out)}, mean {np.mean(held_out):.3f}, min "
                   f"{min(held_out):.3f} (against the untouched images alone: ≥ 0.95 on "
                   f"{sum(v >= 0.95 for v in held_untouched)}, mean {np.mean(held_untouched):.3f}); chosen on every "
                   f"implanted family: {overall}")
        if k == 0:
            given = {m: {bool(r.get("labels_given", {}).get(m, False)) for r in records} for m in scored}
            regime = ", ".join(f"{m} {'yes' if v == {True} else 'no' if v == {False} else 'mixed'}"
                               for m, v in given.items() if m not in CD_MODES)
            lines += [(f"Leave one family out, {title} ({len(settings)} settings); fitted with the screened set's "
                       f"labels: {regime}:"), "",
                      ("| held out | chosen | AUROC held out | vs untouched | robust rule FPR / TPR | best setting on "
                       "it | CD-L on it |"), "|---|---|---|---|---|---|---|", *rows, "", summary[0].upper() + summary[1:] + ": "
                      + ", ".join(f"{a} {table[overall][a]:.3f}" for a in attacks), "", "Other procedures:", ""]
        else:
            lines.append(f"- {title} ({len(settings)} settings): {summary}")
    return "\n".join(lines)


SPREAD_ROWS = {"cd-p": ("cd-p",), "features": ("features",), "spectral": ("spectral",),
               "clustering": ("clustering",), "default": DEFAULT_MEMBERS}


def spread(files: list[dict]) -> str:
    """Per implanted family, min–max AUROC over ``files`` (the same zoo models on other screened draws) of each
    member and of the default ensemble (``zscore + class``, and the stable class at ``STABLE_GATE`` where the record
    keeps fragility); then each file's leave-one-family-out summary."""
    table: dict[str, dict[str, list[float]]] = {}
    for results in files:
        for attack, record in results["attacks"].items():
            if record["attack_success_rate"] < IMPLANTED_ASR:
                continue
            truth = torch.tensor(record["truth"]).bool()
            for name, members in SPREAD_ROWS.items():
                reference = torch.tensor([record["scores"][m] for m in members], dtype=torch.float64).T
                if len(members) == 1:
                    fused = reference[:, 0]
                else:  # the default's fusion, concentrated as the default is (when the record has the classes)
                    rows = fused_rows(reference, None, "zscore", record)
                    default = "zscore" + CONCENTRATED if "zscore" + CONCENTRATED in rows else "zscore"
                    fused = torch.from_numpy(rows.get(f"{default}{STABLE}{STABLE_GATE:g}", rows[default])[0])
                table.setdefault(name, {}).setdefault(attack, []).append(auroc(truth, fused))
    attacks = list(table["default"])
    lines = [f"AUROC min–max over {len(files)} screened draws", "", "| detector | " + " | ".join(attacks) + " |",
             "|---|" + "---|" * len(attacks)]
    lines += [f"| {name} | " + " | ".join(f"{min(row[a]):.2f}–{max(row[a]):.2f}" for a in attacks) + " |"
              for name, row in table.items()]
    lines += ["", "Per draw: the default's families ≥ 0.95 (in sample), then leave one family out (default's procedure)"]
    for k, results in enumerate(files):
        values = [table["default"][a][k] for a in attacks]
        held = next(line for line in lofo(results).splitlines() if line.startswith("Held out"))
        lines.append(f"- {results['setting']}: in sample ≥ 0.95 on {sum(v >= 0.95 for v in values)} of {len(values)}, "
                     f"mean {np.mean(values):.3f}; {held.split(': chosen')[0]}")
    return "\n".join(lines)


def variants(attacks: list[str]) -> str:
    """AUROC of the new members' options, each fitted on the whole poisoned training set (one shared feature pass)."""
    from trojanguard.detect import ActivationClustering, FeatureMahalanobis, SpectralSignature

    settings = {"features": lambda m: FeatureMahalanobis(m, show_progress=False)}
    for scale in ("none", "median"):
        settings[f"spectral {scale}"] = lambda m, s=scale: SpectralSignature(m, scale=s, show_progress=False)
    for reduction, score in itertools.product(("pca", "ica"), ("size", "distance")):
        settings[f"AC {reduction}·{score}"] = lambda m, r=reduction, c=score: ActivationClustering(
            m, reduction=r, score=c, show_progress=False)
    lines = ["| attack | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for attack in attacks:
        entry = get_backdoored_model(ZooConfig(attack=attack), show_progress=False)
        lead = settings["features"](entry.model)
        features = lead.extract_features(entry.train.dataset.x)
        cells = []
        for build in settings.values():
            detector = build(entry.model).fit_features(features)
            scores = detector.as_module().head(features.logits, features.features.float())
            cells.append(f"{auroc(entry.train.is_poisoned, scores):.3f}")
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", nargs="+", default=sorted(ATTACKS), choices=sorted(ATTACKS))
    parser.add_argument("--fraction", type=float, default=0.2, help="stratified fraction of the training set")
    parser.add_argument("--clean", type=int, default=0, help="every poisoned sample + this many clean (0: --fraction)")
    parser.add_argument("--steps", type=int, default=100, help="CD steps")
    parser.add_argument("--poison-rate", type=float, default=None,
                        help="poison rate, a fraction of the training set (default: the zoo's)")
    parser.add_argument("--dataset", default="digits", choices=ZOO_DATASETS, help="the zoo's training data")
    parser.add_argument("--arch", default="small_cnn", help="the zoo model's architecture (resnet18_cifar: 16 px)")
    parser.add_argument("--image-size", type=int, default=ZooConfig.image_size, help="digits upscaled to this side")
    parser.add_argument("--members", default=",".join(MEMBERS), type=parse_members,
                        help="comma-separated ensemble members to score (default: all)")
    parser.add_argument("--fpr-attacks", nargs="*", default=["badnets"], help="attacks whose test split is scored")
    parser.add_argument("--fpr", type=float, default=0.05)
    parser.add_argument("--splits", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="the screened draw's and the members' seed")
    parser.add_argument("--zoo-seed", type=int, default=0,
                        help="the zoo models' training seed (another poisoned set and model; the zoo's is 0)")
    parser.add_argument("--out", type=Path, default=Path("detect_families.json"))
    parser.add_argument("--lofo", action="store_true", help="only report from the results file")
    parser.add_argument("--lofo-with", nargs="*", type=Path, default=[],
                        help="results files of other settings that join leave-one-family-out (with --lofo)")
    parser.add_argument("--lofo-candidates", nargs="+", default=(),
                        help="with --lofo: choose only among these settings (row names, e.g. 'features+probe / "
                             "zscore + class')")
    parser.add_argument("--rescore", type=parse_members, default=None,
                        help="refit these feature members on the results file's screened sets (CD scores kept)")
    parser.add_argument("--labels", action="store_true",
                        help="give Ensemble.fit the screened set's training labels (run and --rescore): the label "
                        "probe reads them, the feature members fit per label (the record keeps labels_given)")
    parser.add_argument("--no-fragility", action="store_true",
                        help="report every row without the noise-fragile and noise-stable classes (Ensemble's "
                             "fragility='none')")
    parser.add_argument("--annotate", action="store_true",
                        help="add predicted classes and cover marks to the results file's records (nothing rescored)")
    parser.add_argument("--variants", action="store_true", help="only the options of spectral and clustering")
    parser.add_argument("--spread", nargs="+", type=Path, default=None,
                        help="only report the spread over these results files (other screened draws, --seed)")
    args = parser.parse_args()
    global WITH_FRAGILITY
    WITH_FRAGILITY = not args.no_fragility
    if args.spread:
        print(spread([json.loads(p.read_text()) for p in args.spread]))
        return
    if args.variants:
        print(variants(args.attacks))
        return
    setting = (f"{'clean ' + str(args.clean) if args.clean else 'fraction ' + str(args.fraction)}, steps {args.steps}, "
               f"seed {args.seed}" + ("" if args.poison_rate is None else f", poison rate {args.poison_rate:g}")
               + ("" if args.dataset == "digits" else f", {args.dataset}")
               + ("" if args.arch == "small_cnn" else f", {args.arch} at {args.image_size} px")
               + ("" if args.zoo_seed == 0 else f", zoo seed {args.zoo_seed}"))
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if results.get("setting") != setting:
        results = {"setting": setting, "machine": f"{platform.processor() or platform.machine()}, torch "
                   f"{torch.__version__}, {torch.get_num_threads()} threads", "attacks": {}}
    if args.annotate:
        for attack, record in results["attacks"].items():
            annotate(record, args)
            args.out.write_text(json.dumps(results))
            print(f"{attack}: annotated", flush=True)
    elif args.rescore:
        for attack, record in results["attacks"].items():
            rescore(record, args.rescore, args)
            args.out.write_text(json.dumps(results))
            print(f"{attack}: rescored {', '.join(args.rescore)}", flush=True)
    elif not args.lofo:
        for attack in args.attacks:
            if attack in results["attacks"] and ("test_scores" in results["attacks"][attack]
                                                 or attack not in args.fpr_attacks):
                continue
            results["attacks"][attack] = run_attack(attack, args)
            args.out.write_text(json.dumps(results))
            print(f"{attack}: done in {results['attacks'][attack]['seconds']:.0f} s", flush=True)
    print(report(results, args))
    print()
    print(lofo(results, tuple(json.loads(p.read_text()) for p in args.lofo_with), tuple(args.lofo_candidates)))


if __name__ == "__main__":
    main()
