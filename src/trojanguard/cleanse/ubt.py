"""UBT (Liang et al., CVPR-W 2024): unlearn a CLIP-style model's backdoor at the token level.

Known of the paper (METHODS.md §5): (1) find suspicious pairs in the (possibly poisoned) fine-tuning set by
strengthening the backdoor shortcut with over-fitting prioritised by weak-similarity pairs; (2) unlearn only a
small, local set of parameters on a small subset of them, with Cartesian-product augmentation. No code was
published; everything below that is not in that sentence is ours, measured in docs/ubt.md:

**Stage 1 — suspicious pairs** (:func:`screen_pairs`). A poisoned pair is a triggered image with a caption of the
target class: its similarity rests on the trigger, not on the image's content. So we replace the content and see
whether the similarity to the pair's own caption *persists*: per pair, the mean similarity over ``draws``
perturbed copies minus the original similarity, for two perturbations — *blend* (half the image, half another
image: a global trigger survives it) and *paste* (a square of half the side from another image pasted in: a local
trigger outside it survives) — each robustly standardised (median / MAD), the pair's score the larger of the two.
The over-fitting stage is an option (``overfit_epochs``): a copy trained on the weakest-similarity ``overfit_pool``
share of the pairs, then scored instead of the model. The ``suspicious_fraction`` highest-scoring pairs (at least
``min_suspicious``) are the suspicious set.

**Stage 2 — token-level unlearning**. Only token-level parameters train (``unfreeze``): the text embedding rows of
the tokens of the suspicious captions (a gradient mask keeps every other row), and/or the image tower's input
embedding (the first layer the images enter — a ViT's patch projection, a CNN's stem — and a ViT's positional and
class embeddings). Loss: *forget* — every view of every suspicious image against every view of every suspicious
caption (the Cartesian product), its cosine similarity pushed below the *unrelated level* (the mean similarity of
mismatched pairs of the data before unlearning) by a hinge; plus *retain* — CLIP's loss on the
``retain_fraction`` least suspicious pairs, which holds clean behaviour. Adam over the selected parameters,
through the cleansers' one loop.
"""

from __future__ import annotations

import copy
import csv
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trojanguard.cleanse._training import StepResult, train
from trojanguard.cleanse.base import (
    Cleanser,
    CleanseReport,
    config_with,
    copy_of,
    model_device,
    setting,
)
from trojanguard.cleanse.pairs import Pairs
from trojanguard.errors import DataError
from trojanguard.models.adapters import ImageText, as_image_text

PERTURBATIONS = ("blend+paste", "blend", "paste")
UNFREEZE = ("text", "image", "text+image")
RETAIN_LOSSES = ("clip", "distill")
PASTE_SIDE = 0.5  # the pasted square's side, a share of the image's
BLEND_WEIGHT = 0.5  # the other image's share in a blend
SCORE_BATCH = 256
_POSITION_NAMES = re.compile(r"(^|\.)(positional_embedding|position_embedding|class_embedding)(\.weight)?$")


