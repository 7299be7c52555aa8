"""An ensemble of detectors whose scores are combined without labels.

Members (:data:`MEMBERS`): Cognitive Distillation in its three modes (``cd-p``, ``cd-l``, ``cd-f``), the robust
feature Mahalanobis distance (``features``), Spectral Signatures (``spectral``) and Activation Clustering
(``clustering``), the class-agnostic distance at a middle layer (``typicality``) and the label probe (``probe``: how
readily a strongly regularised linear read-out of the middle layer predicts an image's label; ``probe-shallow``: the
same read-out at a quarter of the network's depth, where a trigger that acts only with some source classes is still a
plain pattern; the probes are the members that read the labels given to :meth:`Ensemble.fit`). The three feature
members read one layer and share one forward pass (fit and score); ``typicality`` and ``probe`` read the middle layer
— in that same pass when fitting beside ``features`` (whose typicality prefilter reads it too), in a pass of their
own otherwise and when scoring new images (one pass for both: members reading one layer share it), ``probe-shallow``
its own; each CD member is its own optimisation (~``steps`` × forward + input gradient per image), so CD dominates
the cost.

Fit (:meth:`Ensemble.fit`), on the screened set itself (or trusted reference data): the fitted members are fitted
on it, and every member scores it. Those *reference scores* fix how members' scores are combined, by ``fusion``
(:data:`FUSIONS`):

- ``"zscore"`` (default): the mean of the members' robust z-scores ``(s_m − median_m) / (1.4826 · MAD_m)`` over the
  reference set. It keeps how far out a sample lies, so ``screen``'s outlier rule without clean data
  (``robust_z``) works on it; ranks are bounded, and that rule flags nothing on rank-fused scores.
- the rank fusions (:data:`RANK_FUSIONS`) combine the members' empirical CDFs ``F_m(s_m)`` — where a score falls
  in the member's distribution over the reference set: ``"rank"``, the mean of ``F_m`` (on the reference set
  itself the mean normalised mid-rank, Borda count); ``"probit"``, the mean of ``Φ⁻¹(F_m)`` (Stouffer), which weighs
  a member that puts a sample in its extreme tail more; ``"max"``, the largest ``F_m``; ``"select"``, per dataset
  the one member whose reference scores are the most bimodal (Sarle's coefficient), its ``F_m``.

Class concentration (``concentration``, :data:`CONCENTRATIONS`). An all-to-one backdoor sends its poison to one
class, while the images an attack alters but leaves with their true labels (WaNet's noise mode, the adaptive attacks'
cover samples; :attr:`~trojanguard.attacks.PoisonedDataset.cover_indices`) and natural outliers spread over the
classes as the data does. With ``"class"`` (default) the fit counts, per predicted class, the fit data's outliers by
the robust rule on the fused scores (``median + 3.5 σ̂``, :func:`~trojanguard.thresholds.robust_threshold`) and
takes the class's *enrichment* ``(outliers in it + 1) / (share of outliers · images in it + 1)``
(:func:`concentration_of`; 1 when the outliers spread as the classes do, and for every class when there are none);
a score above that threshold then has its excess over it multiplied by its predicted class's enrichment
(:func:`concentrate`). What the robust rule flags does not change, nor the order within a class: only the order of
the outliers across classes — the class that holds them first, above equally atypical images of the others.
(Measured alternative, not taken: the excess over the median, which ranks better but puts the target class's
clean tail over the robust rule, doubling its false positives; ``benchmarks/RESULTS.md``.) ``"none"``: the fused
score alone. Bounded (rank) fusions flag nothing by the robust rule, so they are left as they are.

The noise-fragile class (``fragility``, :data:`FRAGILITY_RULES`). A trigger the model reads precisely (WaNet's warp)
is erased by pixel noise far below the images' contrast, so its poison fall back to their source class where no clean
image notices; the feature members rank such poison below the attacker's cover samples. With ``"class"`` (default)
the fit also scores every image's :class:`~trojanguard.detect.NoiseFragility` (``draws`` more forward passes each)
and asks :func:`~trojanguard.detect.fragility.fragile_class` whether the set's most fragile images gather in one
predicted class (a majority of the most fragile 15 %, beyond chance) and the members' own outliers do not shun that
class for another (:func:`~trojanguard.detect.fragility.outliers_gather_elsewhere`, at the same level: where they
avoid it and gather in another class, its fragile images are hard clean images, as when a noise-like trigger makes
noise evoke the target; ``fragile_vetoed``); only if one does,
the fused scores are re-placed so that class's fragile images rise
(:func:`~trojanguard.detect.fragility.place_by_fragility`: the fused and the fragility ranks added within that class,
mapped back onto the fit data's fused values). The mirror, the noise-stable
class (:func:`~trojanguard.detect.fragility.stable_class`): most triggers make their poison *more* stable than clean
images, so the same test on the negated fragility finds the class where the most stable images gather; it fires only
where class concentration's enrichment of that class is at most 2 (concentration has not already raised it), and then
that class's stable images are raised the same way. Where neither fires the scores are exactly those without them.
``"none"``: no fragility pass. (Ours; the gate chosen leave one family out; ``benchmarks/RESULTS.md``, "Noise
fragility".)

Gated members (``member_gates``). A member whose robust outliers on the fit data spread over the classes as the data
does is not reading an all-to-one backdoor (whose poison is one class's) and adds only its noise to the fusion; a
gated member joins only where its outliers gather — one predicted class holds more of its own robust outliers than
its share of the fit data explains, at one-sided hypergeometric p below the member's gate
(:func:`outlier_significance`) — and the fit leaves it out otherwise (``gated_out``, ``member_p_values``). With labels
the default gates ``typicality`` at the fragility class test's level, ``ALPHA`` = 10⁻³ (ours; a significance level,
so no threshold is tuned; ``benchmarks/RESULTS.md``, "Gated typicality"): it finds SIG, whose clean-label poison the
probe cannot read, and stays out on colour digits, where its outliers spread and it would cost the adaptive attacks
0.05–0.10. (The twenty-fourth session's gate, class enrichment ≥ 3, was chosen leave one family out among 2, 3 and
4; held out the significance gate does better, and it has no value to choose.)

Both defaults also have ``probe-shallow`` (with labels it reads them, without them the model's predictions): leave
one family out over twelve families, choosing between each default with and without it, picks it in every fold of
four screened draws (a source-specific trigger's poison are one plain pattern at a quarter of the depth, a
conjunction with their source class deeper on; ``benchmarks/RESULTS.md``, "The shallow label probe"). A label probe
fitted without labels needs two predicted classes: where the model predicts one class for every fit image it is left
out of that fit (``gated_out``, with a warning) rather than failing it.

The probe filter (``probe_filter``). ``features`` fits each predicted class on the images the typicality prefilter
calls typical; that is right where the poison stand out from the whole set, and wrong where a trigger is common —
a source-specific backdoor whose triggered images also appear, correctly labelled, in other classes (covers): there
the prefilter keeps the target class's poison and drops its own images, the class is fitted on its poison, and
``features`` ranks the class inverted (the ensemble's worst held-out family). With ``"auto"`` (default) the class fits
also leave out each class's easier half by the shallow label probe's out-of-fold scores
(:func:`~trojanguard.detect.label_probe.easier_half`) — a dirty-label trigger's poison are what a label probe finds
easiest, and half is the most of a class the poison of a 10 % attack take — so the class is fitted on its own images
whichever half the prefilter keeps. Scoring is unchanged (the fitted means and covariance). Ours; chosen leave one
family out against the same default without it (``benchmarks/RESULTS.md``, "The probe filter").

The default members, fusion and concentration were chosen leave-one-family-out on the fifteen-family zoo (``benchmarks/
detect_families.py --lofo``; the held-out table is in ``benchmarks/RESULTS.md``). The members weigh equally: clipped,
top-k, significance- or correlation-weighted means and heavier probes were measured and do no better held out
(``benchmarks/fusion_weights.py``).

Why a common scale. Members' raw scores have unrelated scales (a mask fraction, a Mahalanobis distance, a squared
projection, a cluster's size); robust z-scores and ranks are label-free common scales. Both are fixed once the
ensemble is fitted (not taken inside each scored batch), so the fused score is a function of the sample alone:
batch-independent, resumable, and meaningful to calibrate — ``calibrate(clean_x, fpr)`` puts the threshold at the
``1 − fpr`` quantile of clean reference images' fused scores (:mod:`trojanguard.thresholds`), which is then held on
other clean images like every detector's. Beyond the reference range a rank maps towards 0 or 1.

Scoring the fit data again costs nothing: fit keeps each image's scores under its content digest, and
:meth:`Ensemble.score` reuses them (so ``fit(x)`` then ``score(x)`` runs CD once per image, and ``screen`` fitting
on the screened set does not distil it twice). Other images are scored by every member.

A fit is long (CD on every image), so it can be made resumable: ``fit(data, checkpoint=path)`` appends the CD
members' scores to ``path`` as they are computed (:class:`FitCheckpoint`), and a fit killed part-way and started
again with the same file distils only the images it does not hold. ``screen`` keeps that file in its output folder.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trojanguard.data.batching import iter_image_batches
from trojanguard.detect._feature_detector import SHALLOW_LAYER, Features, image_digests
from trojanguard.detect.base import Detector, SampleSizeWarning
from trojanguard.detect.fragility import (
    ALPHA,
    STABLE_GATE,
    NoiseFragility,
    fragile_class,
    outliers_gather_elsewhere,
    place_by_fragility,
    stable_class,
)
from trojanguard.detect.label_probe import easier_half
from trojanguard.errors import DataError, check_choice, check_positive_int
from trojanguard.models.adapters import Classifier, as_classifier
from trojanguard.models.features import FeatureTap, model_device, working_copy
from trojanguard.progress import progress_bar

CD_MODES = {"cd-p": "probabilities", "cd-l": "logits", "cd-f": "features"}
FEATURE_MEMBERS = ("features", "spectral", "clustering")  # read one layer: one shared forward pass
OWN_PASS_MEMBERS = ("typicality", "probe", "probe-shallow")  # read another layer: a scorer module of their own
PROBE_MEMBERS = ("probe", "probe-shallow")  # the label probes: each can filter features' class fits (probe_filter)
MEMBERS = (*CD_MODES, *FEATURE_MEMBERS, *OWN_PASS_MEMBERS)
DEFAULT_MEMBERS = ("features", "clustering", "typicality", "probe-shallow")  # chosen leave one family out (RESULTS.md)
LABELLED_MEMBERS = ("features", "typicality", "probe", "probe-shallow")  # the same, where the fit is given the labels
LABELLED_MEMBER_GATES = {"typicality": ALPHA}  # ... of which typicality joins only where its outliers gather in a class
AUTO = "auto"  # members / stable_gate / member_gates chosen at fit: the LABELLED_ ones with labels, else the above
FUSIONS = ("rank", "probit", "max", "select", "zscore")
RANK_FUSIONS = ("rank", "probit", "max", "select")  # functions of the members' ranks only
CONCENTRATIONS = ("class", "none")  # module docstring; "class" chosen leave-one-family-out (benchmarks/RESULTS.md)
FRAGILITY_RULES = ("class", "none")  # module docstring; "class" by principle: it changes nothing where it does not fire
MIN_REFERENCE = 4  # the bimodality coefficient needs n > 3; fewer reference images rank nothing
CHECKPOINT_MAGIC = "# trojanguard-ensemble-fit "  # first line of a FitCheckpoint file


def _build_member(name: str, model: nn.Module, options: dict, show_progress: bool) -> Detector:
    if name in CD_MODES:  # its images are counted by the ensemble's own bar (Ensemble._score_cd)
        from trojanguard.detect.cognitive_distillation import CognitiveDistillation

        return CognitiveDistillation(model, mode=CD_MODES[name], **{"show_progress": False, **options})
    if name == "features":
        from trojanguard.detect.feature_mahalanobis import FeatureMahalanobis as cls
    elif name == "spectral":
        from trojanguard.detect.spectral import SpectralSignature as cls
    elif name == "typicality":
        from trojanguard.detect.typicality import Typicality as cls
    elif name in ("probe", "probe-shallow"):
        from trojanguard.detect.label_probe import LabelProbe as cls

        if name == "probe-shallow":
            options = {"layer": SHALLOW_LAYER, **options}
    else:
        from trojanguard.detect.activation_clustering import ActivationClustering as cls
    return cls(model, **{"show_progress": show_progress, **options})


def parse_members(members: str | Sequence[str]) -> tuple[str, ...]:
    """Member names from a sequence or a comma-separated string, checked: unknown, repeated or none is an error."""
    names = [m.strip() for m in members.split(",")] if isinstance(members, str) else list(members)
    names = [m for m in names if m]
    if not names:
        raise ValueError(f"members: expected at least one of {', '.join(MEMBERS)}, got none")
    for name in names:
        if not isinstance(name, str) or name not in MEMBERS:
            raise ValueError(f"members: unknown member {name!r}; expected names from {', '.join(MEMBERS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"members: expected each member once, got {names}")
    return tuple(names)


class Ensemble(Detector):
    """Several detectors' scores fused without labels (module docstring): fit on the screened data, then score.

    Args:
        model: any ``nn.Module`` classifier taking ``(N, C, H, W)`` in [0, 1] and returning ``(N, K)`` logits;
            never modified.
        members: names from :data:`MEMBERS` (a sequence, or a comma-separated string), or ``"auto"`` (default):
            :data:`LABELLED_MEMBERS` when :meth:`fit` is given the images' labels, else :data:`DEFAULT_MEMBERS` (each
            chosen leave one family out in its regime; ``members`` holds the choice after the fit).
        fusion: how members' scores are combined, one of :data:`FUSIONS` (module docstring).
        concentration: ``"class"`` (default) raises the fused tail of the predicted class that holds the fit data's
            outliers, ``"none"`` leaves the fused score as it is (:data:`CONCENTRATIONS`, module docstring).
        fragility: ``"class"`` (default) raises the noise-fragile images of a class where the fit data's fragile
            images gather, if one does; ``"none"`` skips the fragility pass (:data:`FRAGILITY_RULES`, module
            docstring).
        stable_gate: the largest enrichment of its class at which the noise-stable class still fires (module
            docstring); None: it never does. ``"auto"`` (default): none where the label probe reads labels (leave one
            family out drops the stable class beside it), else :data:`~trojanguard.detect.fragility.STABLE_GATE`.
        member_gates: ``{member: gate}``, ``gate`` a significance level in (0, 1]: such a member joins the fusion
            only where its own robust outliers on the fit data gather in one predicted class at one-sided
            hypergeometric p < ``gate`` (:func:`outlier_significance`); else the fit leaves it out (module docstring,
            "Gated members"). ``"auto"`` (default): :data:`LABELLED_MEMBER_GATES` where the label probe reads
            labels, else none. None or ``{}``: every member joins.
        probe_filter: a label probe (:data:`PROBE_MEMBERS`) whose easier half of each predicted class the
            ``features`` member's class fits leave out (:func:`~trojanguard.detect.label_probe.easier_half`; module
            docstring, "The probe filter"); ``"auto"`` (default): ``probe-shallow`` where it and ``features`` are
            members; None: the class fits see every image the typicality prefilter keeps.
        layer: the layer the feature members read (one shared forward pass); default: the last 4-D output before
            global pooling.
        steps: optimisation steps of the CD members.
        member_options: ``{member name: {option: value}}`` passed to that member's constructor.
        batch_size: images per batch (members' forward passes and CD's optimisation).
        seed: every member's seed.
        show_progress: progress bars.

    After :meth:`fit`: ``reference_scores`` (n, M) raw member scores of the fit data (columns in ``members``
    order), ``member_seconds`` {name: seconds} spent fitting and scoring it (the feature members share
    ``"feature pass"``), ``bimodality`` {name: coefficient}, ``selected`` (the member ``"select"`` uses),
    ``reference_predicted`` (n,) the model's classes of the fit data, ``class_factors`` (K,) each class's enrichment
    among the fit data's outliers under ``fusion`` (all 1 with ``concentration="none"``), ``member_p_values``
    {gated member: :func:`outlier_significance`'s p-value} and ``gated_out`` (the gated members the fit left out;
    ``members`` holds those that joined); with ``fragility="class"``,
    ``reference_fragility`` (n,), ``fragile`` and ``stable``, each ``(class or None, share, p-value)`` of
    :func:`~trojanguard.detect.fragility.fragile_class` and :func:`~trojanguard.detect.fragility.stable_class`, and
    ``fragile_vetoed`` (the class the fragile test fired on where the fused outliers shun it for another, else None).
    """

    model_kind = Classifier

    def __init__(self, model: nn.Module, *, members: str | Sequence[str] = AUTO, fusion: str = "zscore",
                 concentration: str = "class", fragility: str = "class", stable_gate: float | str | None = AUTO,
                 member_gates: dict[str, float] | str | None = AUTO, probe_filter: str | None = AUTO,
                 layer: str | None = None, steps: int = 100,
                 member_options: dict | None = None, batch_size: int = 256, seed: int = 0, show_progress: bool = True):
        model = as_classifier(model).module
        self.auto_members = isinstance(members, str) and members.strip() == AUTO
        self.members = DEFAULT_MEMBERS if self.auto_members else parse_members(members)
        self._chosen_members = self.members
        if not (stable_gate is None or stable_gate == AUTO or (
                isinstance(stable_gate, (int, float)) and not isinstance(stable_gate, bool) and stable_gate >= 0)):
            raise ValueError(f"stable_gate: expected a number ≥ 0, None or 'auto', got {stable_gate!r}")
        self.stable_gate = stable_gate
        candidates = tuple(dict.fromkeys((*DEFAULT_MEMBERS, *LABELLED_MEMBERS))) if self.auto_members else self.members
        check_choice("fusion", fusion, FUSIONS)
        check_choice("concentration", concentration, CONCENTRATIONS)
        check_choice("fragility", fragility, FRAGILITY_RULES)
        check_positive_int("steps", steps)
        check_positive_int("batch_size", batch_size)
        member_options = dict(member_options or {})
        for name in member_options:
            if name not in candidates:
                raise ValueError(f"member_options: {name!r} is not a member; members: {', '.join(candidates)}")
        self.member_gates = check_member_gates(member_gates, candidates)
        if probe_filter not in (None, AUTO, *PROBE_MEMBERS):
            raise ValueError(f"probe_filter: expected one of {', '.join(PROBE_MEMBERS)}, None or 'auto', got "
                             f"{probe_filter!r}")
        if probe_filter in PROBE_MEMBERS and not {"features", probe_filter} <= set(candidates):
            raise ValueError(f"probe_filter: {probe_filter!r} filters the 'features' member's class fits, so both "
                             f"must be members; members: {', '.join(candidates)}")
        self.probe_filter = probe_filter
        self.model, self.fusion, self.concentration, self.layer, self.steps = model, fusion, concentration, layer, steps
        self.member_options, self.batch_size, self.seed = member_options, batch_size, seed
        self.fragility, self.show_progress = fragility, show_progress
        self.detectors: dict[str, Detector] = {}
        for name in candidates:
            options = {"batch_size": batch_size, "seed": seed, **member_options.get(name, {})}
            if name in CD_MODES:
                options = {"steps": steps, **options}
                if name == "cd-f" and layer is not None:
                    options = {"layer": layer, **options}
            elif name in FEATURE_MEMBERS:
                options = {"layer": layer, **options}
            self.detectors[name] = _build_member(name, model, options, show_progress)
        layers = {self.detectors[n].layer for n in candidates if n in FEATURE_MEMBERS}
        if len(layers) > 1:
            raise ValueError(f"member_options: the feature members share one forward pass, so they need one layer; "
                             f"got {sorted(map(str, layers))}")
        self.reference_scores: torch.Tensor | None = None
        self.member_seconds: dict[str, float] = {}
        self.bimodality: dict[str, float] = {}
        self.selected: str | None = None
        self.reference_predicted: torch.Tensor | None = None
        self.input_shape: tuple[int, ...] | None = None
        self._sorted: torch.Tensor | None = None  # (M, n) each member's reference scores, sorted
        self._memo: dict[bytes, int] = {}
        self._heads: _SharedFeatures | None = None
        self._own_pass: dict[str, nn.Module] = {}  # each own-pass member's scorer module, built by fit
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # per fusion: _concentration_of
        self._net: nn.Module | None = None  # a frozen copy of the model, for classes when no member pass gives them
        self._num_classes = 0
        self._fragility_detector: NoiseFragility | None = None
        self.reference_fragility: torch.Tensor | None = None
        self.fragile: tuple[int | None, float, float] = (None, 0.0, 1.0)
        self.stable: tuple[int | None, float, float] = (None, 0.0, 1.0)
        self._steps: tuple[tuple, list] | None = None  # _placement_steps' cache: (fired classes, steps)
        self._probe_reads_labels = False  # whether the last fit gave the label probe labels (fitted_stable_gate)
        self._probe_filter: str | None = None  # the probe filter the last fit applied (fitted_probe_filter)
        self.member_p_values: dict[str, float] = {}
        self.gated_out: tuple[str, ...] = ()
        self.fragile_vetoed: int | None = None  # the fragile class a fit dropped: the fused outliers gather elsewhere

    def __repr__(self) -> str:
        keys = ("members", "fusion", "concentration", "fragility", "stable_gate", "member_gates", "probe_filter",
                "layer", "steps", "member_options", "batch_size", "seed")
        shown = {k: getattr(self, k) for k in keys}
        if self.auto_members and not self.fitted:
            shown["members"] = AUTO
        return f"Ensemble({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @property
    def fitted(self) -> bool:
        return self.reference_scores is not None

    @property
    def probe_read_labels(self) -> bool:
        """Whether the (last) fit gave the label probe the images' labels."""
        return self._probe_reads_labels

    @property
    def fitted_stable_gate(self) -> float | None:
        """The noise-stable class's gate of the (last) fit: ``stable_gate`` resolved (``"auto"``: None where the label
        probe reads labels, else :data:`~trojanguard.detect.fragility.STABLE_GATE`)."""
        if self.stable_gate != AUTO:
            return self.stable_gate
        return None if self._probe_reads_labels else STABLE_GATE

    @property
    def fitted_member_gates(self) -> dict[str, float]:
        """The member gates of the (last) fit: ``member_gates`` resolved (``"auto"``: :data:`LABELLED_MEMBER_GATES`
        where the label probe reads labels, else none), for the members fitted."""
        gates = (LABELLED_MEMBER_GATES if self._probe_reads_labels else {}) if self.member_gates == AUTO \
            else self.member_gates
        return {name: gate for name, gate in gates.items() if name in self.members or name in self.gated_out}

    @property
    def fitted_probe_filter(self) -> str | None:
        """The label probe whose easier half of each class the (last) fit left out of ``features``' class fits:
        ``probe_filter`` resolved (``"auto"``: ``probe-shallow`` where it and ``features`` are members), None where
        there was none or the probe stepped aside."""
        return self._probe_filter

    @property
    def feature_members(self) -> tuple[str, ...]:
        return tuple(n for n in self.members if n in FEATURE_MEMBERS)

    @property
    def own_pass_members(self) -> tuple[str, ...]:
        return tuple(n for n in self.members if n in OWN_PASS_MEMBERS)

    @property
    def cd_members(self) -> tuple[str, ...]:
        return tuple(n for n in self.members if n in CD_MODES)

    # ------------------------------------------------------------------------------------------ public API
    def fit(self, data, labels: torch.Tensor | Callable[[], torch.Tensor | None] | None = None, *,
            checkpoint: str | Path | None = None) -> Ensemble:
        """Fit the fitted members on ``data`` (tensor, ImageDataset, Dataset, DataLoader of images in [0, 1]) —
        the screened set itself, or trusted reference data — and score it with every member. ``labels`` (N,): the
        images' training labels if known; they choose the ``"auto"`` members and are read by the label probe
        (``probe``) alone: the other members fit per predicted class, the model's view of the data, as the defaults
        were chosen (fitting ``features`` per label instead lost colour digits' adaptive blend, 0.96 → 0.90;
        ``benchmarks/RESULTS.md``). ``labels`` may also be a function that gives them after the fit's first pass
        over ``data`` (a streamed source whose unreadable images are known only once read); a function counts as
        labels given when the ``"auto"`` members are chosen. ``checkpoint``: a file the CD members' scores are
        appended to as they are computed; a fit given the same file again distils only the images it does not hold
        (:class:`FitCheckpoint`). Returns ``self``."""
        import time

        self.members = (LABELLED_MEMBERS if labels is not None else DEFAULT_MEMBERS) if self.auto_members \
            else self._chosen_members  # a refit starts from every member again (gates may have left some out)
        self._probe_reads_labels = labels is not None and any(self.detectors[n].READS_LABELS for n in self.members)
        self._probe_filter = None  # set once the probes are fitted (fitted_probe_filter)

        columns: dict[str, torch.Tensor] = {}
        self.member_seconds = {}
        started = time.perf_counter()
        shared = None  # the shared pass's Features
        logits = None  # (n, K) the model's logits of the fit data, from the first pass that gives them
        if self.feature_members:
            lead = self.detectors[self.feature_members[0]]
            # the one feature member with a prefilter (FeatureMahalanobis) names the extra layer of the shared pass
            typical_layer = next((self.detectors[n].typical_layer for n in self.feature_members
                                  if self.detectors[n].typical_layer is not None), None)
            shared = lead.extract_features(data, "ensemble features", digests=True, typical_layer=typical_layer)
            digests, shape = shared.digests, shared.shape
            self.layer, logits = shared.layer, shared.logits
        else:
            digests, shape, parts = [], None, []
            for xb, _ in iter_image_batches(data, self.batch_size):
                digests.extend(image_digests(xb))
                shape = shape or tuple(xb.shape[1:])
                if not self.own_pass_members:
                    parts.append(self._logits(xb))
            logits = torch.cat(parts) if parts else None
        self.member_seconds["feature pass"] = time.perf_counter() - started
        if callable(labels):  # after the first pass: only the own-pass label probe reads them
            labels = labels()
        stepped_aside = []  # label probes with neither labels nor two predicted classes to read
        for name in self.own_pass_members:
            started = time.perf_counter()
            member = self.detectors[name]
            if shared is not None and shared.typical is not None and member.layer in ("auto", shared.typical_layer):
                # the shared pass already read this member's layer (the prefilter's): its fit needs no pass of its own
                features = Features(shared.typical, shared.logits, shared.typical_layer, shared.shape)
            else:
                features = member.extract_features(data, f"ensemble {name}")
            logits = features.logits if logits is None else logits
            if (member.READS_LABELS and labels is None and len(self.members) > len(stepped_aside) + 1
                    and features.predicted.unique().numel() < 2):
                warnings.warn(f"data: the model predicts class {int(features.predicted[0])} for every fit image, so "
                              f"the label probe {name!r} has no classes to compare; it is left out of this fit",
                              SampleSizeWarning, stacklevel=2)
                stepped_aside.append(name)
                continue
            member.fit_features(features, labels if member.READS_LABELS else None)
            self._own_pass[name] = member.as_module()
            fit_scores = getattr(member, "fit_scores", None)  # the label probe's out-of-fold scores of its fit set
            columns[name] = (fit_scores.float() if fit_scores is not None
                             else self._own_pass[name].head(features.logits, features.features.float()))
            self.member_seconds[name] = time.perf_counter() - started
        self.members = tuple(n for n in self.members if n not in stepped_aside)
        if shared is not None:  # after the own-pass members: features' class fits may leave out a probe's easy half
            started = time.perf_counter()
            self._probe_filter = self._resolved_probe_filter()
            left_out = None if self._probe_filter is None else easier_half(
                self.detectors[self._probe_filter].fit_scores, shared.predicted)
            for name in self.feature_members:
                member = self.detectors[name]
                options = {"left_out": left_out} if name == "features" and left_out is not None else {}
                member.fit_features(shared, labels if member.READS_LABELS else None, **options)
            self._heads = _SharedFeatures(self.model, shared.layer,
                                          [self.detectors[n].as_module() for n in self.feature_members])
            scores = self._heads.head_scores(shared.logits, shared.features.float())
            columns.update(zip(self.feature_members, scores.unbind(1)))
            self.member_seconds["feature pass"] += time.perf_counter() - started
        log = None
        if checkpoint is not None and self.cd_members:
            from trojanguard.models.io import model_sha256

            log = FitCheckpoint(checkpoint, {"model_sha256": model_sha256(self.model),
                                             "members": {n: repr(self.detectors[n]) for n in self.cd_members}})
        try:
            for name in self.cd_members:
                started = time.perf_counter()
                columns[name] = self._score_cd(name, data, log, digests)
                self.member_seconds[name] = time.perf_counter() - started
        finally:
            if log is not None:
                log.close()
        if len(digests) < MIN_REFERENCE:
            raise DataError(f"data: expected at least {MIN_REFERENCE} images to fit the ensemble on, got "
                            f"{len(digests)}")
        for name, column in columns.items():
            if len(column) != len(digests):
                raise DataError(f"data: member {name!r} scored {len(column)} images of {len(digests)}; pass data "
                                "that reads the same images every time it is iterated")
        self._gate_members(columns, logits, shared)
        self.gated_out = (*self.gated_out, *stepped_aside)
        self.reference_scores = torch.stack([columns[n].double() for n in self.members], 1)
        self._sorted = self.reference_scores.T.sort(dim=1).values
        self.bimodality = {n: bimodality_coefficient(self.reference_scores[:, m]) for m, n in enumerate(self.members)}
        self.selected = max(self.members, key=lambda n: self.bimodality[n])
        self.reference_predicted, self._num_classes, self._factors = logits.argmax(1).cpu(), logits.shape[1], {}
        self._memo = {digest: row for row, digest in enumerate(digests)}
        self.input_shape = shape
        self.reference_fragility, self.fragile, self.stable = None, (None, 0.0, 1.0), (None, 0.0, 1.0)
        self.fragile_vetoed = None
        self._steps = None
        if self.fragility == "class":
            started = time.perf_counter()
            self._fragility_detector = NoiseFragility(self.model, batch_size=self.batch_size, seed=self.seed,
                                                      show_progress=self.show_progress)
            fragility = self._fragility_detector.score(data)
            if len(fragility) != len(digests):
                raise DataError(f"data: the fragility pass read {len(fragility)} images of {len(digests)}; pass data "
                                "that reads the same images every time it is iterated")
            self.reference_fragility = fragility
            self.fragile = fragile_class(fragility, self.reference_predicted, self._num_classes)
            if self.fragile[0] is not None and self._outliers_gather_elsewhere(self.fragile[0]):
                self.fragile_vetoed, self.fragile = self.fragile[0], (None, *self.fragile[1:])
            gate = self.fitted_stable_gate
            if gate is not None:
                self.stable = stable_class(fragility, self.reference_predicted, self._concentration_of(self.fusion)[1],
                                           gate=gate)
            self.member_seconds["fragility"] = time.perf_counter() - started
        return self

    def score(self, x) -> torch.Tensor:
        """Fused suspicion ``(N,)``, higher = more suspicious (module docstring)."""
        scores, predicted = self.member_scores(x, with_classes=True)
        fused = self.fuse(scores, predicted=predicted)
        steps = self._placement_steps()
        if not steps:
            return fused
        fragility = self.fragility_scores(x)
        for sign, fired, reference in steps:
            fused = place_by_fragility(reference, sign * self.reference_fragility, self.reference_predicted, fused,
                                       sign * fragility, predicted, fired)
        return fused

    def fuse(self, member_scores: torch.Tensor, fusion: str | None = None, *,
             predicted: torch.Tensor | None = None) -> torch.Tensor:
        """Fused scores ``(N,)`` of raw member scores ``(N, M)`` (columns in ``members`` order) by ``fusion``
        (default: the ensemble's), against the fit data's reference scores; with the images' ``predicted`` classes
        (N,) and ``concentration="class"``, concentrated by the fit data's class enrichment (module docstring)."""
        self._require_fit("Ensemble.fuse")
        fusion = self.fusion if fusion is None else fusion
        selected = self.members.index(self.selected)
        fused = fuse(self.reference_scores, member_scores, fusion, selected=selected)
        if predicted is None or self.concentration == "none":
            return fused
        threshold, factors, _ = self._concentration_of(fusion)
        return concentrate(fused, torch.as_tensor(predicted).long(), threshold, factors)

    @property
    def num_classes(self) -> int:
        """The model's number of classes (known once fitted)."""
        self._require_fit("Ensemble.num_classes")
        return self._num_classes

    @property
    def class_factors(self) -> torch.Tensor:
        """Each class's enrichment (K,) under the ensemble's fusion (module docstring); all 1 without concentration."""
        self._require_fit("Ensemble.class_factors")
        if self.concentration == "none":
            return torch.ones(self.num_classes, dtype=torch.float64)
        return self._concentration_of(self.fusion)[1]

    def member_scores(self, x, *, with_classes: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Raw scores ``(N, M)`` of every member (columns in ``members`` order); images of the fit data reuse the
        scores computed while fitting. ``with_classes``: also the model's classes ``(N,)`` of the images."""
        self._require_fit("Ensemble.score")
        parts, classes, offset = [], [], 0
        for xb, _ in iter_image_batches(x, self.batch_size):
            rows = [self._memo.get(d) for d in image_digests(xb)]
            out = torch.empty(len(xb), len(self.members), dtype=torch.float64)
            predicted = torch.empty(len(xb), dtype=torch.long)
            known = [i for i, r in enumerate(rows) if r is not None]
            if known:
                out[known] = self.reference_scores[[rows[i] for i in known]]
                predicted[known] = self.reference_predicted[[rows[i] for i in known]]
            missing = [i for i, r in enumerate(rows) if r is None]
            if missing:
                out[missing], predicted[missing] = self._compute(xb[missing], torch.tensor(missing) + offset)
            parts.append(out)
            classes.append(predicted)
            offset += len(xb)
        if not parts:
            raise DataError("x: no images to score")
        return (torch.cat(parts), torch.cat(classes)) if with_classes else torch.cat(parts)

    def explain(self, x: torch.Tensor, indices: list[int]) -> dict[str, torch.Tensor]:
        """The first CD member's ``masks`` (K, M, H, W) and ``patterns`` x·m (K, C, H, W) of images ``x`` (samples
        ``indices`` of the screened data); ``{}`` when no member is CD."""
        if not self.cd_members:
            return {}
        cd = self.detectors[self.cd_members[0]]
        parts = [r for _, r in cd.iter_distill(x, keep_masks=True, sample_indices=torch.as_tensor(indices))]
        return {"masks": torch.cat([r.masks for r in parts]), "patterns": torch.cat([r.patterns for r in parts])}

    # ------------------------------------------------------------------------------------------ internals
    def _resolved_probe_filter(self) -> str | None:
        """``probe_filter`` for this fit: a fitted label probe among the members, or None."""
        name = "probe-shallow" if self.probe_filter == AUTO else self.probe_filter
        return name if name in self.members and "features" in self.members else None

    def _gate_members(self, columns: dict[str, torch.Tensor], logits: torch.Tensor, shared) -> None:
        """Leave out of ``members`` each gated member whose own robust outliers on the fit data (``columns``, its
        scores) do not gather in one predicted class (``fitted_member_gates``); at least one member stays."""
        self.gated_out, self.member_p_values = (), {}
        gates = self.fitted_member_gates
        predicted, classes = logits.argmax(1).cpu(), logits.shape[1]
        for name in gates:
            self.member_p_values[name] = outlier_significance(columns[name], predicted, classes)
        self.gated_out = out = gated_out_members(self.members, self.member_p_values, gates)
        if not out:
            return
        self.members = tuple(n for n in self.members if n not in out)
        for name in out:
            self._own_pass.pop(name, None)
        if any(n in FEATURE_MEMBERS for n in out):
            self._heads = None if not self.feature_members else _SharedFeatures(
                self.model, shared.layer, [self.detectors[n].as_module() for n in self.feature_members])

    def _score_cd(self, name: str, data, log: FitCheckpoint | None, all_digests: list[bytes]) -> torch.Tensor:
        """CD member ``name``'s scores (n,) of the fit data, each image keyed by its position (its noise stream)
        and its digest (``all_digests``, from the fit's first pass); those ``log`` holds are read, the others
        distilled and appended to it batch by batch."""
        detector, parts = self.detectors[name], []
        bar = progress_bar(len(all_digests) or None, desc=f"ensemble {name}", unit="img", enable=self.show_progress)
        try:
            for xb, start in iter_image_batches(data, self.batch_size):
                digests = all_digests[start : start + len(xb)]
                if len(digests) != len(xb):
                    raise DataError(f"data: member {name!r} read more images than the fit's first pass "
                                    f"({len(all_digests)}); pass data that reads the same images every time it is "
                                    "iterated")
                held = [None] * len(xb) if log is None else log.lookup(name, start, digests)
                out = torch.tensor([math.nan if h is None else h for h in held], dtype=torch.float64)
                missing = [i for i, h in enumerate(held) if h is None]
                if missing:
                    indices = torch.tensor(missing) + start
                    scores = torch.cat([r.scores for _, r in detector.iter_distill(
                        xb[missing], keep_masks=False, sample_indices=indices)]).double()
                    out[missing] = scores
                    if log is not None:
                        log.append(name, indices.tolist(), [digests[i] for i in missing], scores.tolist())
                parts.append(out)
                bar.update(len(xb))
        finally:
            bar.close()
        if not parts:
            raise DataError("data: no images to fit the ensemble on")
        return torch.cat(parts)

    def _require_fit(self, where: str) -> None:
        if not self.fitted:
            raise RuntimeError(f"{where}: call fit(data) first (the screened data itself, or reference data)")

    def _concentration_of(self, fusion: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`concentration_of` the fit data fused by ``fusion``, and which of them are its outliers (n,) bool
        (over the threshold; cached)."""
        if fusion not in self._factors:
            selected = self.members.index(self.selected)
            reference = fuse(self.reference_scores, self.reference_scores, fusion, selected=selected)
            threshold, factors = concentration_of(reference, self.reference_predicted, self.num_classes)
            self._factors[fusion] = (threshold, factors, reference.double() > threshold)
        return self._factors[fusion]

    def _outliers_gather_elsewhere(self, cls: int) -> bool:
        """Whether the fit data's fused outliers shun class ``cls`` for another (:func:`~trojanguard.detect.fragility.
        outliers_gather_elsewhere`)."""
        return outliers_gather_elsewhere(self._concentration_of(self.fusion)[2], self.reference_predicted, cls)

    def _placement_steps(self) -> list[tuple[int, int, torch.Tensor]]:
        """``(sign, fired class, the fit data's fused scores it re-places against)`` per fired class test — the fragile
        class first, then the stable one on what the first left — computed once per fit (and per fired classes)."""
        key = (self.fragile[0], self.stable[0])
        if self._steps is None or self._steps[0] != key:
            steps, reference = [], self.fuse(self.reference_scores, predicted=self.reference_predicted)
            for sign, fired in ((1, key[0]), (-1, key[1])):
                if fired is not None:
                    steps.append((sign, fired, reference))
                    ref_fragility = sign * self.reference_fragility
                    reference = place_by_fragility(reference, ref_fragility, self.reference_predicted, reference,
                                                   ref_fragility, self.reference_predicted, fired)
            self._steps = (key, steps)
        return self._steps[1]

    def fragility_scores(self, x) -> torch.Tensor:
        """Noise fragility (N,) of ``x`` (:class:`~trojanguard.detect.NoiseFragility`): the fit data's from the fit,
        other images scored now. Needs ``fragility="class"``."""
        self._require_fit("Ensemble.fragility_scores")
        if self.reference_fragility is None:
            raise RuntimeError('Ensemble.fragility_scores: the ensemble was made with fragility="none"')
        parts = []
        for xb, _ in iter_image_batches(x, self.batch_size):
            rows = [self._memo.get(d) for d in image_digests(xb)]
            out = torch.empty(len(xb), dtype=torch.float64)
            known = [i for i, r in enumerate(rows) if r is not None]
            if known:
                out[known] = self.reference_fragility[[rows[i] for i in known]]
            missing = [i for i, r in enumerate(rows) if r is None]
            if missing:
                out[missing] = self._fragility_detector.score_with_classes(xb[missing], show_progress=False)[0]
            parts.append(out)
        return torch.cat(parts)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits (B, K) of ``x``, by a frozen copy of it (only when no member's pass gives them)."""
        if self._net is None:
            self._net, _ = working_copy(self.model)
        device = model_device(self._net)
        with torch.no_grad():
            return self._net(x.to(device, torch.float32)).float().cpu()

    def _compute(self, x: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw member scores (B, M) and the model's classes (B,) of images ``x`` not seen in the fit; ``indices``:
        their positions in the scored data (CD's noise streams)."""
        columns: dict[str, torch.Tensor] = {}
        device = model_device(self.model)
        predicted = None
        if self.feature_members:
            self._heads.to(device)
            with torch.no_grad():
                logits, feature = self._heads.tap(x.to(device, torch.float32))
                scores = self._heads.head_scores(logits, feature).cpu()
            columns.update(zip(self.feature_members, scores.unbind(1)))
            predicted = logits.argmax(1).cpu()
        by_layer: dict[str, list[str]] = {}  # own-pass members reading one layer share one pass (the first's copy)
        for name in self.own_pass_members:
            by_layer.setdefault(self._own_pass[name].layer_name, []).append(name)
        for names in by_layer.values():
            with torch.no_grad():
                logits, feature = FeatureTap.forward(self._own_pass[names[0]].to(device), x.to(device, torch.float32))
                for name in names:
                    columns[name] = self._own_pass[name].to(device).head(logits, feature).cpu()
            predicted = logits.argmax(1).cpu() if predicted is None else predicted
        for name in self.cd_members:
            parts = [r.scores for _, r in self.detectors[name].iter_distill(x, keep_masks=False,
                                                                          sample_indices=indices)]
            columns[name] = torch.cat(parts)
        if predicted is None:
            predicted = self._logits(x).argmax(1)
        return torch.stack([columns[n].double() for n in self.members], 1), predicted


class FitCheckpoint:
    """The CD members' scores of one ensemble fit in a durable text file, so a fit killed part-way resumes.

    The first line is :data:`CHECKPOINT_MAGIC` and the fit's identity (the model's SHA-256, each CD member's
    settings); then one line ``member,index,digest,score`` per distilled image, appended and fsync'ed per batch. A
    score is reused only for the same member, position (CD's noise stream) and image content (digest); a file of
    another fit, or a line cut short by a kill, is dropped when the file is opened.
    """

    def __init__(self, path: str | Path, identity: dict):
        self.path = Path(path)
        header = CHECKPOINT_MAGIC + json.dumps(identity, sort_keys=True)
        self.scores: dict[tuple[str, int, str], float] = {}
        kept = []
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        lines = text.split("\n")
        if lines[0] == header:
            for line in lines[1:-1]:  # the last element follows the final newline: empty, or a line cut short
                parts = line.split(",")
                try:
                    key, score = (parts[0], int(parts[1]), parts[2]), float(parts[3])
                except (IndexError, ValueError):
                    continue
                if len(parts) == 4:
                    self.scores[key] = score
                    kept.append(line)
        from trojanguard.screening.records import write_atomic

        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, "\n".join([header, *kept]) + "\n")
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 — closed by close()

    def lookup(self, member: str, start: int, digests: list[bytes]) -> list[float | None]:
        """The held score of each image (positions ``start …``), or None."""
        return [self.scores.get((member, start + i, d.hex())) for i, d in enumerate(digests)]

    def append(self, member: str, indices: list[int], digests: list[bytes], scores: list[float]) -> None:
        """Make one batch's scores durable (flush + fsync)."""
        self._file.write("".join(f"{member},{i},{d.hex()},{s!r}\n" for i, d, s in zip(indices, digests, scores)))
        self._file.flush()
        os.fsync(self._file.fileno())
        for i, d, s in zip(indices, digests, scores):
            self.scores[(member, i, d.hex())] = s

    def close(self) -> None:
        self._file.close()


class _SharedFeatures(FeatureTap):
    """One forward pass for every feature member: ``forward(x) -> (B, F)`` scores of the members' heads."""

    def __init__(self, model: nn.Module, layer: str, scorers: list[nn.Module]):
        super().__init__(model, layer)
        self.heads: list[Callable] = [s.head for s in scorers]
        self.scorers = nn.ModuleList(scorers)

    def head_scores(self, logits: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(logits, feature).double() for head in self.heads], 1)

    def tap(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, pooled feature)`` of ``x``: the one forward pass."""
        return super().forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.head_scores(*self.tap(x))


# ---------------------------------------------------------------------------------------------- fusion
def check_member_gates(member_gates, members: Sequence[str]) -> dict[str, float] | str:
    """``member_gates`` checked: ``"auto"``, or ``{member: significance level in (0, 1]}`` over ``members`` (None:
    ``{}``)."""
    if member_gates is None:
        return {}
    if isinstance(member_gates, str) and member_gates.strip() == AUTO:
        return AUTO
    if not isinstance(member_gates, dict):
        raise ValueError(  # noqa: TRY004 — a bad option value, reported as one line like the others
            f"member_gates: expected {{member: gate}}, 'auto' or None, got {member_gates!r}")
    for name, gate in member_gates.items():
        if name not in members:
            raise ValueError(f"member_gates: {name!r} is not a member; members: {', '.join(members)}")
        if isinstance(gate, bool) or not isinstance(gate, (int, float)) or not 0 < gate <= 1:
            raise ValueError(
                f"member_gates: expected a significance level in (0, 1] as {name!r}'s gate, got {gate!r}")
    return {name: float(gate) for name, gate in member_gates.items()}


def _ecdf_knots(reference: torch.Tensor) -> tuple[np.ndarray, np.ndarray, float] | None:
    """The distinct values of ``reference`` (NaN left out), their mid-rank ECDF ``(#below + #not above) /
    2n``, and the tails' scale ``s`` = the range / n (0 when not finite); None when nothing is left."""
    ref = reference.double().numpy()
    ref = np.sort(ref[~np.isnan(ref)])
    n = len(ref)
    if n == 0:
        return None
    knots = np.unique(ref)
    cdf = (np.searchsorted(ref, knots, side="left") + np.searchsorted(ref, knots, side="right")) / (2 * n)
    spread = (knots[-1] - knots[0]) / n if np.isfinite(knots[-1] - knots[0]) else 0.0
    return knots, cdf, spread


def empirical_cdf(reference: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Where each of ``values`` (N,) falls in the distribution of ``reference`` (n,), in (0, 1), float64.

    At a reference value: its mid-rank ECDF, ``(#below + #not above) / 2n`` (ties counted half), so on the reference
    set itself this is the normalised rank. Between two reference values: linear between theirs. Beyond the range:
    towards 0 or 1 as ``exp(−distance / s)``, ``s`` = the reference range / n — strictly increasing, so clean images
    scored later do not all tie at the top (which would defeat a quantile threshold). +inf maps to 1; NaN stays NaN.
    """
    v = values.double().numpy()
    fitted = _ecdf_knots(reference)
    if fitted is None:
        return torch.full(v.shape, math.nan, dtype=torch.float64)
    knots, cdf, spread = fitted
    out = np.interp(v, knots, cdf)
    with np.errstate(invalid="ignore", over="ignore"):
        above, below = v > knots[-1], v < knots[0]
        if spread > 0:
            out[above] = cdf[-1] + (1 - cdf[-1]) * -np.expm1(-(v[above] - knots[-1]) / spread)
            out[below] = cdf[0] * np.exp(-(knots[0] - v[below]) / spread)
        else:
            out[above], out[below] = 1.0, 0.0
    out[np.isnan(v)] = math.nan
    return torch.from_numpy(out)


def empirical_quantile(reference: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`empirical_cdf` over ``reference``: the value whose ECDF is ``u`` (N,) in [0, 1] — linear
    between the reference's knots, the exponential tails inverted beyond them (1 maps to +inf, 0 to −inf), float64."""
    q = u.double().numpy()
    fitted = _ecdf_knots(reference)
    if fitted is None:
        return torch.full(q.shape, math.nan, dtype=torch.float64)
    knots, cdf, spread = fitted
    out = np.interp(q, cdf, knots)
    with np.errstate(divide="ignore", invalid="ignore"):
        above, below = q > cdf[-1], q < cdf[0]
        if spread > 0:
            out[above] = knots[-1] - spread * np.log((1 - q[above]) / (1 - cdf[-1]))
            out[below] = knots[0] + spread * np.log(q[below] / cdf[0])
        else:
            out[above], out[below] = knots[-1], knots[0]
    out[np.isnan(q)] = math.nan
    return torch.from_numpy(out)


def robust_z(reference: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``(values − median) / σ̂`` with σ̂ = 1.4826 · MAD of the finite ``reference`` (1.2533 · mean absolute deviation
    when the MAD is 0; 1 when that is 0 too), float64."""
    from trojanguard.thresholds import MAD_TO_SIGMA, MEAN_AD_TO_SIGMA

    ref = reference.double()
    ref = ref[torch.isfinite(ref)]
    if len(ref) == 0:
        return torch.full(values.shape, math.nan, dtype=torch.float64)
    median = ref.median()
    deviation = (ref - median).abs()
    sigma = MAD_TO_SIGMA * float(deviation.median())
    if sigma <= 0:
        sigma = MEAN_AD_TO_SIGMA * float(deviation.mean())
    return (values.double() - median) / (sigma if sigma > 0 else 1.0)


def bimodality_coefficient(scores: torch.Tensor) -> float:
    """Sarle's bimodality coefficient ``(g² + 1) / (κ + 3(n − 1)² / ((n − 2)(n − 3)))`` of the finite scores (g:
    sample skewness, κ: excess kurtosis, both bias-corrected); 5/9 for a uniform distribution, larger for
    bimodal or heavily skewed ones, 0 for constant scores or fewer than 4."""
    from scipy.stats import kurtosis, skew

    values = scores.double().numpy()
    values = values[np.isfinite(values)]
    n = len(values)
    if n < 4 or np.ptp(values) <= 1e-12 * max(np.abs(values).max(), 1e-300):
        return 0.0
    g, excess = skew(values, bias=False), kurtosis(values, bias=False)
    denominator = excess + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3))
    return float((g * g + 1) / denominator) if denominator > 0 else 0.0


def concentration_of(reference: torch.Tensor, predicted: torch.Tensor, num_classes: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(threshold, factors)`` of class concentration (module docstring) from the fused ``reference`` scores (n,) of
    the fit data and their ``predicted`` classes (n,): the robust rule's threshold on them, and each class's
    enrichment (K,) float64 among the scores above it, ``(outliers predicted as it + 1) / (share of outliers · images
    predicted as it + 1)``. Factors all 1 (and the threshold +inf) when fewer than three scores are finite."""
    from trojanguard.thresholds import robust_threshold

    values = reference.double()
    predicted = torch.as_tensor(predicted).long().flatten()
    if predicted.shape != values.shape:
        raise ValueError(f"predicted: expected ({len(values)},) classes, got {tuple(predicted.shape)}")
    finite = torch.isfinite(values)
    if int(finite.sum()) < 3:
        return torch.tensor(math.inf, dtype=torch.float64), torch.ones(num_classes, dtype=torch.float64)
    threshold = robust_threshold(values[finite].numpy())
    outliers = values > threshold  # +inf counts, NaN does not
    counts = torch.bincount(predicted, minlength=num_classes).double()
    hits = torch.bincount(predicted[outliers], minlength=num_classes).double()
    return torch.tensor(threshold, dtype=torch.float64), (hits + 1) / (outliers.double().mean() * counts + 1)


def outlier_significance(scores: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> float:
    """How far one member's robust outliers among ``scores`` (n,) of the fit data gather in one of their ``predicted``
    classes (n,), as a p-value (gated members): over the classes, the smallest one-sided hypergeometric probability
    that a class holds at least as many of the outliers (above the robust rule's threshold on the member's robust
    z-scores) by chance, given its share of the data. 1 where there are no outliers."""
    from scipy.stats import hypergeom

    from trojanguard.thresholds import robust_threshold

    values = robust_z(scores, scores).double()
    predicted = torch.as_tensor(predicted).long().flatten()
    finite = torch.isfinite(values)
    if int(finite.sum()) < 3:
        return 1.0
    outliers = values > robust_threshold(values[finite].numpy())  # +inf counts, NaN does not
    valid = ~torch.isnan(values)
    n, top = int(valid.sum()), int(outliers.sum())
    if top == 0:
        return 1.0
    counts = torch.bincount(predicted[valid], minlength=num_classes)
    hits = torch.bincount(predicted[outliers], minlength=num_classes)
    return float(min(hypergeom.sf(int(hits[c]) - 1, n, int(counts[c]), top) for c in range(num_classes)
                     if hits[c] > 0))


def gated_out_members(members: Sequence[str], p_values: dict[str, float], gates: dict[str, float]
                      ) -> tuple[str, ...]:
    """The gated ``members`` whose outliers do not gather significantly (:func:`outlier_significance`'s ``p_values``
    at or above their gate, ``gates``), in ``members`` order; the first of them stays in when that would leave no
    member."""
    out = tuple(n for n in members if n in gates and not p_values[n] < gates[n])
    return out[1:] if len(out) == len(members) else out


def concentrate(fused: torch.Tensor, predicted: torch.Tensor, threshold: float | torch.Tensor, factors: torch.Tensor
                ) -> torch.Tensor:
    """``fused`` (N,) scores with each excess over ``threshold`` (the robust rule's, on the fit data) multiplied by
    the ``factors`` (K,) of the image's ``predicted`` class (N,); scores at or below it and NaN unchanged, so what the
    robust rule flags does not change, only the order of what it flags."""
    values = fused.double()
    excess = values - float(threshold)
    raised = float(threshold) + excess * factors.double()[predicted]
    return torch.where(excess > 0, raised, values).to(fused.dtype)


def fuse(reference: torch.Tensor, scores: torch.Tensor, fusion: str = "rank", *, selected: int | None = None
         ) -> torch.Tensor:
    """Fused scores ``(N,)`` of raw member scores ``scores`` (N, M) against the reference scores (n, M) of the same
    members (module docstring). ``selected``: the member ``"select"`` uses (default: the most bimodal reference
    column). NaN member scores are left out of a sample's fusion (NaN when all are)."""
    check_choice("fusion", fusion, FUSIONS)
    if reference.dim() != 2 or scores.dim() != 2 or reference.shape[1] != scores.shape[1]:
        raise ValueError(f"scores: expected (N, M) member scores matching the reference's (n, M), got "
                         f"{tuple(scores.shape)} and {tuple(reference.shape)}")
    if fusion == "zscore":
        return torch.stack([robust_z(reference[:, m], scores[:, m]) for m in range(scores.shape[1])], 1
                           ).nanmean(1).float()
    if fusion == "select":
        if selected is None:
            selected = int(np.argmax([bimodality_coefficient(reference[:, m]) for m in range(reference.shape[1])]))
        return empirical_cdf(reference[:, selected], scores[:, selected]).float()
    cdf = torch.stack([empirical_cdf(reference[:, m], scores[:, m]) for m in range(scores.shape[1])], 1)
    if fusion == "rank":
        return cdf.nanmean(1).float()
    if fusion == "probit":
        n = len(reference)
        clipped = cdf.clamp(0.5 / n, 1 - 0.5 / n)
        return (math.sqrt(2) * torch.erfinv(2 * clipped - 1)).nanmean(1).float()
    fused = torch.where(torch.isnan(cdf), torch.full_like(cdf, -math.inf), cdf).amax(1)
    return torch.where(torch.isinf(fused), torch.full_like(fused, math.nan), fused).float()