@dataclass(frozen=True)
class UBTConfig:
    """Every UBT setting (the module docstring; defaults and how they were chosen: docs/ubt.md)."""

    suspicious_fraction: float = setting(0.005, "share of the pairs taken as suspicious (the highest scores)")
    min_suspicious: int = setting(8, "the suspicious set's least size")
    perturbations: str = setting("blend+paste", "how stage 1 replaces an image's content: blend, paste or both (the "
                                 "larger standardised persistence)", choices=PERTURBATIONS)
    draws: int = setting(8, "perturbed copies per pair in stage 1")
    overfit_epochs: int = setting(0, "epochs of over-fitting a copy on the weakest-similarity pairs before scoring "
                                  "(0: score the model itself)")
    overfit_pool: float = setting(0.3, "share of the pairs (the weakest similarity) the copy over-fits")
    overfit_lr: float = setting(1e-3, "AdamW learning rate of the over-fitting")
    unfreeze: str = setting("text+image", "the token-level parameters unlearning trains: text (the suspicious captions' "
                            "token embedding rows), image (the image tower's input embedding) or text+image",
                            choices=UNFREEZE)
    epochs: int = setting(5, "unlearning epochs (one pass over the retained pairs each)")
    lr: float = setting(3e-3, "Adam learning rate of the unlearned parameters")
    batch_size: int = setting(64, "retained pairs per step")
    image_views: int = setting(4, "views of each suspicious image in the Cartesian product")
    caption_views: int = setting(4, "views of each suspicious caption in the Cartesian product")
    forget_batch: int = setting(64, "at most this many image views (and caption views) in one step's forget term: "
                                "a random subset of the suspicious pairs when they are more")
    cartesian: bool = setting(True, "forget on every image view × caption view (False: the suspicious pairs as "
                              "they are)")
    retain_fraction: float = setting(0.5, "share of the pairs (the least suspicious) the retention loss trains on")
    retain_loss: str = setting("distill", "the retention term on the retained pairs: clip (CLIP's loss) or distill (1 − "
                               "cosine of each image's and caption's embedding to the model's before unlearning)",
                               choices=RETAIN_LOSSES)
    retain_weight: float = setting(2.0, "weight of the retention loss")
    seed: int = setting(0, "seed of the perturbations, views and batches")
    show_progress: bool = setting(True, "progress lines", report=False)

    def __post_init__(self) -> None:
        for name in ("min_suspicious", "draws", "epochs", "batch_size", "image_views", "caption_views", "forget_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if isinstance(self.overfit_epochs, bool) or not isinstance(self.overfit_epochs, int) or self.overfit_epochs < 0:
            raise ValueError(f"overfit_epochs: expected an integer ≥ 0, got {self.overfit_epochs!r}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size: expected at least 2 (a contrast needs a negative), got {self.batch_size}")
        for name in ("suspicious_fraction", "overfit_pool", "retain_fraction"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name}: expected a share in (0, 1], got {value}")
        for name in ("lr", "overfit_lr"):
            if not getattr(self, name) > 0 or not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}: expected a positive finite number, got {getattr(self, name)}")
        if not self.retain_weight >= 0 or not math.isfinite(self.retain_weight):
            raise ValueError(f"retain_weight: expected a finite number ≥ 0, got {self.retain_weight}")
        if self.perturbations not in PERTURBATIONS:
            raise ValueError(f"perturbations: expected one of {PERTURBATIONS}, got {self.perturbations!r}")
        if self.retain_loss not in RETAIN_LOSSES:
            raise ValueError(f"retain_loss: expected one of {RETAIN_LOSSES}, got {self.retain_loss!r}")
        if self.unfreeze not in UNFREEZE:
            raise ValueError(f"unfreeze: expected one of {UNFREEZE}, got {self.unfreeze!r}")


# ---------------------------------------------------------------------------------------------------------
# stage 1: suspicious pairs


@dataclass
class PairScreening:
    """Stage 1's result: per pair its ``similarity`` (cosine of image and caption), its ``score`` (the larger
    standardised persistence; higher is more suspicious) and the ``suspicious`` indices, most suspicious first."""

    similarity: torch.Tensor
    score: torch.Tensor
    suspicious: torch.Tensor

    def to_csv(self, path: str | Path) -> Path:
        """One row per pair: index, similarity, score, suspicious (1 / 0), sorted by score, highest first."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        flagged = set(self.suspicious.tolist())
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "similarity", "score", "suspicious"])
            for i in self.score.argsort(descending=True).tolist():
                writer.writerow([i, f"{float(self.similarity[i]):.6f}", f"{float(self.score[i]):.6f}", int(i in flagged)])
        return path


@torch.no_grad()
def pair_similarity(model: ImageText, images: torch.Tensor, tokens: torch.Tensor, *,
                    text: torch.Tensor | None = None, batch_size: int = SCORE_BATCH) -> torch.Tensor:
    """Cosine similarity of each image with its own caption (``text``: the captions' normalised embeddings, when
    already computed)."""
    device = model_device(model)
    if text is None:
        text = embed_text(model, tokens, batch_size)
    out = []
    for s in range(0, len(images), batch_size):
        image = F.normalize(model.encode_image(images[s : s + batch_size].to(device)).float(), dim=1)
        out.append((image * text[s : s + batch_size]).sum(1).cpu())
    return torch.cat(out)


@torch.no_grad()
def embed_text(model: ImageText, tokens: torch.Tensor, batch_size: int = SCORE_BATCH) -> torch.Tensor:
    device = model_device(model)
    return torch.cat([F.normalize(model.encode_text(tokens[s : s + batch_size].to(device)).float(), dim=1)
                      for s in range(0, len(tokens), batch_size)])


def paste_square(images: torch.Tensor, others: torch.Tensor, generator: torch.Generator,
                 side: float = PASTE_SIDE) -> torch.Tensor:
    """``images`` with a square of ``side`` × the image side, at a random place per image, taken from ``others``."""
    n, _, h, w = images.shape
    sh, sw = max(1, round(side * h)), max(1, round(side * w))
    oy = torch.randint(0, h - sh + 1, (n,), generator=generator)
    ox = torch.randint(0, w - sw + 1, (n,), generator=generator)
    rows = (torch.arange(h)[None, :] >= oy[:, None]) & (torch.arange(h)[None, :] < oy[:, None] + sh)
    cols = (torch.arange(w)[None, :] >= ox[:, None]) & (torch.arange(w)[None, :] < ox[:, None] + sw)
    mask = (rows[:, :, None] & cols[:, None, :])[:, None].to(images.device)
    return torch.where(mask, others, images)


def robust_z(values: torch.Tensor) -> torch.Tensor:
    """``(v − median) / (1.4826 · MAD)``: standardised so that two scores of different spread can be compared."""
    median = values.median()
    mad = (values - median).abs().median() * 1.4826
    return (values - median) / mad.clamp_min(1e-12)


def persistence(model: ImageText, images: torch.Tensor, tokens: torch.Tensor, perturbation: str, *, draws: int,
                seed: int, similarity: torch.Tensor | None = None, text: torch.Tensor | None = None) -> torch.Tensor:
    """Per pair: mean similarity to its own caption over ``draws`` copies whose content is replaced by another
    pair's image (``blend`` or ``paste``), minus the original similarity."""
    text = embed_text(model, tokens) if text is None else text
    similarity = pair_similarity(model, images, tokens, text=text) if similarity is None else similarity
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(len(images))
    for _ in range(draws):
        others = images[torch.randint(len(images), (len(images),), generator=generator)]
        if perturbation == "blend":
            perturbed = (1 - BLEND_WEIGHT) * images + BLEND_WEIGHT * others
        elif perturbation == "paste":
            perturbed = paste_square(images, others, generator)
        else:
            raise ValueError(f"perturbation: expected blend or paste, got {perturbation!r}")
        total += pair_similarity(model, perturbed, tokens, text=text)
    return total / draws - similarity


def suspicious_count(n: int, fraction: float, minimum: int) -> int:
    """The suspicious set's size: ``round(fraction · n)``, at least ``minimum``, at most half the pairs."""
    return max(1, min(n // 2, max(minimum, round(fraction * n))))


def screen_pairs(model: nn.Module, data, *, config: UBTConfig | None = None, **settings) -> PairScreening:
    """UBT's stage 1 on its own: score every image–caption pair of ``data`` (module docstring) and name the
    suspicious ones. ``model`` is any image–text model :class:`~trojanguard.models.ImageText` takes; it is not
    changed (the optional over-fitting trains a copy)."""
    config = config_with(UBTConfig, config, settings, owner="screen_pairs")
    pairs = data if isinstance(data, Pairs) else Pairs(data)
    model = as_image_text(model)
    device = model_device(model)
    model.check(pairs.images[:2].to(device), pairs.tokens[:2], needed_by="UBT")
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        similarity = pair_similarity(model, pairs.images, pairs.tokens)
        scored = model
        if config.overfit_epochs > 0:
            scored = overfit_weakest(model, pairs, similarity, config)
        text = embed_text(scored, pairs.tokens)
        base = similarity if scored is model else pair_similarity(scored, pairs.images, pairs.tokens, text=text)
        kinds = ("blend", "paste") if config.perturbations == "blend+paste" else (config.perturbations,)
        scores = [robust_z(persistence(scored, pairs.images, pairs.tokens, kind, draws=config.draws,
                                       seed=config.seed + i, similarity=base, text=text))
                  for i, kind in enumerate(kinds)]
    finally:
        for module, training in modes.items():
            module.training = training
    score = torch.stack(scores).amax(0)
    k = suspicious_count(len(pairs), config.suspicious_fraction, config.min_suspicious)
    return PairScreening(similarity, score, score.topk(k).indices)


def overfit_weakest(model: ImageText, pairs: Pairs, similarity: torch.Tensor, config: UBTConfig) -> ImageText:
    """A copy of ``model`` trained with CLIP's loss on the ``overfit_pool`` share of pairs with the weakest
    similarity (where poisoned pairs gather: their caption disagrees with their content)."""
    from trojanguard.clip.model import PairBatches, clip_loss

    pool = similarity.argsort()[: max(2, round(config.overfit_pool * len(similarity)))]
    copy_ = copy.deepcopy(model).requires_grad_(True).train()
    optimizer = torch.optim.AdamW(copy_.parameters(), lr=config.overfit_lr, weight_decay=0.0)

    def step(batch, epoch: int, index: int) -> torch.Tensor:
        x, t = batch
        return clip_loss(copy_.encode_image(x), copy_.encode_text(t), _log_scale(copy_))

    with torch.random.fork_rng(devices=_cuda_devices(model_device(model))):
        torch.manual_seed(config.seed)
        train(copy_, step, PairBatches(pairs.images[pool], pairs.tokens[pool], config.batch_size, config.seed),
              optimizer=optimizer, epochs=config.overfit_epochs, device=model_device(model), loss_name="over-fit loss",
              show_progress=config.show_progress, desc="UBT over-fit")
    return copy_.eval()


# ---------------------------------------------------------------------------------------------------------
# stage 2: token-level unlearning


def _log_scale(model: ImageText) -> torch.Tensor:
    """CLIP's log temperature (capped by clip_loss); log(1 / 0.07) when the model has none."""
    scale = getattr(model.module, "logit_scale", None)
    return scale.detach() if isinstance(scale, torch.Tensor) else torch.tensor(math.log(1 / 0.07))


def _cuda_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


def token_embedding(model: ImageText, tokens: torch.Tensor) -> tuple[str, nn.Embedding]:
    """The text tower's token embedding: the ``nn.Embedding`` whose input is the token ids (found by running
    ``encode_text`` once, so no module names are assumed), named as in the user's module."""
    found: list[tuple[str, nn.Embedding]] = []
    handles = [module.register_forward_hook(lambda mod, inputs, out, n=name: found.append((n, mod))
                                            if inputs and isinstance(inputs[0], torch.Tensor)
                                            and inputs[0].shape == tokens.shape and torch.equal(inputs[0].cpu(), tokens)
                                            else None)
               for name, module in model.module.named_modules() if isinstance(module, nn.Embedding)]
    try:
        with torch.no_grad():
            model.encode_text(tokens.to(model_device(model)))
    finally:
        for handle in handles:
            handle.remove()
    if not found:
        raise DataError("model: UBT unlearns token embedding rows, but no nn.Embedding of the model takes the token "
                        "ids; pass unfreeze='image'")
    return found[0]


def image_input_parameters(model: ImageText, images: torch.Tensor) -> dict[str, nn.Parameter]:
    """The image tower's input embedding: the parameters of the first layer (a module with its own ``weight``) that
    the images enter (a ViT's patch projection, a CNN's stem), and any positional / class embedding ``encode_image`` uses; named as
    in the user's module."""
    user = model.module
    order: list[nn.Module] = []
    handles = [module.register_forward_pre_hook(lambda mod, inputs: order.append(mod)
                                                if inputs and isinstance(inputs[0], torch.Tensor)
                                                and inputs[0].shape == images.shape else None)
               for module in user.modules() if isinstance(getattr(module, "weight", None), nn.Parameter)]
    sample = images.to(model_device(model))
    used: set[str] = set()
    saved = {name: p.requires_grad for name, p in user.named_parameters()}
    try:
        model.requires_grad_(True)
        with torch.enable_grad():
            model.zero_grad(set_to_none=True)
            model.encode_image(sample).float().sum().backward()
        used = {name for name, p in user.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
    finally:
        for handle in handles:
            handle.remove()
        for name, p in user.named_parameters():
            p.requires_grad_(saved[name])
    names = {id(m): n for n, m in user.named_modules()}
    out: dict[str, nn.Parameter] = {}
    if order:
        prefix = names[id(order[0])]
        out.update({f"{prefix}.{n}" if prefix else n: p for n, p in order[0].named_parameters(recurse=False)})
    out.update({name: p for name, p in user.named_parameters() if name in used and _POSITION_NAMES.search(name)})
    if not out:
        raise DataError("model: UBT unlearns the image tower's input embedding, but no layer with weights takes the "
                        "images; pass unfreeze='text'")
    return out


class ForgetSet:
    """The suspicious pairs' images and captions, and their views for the Cartesian product."""

    def __init__(self, images: torch.Tensor, tokens: torch.Tensor, config: UBTConfig, generator: torch.Generator):
        from trojanguard.clip.augment import padding_id

        self.images, self.tokens, self.captions = images, tokens, tokens.unique(dim=0)
        self.pad = padding_id(tokens)
        self.config, self.generator = config, generator

    def _some(self, count: int, most: int) -> torch.Tensor:
        """Indices of ``most`` of ``count`` rows at random (all of them, in order, when they are not more)."""
        return torch.arange(count) if count <= most else torch.randperm(count, generator=self.generator)[:most]

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image views, caption views)``: each suspicious image ``image_views`` times, cropped; each distinct
        suspicious caption ``caption_views`` times, edited (the first view of each is the original); at most
        ``forget_batch`` views of each side (a random subset of the pairs when they are more)."""
        from trojanguard.clip.augment import caption_views, image_views

        config = self.config
        if not config.cartesian:  # the suspicious pairs as they are, matched row by row
            pick = self._some(len(self.images), config.forget_batch)
            return self.images[pick], self.tokens[pick]
        images = self.images[self._some(len(self.images), max(1, config.forget_batch // config.image_views))]
        captions = self.captions[self._some(len(self.captions), max(1, config.forget_batch // config.caption_views))]
        images = torch.cat([images] + [image_views(images, self.generator) for _ in range(config.image_views - 1)])
        captions = torch.cat([captions] + [caption_views(captions, self.generator, self.pad)
                                           for _ in range(config.caption_views - 1)])
        return images, captions


def forget_loss(image: torch.Tensor, text: torch.Tensor, level: float, *, pairwise: bool) -> torch.Tensor:
    """Hinge of the cosine similarity above ``level``: of every image × every caption (``pairwise``: the Cartesian
    product), or of matched rows."""
    image, text = F.normalize(image.float(), dim=1), F.normalize(text.float(), dim=1)
    similarity = image @ text.T if pairwise else (image * text).sum(1)
    return F.relu(similarity - level).mean()


@torch.no_grad()
def unrelated_level(model: ImageText, pairs: Pairs, seed: int, count: int = 512) -> float:
    """The mean cosine similarity of mismatched pairs (an image with another pair's caption) before unlearning."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(pairs), generator=generator)[:count]
    other = index.roll(1)
    text = embed_text(model, pairs.tokens[other])
    return float(pair_similarity(model, pairs.images[index], pairs.tokens[other], text=text).mean())


class UBT(Cleanser):
    """Token-level backdoor unlearning of an image–text model (module docstring).

    ``UBT(epochs=5, ...)`` or ``UBT(config=UBTConfig(...))``. ``cleanse(model, (images, tokens))`` returns a new
    model of the kind handed in (an :class:`~trojanguard.models.ImageText` for one, else a module of the same
    class); ``report.details["suspicious"]`` holds the suspicious pairs' indices, ``report.details["screening"]``
    the scores' summary, and per-epoch ``forget`` / ``retain`` losses, with zero-shot CA / ASR when an evaluation
    (:class:`~trojanguard.cleanse.ZeroShotEvaluation`) is passed. ``screening`` keeps stage 1's
    :class:`PairScreening`.
    """

    model_kind = ImageText

    def __init__(self, *, config: UBTConfig | None = None, **settings):
        self.config = config_with(UBTConfig, config, settings, owner="UBT")
        self.screening: PairScreening | None = None

    def cleanse(self, model: nn.Module, data, *,
                evaluation: Callable[[nn.Module], dict[str, float]] | None = None) -> nn.Module:
        from trojanguard.clip.model import PairBatches, clip_loss

        start = time.perf_counter()
        config = self.config
        self.report = None
        pairs = data if isinstance(data, Pairs) else Pairs(data)
        original = as_image_text(model)
        device = model_device(original)
        report = CleanseReport("UBT", self.report_config(), images=len(pairs))
        if evaluation is not None:
            report.before = evaluation(original)
        screening = screen_pairs(original, pairs, config=config)
        self.screening = screening
        suspicious = screening.suspicious
        keep = max(config.batch_size, round(config.retain_fraction * len(pairs)))
        retained = screening.score.argsort()[:keep]
        retained = retained[~torch.isin(retained, suspicious)]

        student = copy_of(original, "UBT trains a copy")
        student.requires_grad_(False).eval()  # token-level parameters only; normalisation statistics stay
        level = unrelated_level(student, pairs, config.seed)
        frozen = copy.deepcopy(student) if config.retain_loss == "distill" else None  # the embeddings to retain
        trained_params, unfrozen, rows = self._unfreeze(student, pairs, suspicious)
        optimizer = torch.optim.Adam(trained_params, lr=config.lr)
        generator = torch.Generator().manual_seed(config.seed)
        forget_set = ForgetSet(pairs.images[suspicious], pairs.tokens[suspicious], config, generator)
        scale = _log_scale(student)

        def step(batch, epoch: int, index: int) -> StepResult:
            x, t = batch
            images, captions = forget_set.batch()
            forget = forget_loss(student.encode_image(images.to(device)), student.encode_text(captions.to(device)),
                                 level, pairwise=config.cartesian)
            image, text = student.encode_image(x), student.encode_text(t)
            if config.retain_loss == "clip":
                retain = clip_loss(image, text, scale)
            else:
                with torch.no_grad():
                    image_before, text_before = frozen.encode_image(x), frozen.encode_text(t)
                retain = 2 - F.cosine_similarity(image, image_before).mean() - F.cosine_similarity(text, text_before).mean()
            return StepResult(forget + config.retain_weight * retain, terms={"forget": forget, "retain": retain})

        try:
            with torch.random.fork_rng(devices=_cuda_devices(device)):
                torch.manual_seed(config.seed)
                trained = train(student, step, PairBatches(pairs.images[retained], pairs.tokens[retained],
                                                           config.batch_size, config.seed),
                                optimizer=optimizer, epochs=config.epochs, device=device, evaluation=evaluation,
                                loss_name="UBT loss", show_progress=config.show_progress, desc="UBT")
        finally:
            for handle in self._handles:
                handle.remove()
        student.requires_grad_(False).eval()
        report.epochs = trained.rows
        report.details = {"suspicious": suspicious.tolist(), "retained_pairs": len(retained),
                          "unrelated_level": level, "unfrozen": unfrozen, "token_rows": rows,
                          "screening": {"score_max": float(screening.score.max()),
                                        "score_at_cut": float(screening.score[suspicious[-1]]),
                                        "similarity_mean": float(screening.similarity.mean())}}
        if evaluation is not None:
            report.after = evaluation(student)
        report.seconds = time.perf_counter() - start
        self.report = report
        return student if isinstance(model, ImageText) else student.module

    def _unfreeze(self, student: ImageText, pairs: Pairs, suspicious: torch.Tensor
                  ) -> tuple[list[nn.Parameter], dict[str, int], list[int]]:
        """Make the ``unfreeze`` parameters trainable (token rows through a gradient mask); return them, the
        trainable count per parameter name, and the unlearned token ids."""
        self._handles = []
        params: list[nn.Parameter] = []
        unfrozen: dict[str, int] = {}
        rows: list[int] = []
        if "text" in self.config.unfreeze:
            name, embedding = token_embedding(student, pairs.tokens[:2])
            ids = pairs.tokens[suspicious].unique()
            ids = ids[ids < embedding.num_embeddings]
            mask = torch.zeros(embedding.num_embeddings, 1, device=embedding.weight.device)
            mask[ids.to(mask.device)] = 1.0
            embedding.weight.requires_grad_(True)
            self._handles.append(embedding.weight.register_hook(lambda grad: grad * mask.to(grad.dtype)))
            params.append(embedding.weight)
            rows = ids.tolist()
            unfrozen[f"{name}.weight"] = len(rows) * embedding.embedding_dim
        if "image" in self.config.unfreeze:
            for name, p in image_input_parameters(student, pairs.images[:2]).items():
                p.requires_grad_(True)
                params.append(p)
                unfrozen[name] = p.numel()
        return params, unfrozen, rows
