"""UBT and CleanCLIP on the image–text zoo: caption views, pair checks, which parameters UBT trains (fast); from an
empty cache, the suspicious set's precision, UBT's bar and UBT against CleanCLIP given clean pairs (slow); the real-
model paths: a Hugging Face CLIPModel (tiny, random) and an open_clip ViT-B-32 at 224 px (random, no download)."""

import statistics
import time

import pytest
import torch

from trojanguard.cleanse import UBT, CleanCLIP, Pairs, screen_pairs
from trojanguard.cleanse.ubt import image_input_parameters, token_embedding
from trojanguard.clip import TinyCLIP, digit_tokenizer
from trojanguard.clip.augment import caption_lengths, caption_views
from trojanguard.errors import DataError
from trojanguard.models import ImageText


def _tiny_pairs(n=32, seed=0):
    tokenizer = digit_tokenizer()
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 16, 16, generator=gen)
    tokens = tokenizer([f"a photo of the digit {name}" for name in ["zero", "one", "two", "three"] * (n // 4)])
    return tokenizer, images, tokens


def test_caption_views_edit_only_the_interior_and_keep_the_padding():
    _, _, tokens = _tiny_pairs(8)
    views = caption_views(tokens, torch.Generator().manual_seed(0), pad=0)
    lengths, view_lengths = caption_lengths(tokens, 0), caption_lengths(views, 0)
    assert (views[:, 0] == tokens[:, 0]).all()  # the start token stays
    for row in range(len(tokens)):
        end = int(view_lengths[row]) - 1
        assert views[row, end] == tokens[row, int(lengths[row]) - 1]  # the end token is the last before padding
        assert int(view_lengths[row]) in (int(lengths[row]), int(lengths[row]) - 1)  # swapped or one deleted
        kept = set(views[row, 1:end].tolist())
        assert kept <= set(tokens[row, 1 : int(lengths[row]) - 1].tolist())
    assert not torch.equal(views, tokens)


def test_pairs_refuse_bad_input_in_one_line():
    _, images, tokens = _tiny_pairs()
    for data, match in [((images, tokens[:5]), "one caption per image"), ((images, tokens.float()), "integer token ids"),
                        ((images * 3, tokens), r"\[0, 1\]"), ((images[:4], tokens[:4]), "too few"),
                        (images, "tuple"), ((images, tokens - 10), "non-negative")]:
        with pytest.raises(DataError, match=match) as info:
            Pairs(data)
        assert "\n" not in str(info.value)
    dataset = torch.utils.data.TensorDataset(images, tokens)
    assert len(Pairs(dataset)) == len(images)


def test_ubt_trains_only_the_suspicious_token_rows_and_the_image_input_embedding():
    """The unlearned copy differs from the model only in the token embedding rows of the suspicious captions and in
    the image tower's stem; the model handed in is unchanged."""
    tokenizer, images, tokens = _tiny_pairs(64)
    torch.manual_seed(0)
    model = TinyCLIP(len(tokenizer), context_length=tokenizer.context_length).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ubt = UBT(epochs=2, show_progress=False)
    cleansed = ubt.cleanse(model, (images, tokens))
    assert isinstance(cleansed, TinyCLIP) and cleansed is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    stem = next(iter(image_input_parameters(ImageText(model), images[:2])))
    changed = {k for k, v in cleansed.state_dict().items() if not torch.equal(before[k], v)}
    assert "token_embedding.weight" in changed and stem in changed
    assert changed <= {"token_embedding.weight", stem, stem.replace("weight", "bias")}
    rows = (cleansed.token_embedding.weight != before["token_embedding.weight"]).any(1).nonzero().squeeze(1)
    suspicious_ids = set(tokens[ubt.report.details["suspicious"]].unique().tolist())
    assert set(rows.tolist()) <= suspicious_ids
    assert ubt.report.details["unfrozen"]["token_embedding.weight"] == len(ubt.report.details["token_rows"]) * 64
    assert [row.epoch for row in ubt.report.epochs] == [1, 2] and "forget" in ubt.report.epochs[0].extras


def test_ubt_finds_the_embeddings_of_a_hugging_face_vit_clip():
    """A real (tiny, random) transformers CLIPModel: its token embedding by the ids it takes, its ViT's patch
    projection and position / class embeddings by what encode_image uses; both stages run."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={"vocab_size": 40, "eos_token_id": 2, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 12},
        vision_config={"image_size": 16, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2}, projection_dim=16)
    model = CLIPModel(config).eval()
    _, images, tokens = _tiny_pairs(32)
    kind = ImageText(model)
    name, embedding = token_embedding(kind, tokens[:2])
    assert name.endswith("text_model.embeddings.token_embedding") and embedding.num_embeddings == 40
    image_side = image_input_parameters(kind, images[:2])
    assert any("patch_embedding" in n for n in image_side) and any("position_embedding" in n for n in image_side)
    assert any("class_embedding" in n for n in image_side)
    ubt = UBT(epochs=1, batch_size=8, show_progress=False)
    cleansed = ubt.cleanse(model, (images, tokens))
    assert type(cleansed) is type(model) and len(ubt.report.details["suspicious"]) == 8


def _precision(entry, indices) -> float:
    truth = set(entry.poison_indices.tolist())
    return sum(int(i) in truth for i in indices) / len(indices)


@pytest.mark.slow
def test_the_suspicious_set_is_mostly_poisoned_pairs(clip_zoo, one_thread):
    """Issue 19's bar: precision ≥ 0.8 on the patch attack. Measured (seed 0): 1.000 on BadNet and blended (8 pairs)."""
    for attack, entry in clip_zoo.items():
        screening = screen_pairs(entry.model, (entry.images, entry.tokens), show_progress=False)
        precision = _precision(entry, screening.suspicious)
        print(f"\n{attack}: suspicious-set precision {precision:.3f} ({len(screening.suspicious)} pairs)")
        assert len(screening.suspicious) == 8 and precision >= 0.8
        assert screening.score[screening.suspicious].min() >= screening.score.median()


@pytest.mark.slow
def test_ubt_removes_the_patch_backdoor_and_keeps_clean_accuracy(clip_zoo, one_thread):
    """Issue 19's bar on the poisoned fine-tuning set itself: zero-shot ASR ≤ 5 % at a CA drop ≤ 1 point, under 3
    minutes; asserted on the median of three seeds (one seed's CA moves by a test image or two). Measured (one thread,
    seeds 0, 1, 2; ~5 s each): ASR 0.012 / 0.025 / 0.019, CA 0.981 → 0.972 / 0.978 / 0.978 (two threads: seed 0 ASR
    0.009)."""
    entry = clip_zoo["badnets"]
    runs = []
    for seed in range(3):
        start = time.perf_counter()
        ubt = UBT(seed=seed, show_progress=False)
        ubt.cleanse(entry.model, (entry.images, entry.tokens), evaluation=entry.evaluation())
        seconds = time.perf_counter() - start
        report = ubt.report
        runs.append((report.after["attack_success_rate"], report.before["clean_accuracy"] - report.after["clean_accuracy"]))
        print(f"\nseed {seed}: ASR {report.before['attack_success_rate']:.3f} -> {report.after['attack_success_rate']:.3f}, "
              f"CA {report.before['clean_accuracy']:.3f} -> {report.after['clean_accuracy']:.3f}, {seconds:.1f} s")
        assert seconds < 180
        assert report.after["attack_success_rate"] <= 0.2  # every seed removes most of it
    assert statistics.median(r[0] for r in runs) <= 0.05
    assert statistics.median(r[1] for r in runs) <= 0.01


@pytest.mark.slow
def test_ubt_matches_cleanclip_given_clean_pairs_on_the_patch_attack(clip_zoo, one_thread):
    """UBT on the poisoned set (no clean data) against CleanCLIP fine-tuning on 700 clean pairs at lr 1e-2, the rate
    that removes the backdoor at the least CA cost of those measured (docs/ubt.md): the backdoor removed (ASR ≤ 0.05,
    no more than five test images above CleanCLIP's) at equal or better CA. Measured (seed 0, one thread): UBT CA
    0.972, ASR 0.012; CleanCLIP CA 0.972, ASR 0.056 (two threads: UBT 0.972 / 0.009, CleanCLIP 0.967 / 0.090); on
    another machine's zoo model (2026-12-06) UBT 0.983 / 0.025, CleanCLIP 0.953 / 0.022 — which of the two ends lower
    moves with the machine, so it is not asserted."""
    entry = clip_zoo["badnets"]
    clean = torch.ones(len(entry.images), dtype=torch.bool)
    clean[entry.poison_indices] = False
    pick = clean.nonzero().squeeze(1)[torch.randperm(int(clean.sum()), generator=torch.Generator().manual_seed(0))[:700]]
    cleanclip = CleanCLIP(lr=1e-2, show_progress=False)
    cleanclip.cleanse(entry.model, (entry.images[pick], entry.tokens[pick]), evaluation=entry.evaluation())
    ubt = UBT(show_progress=False)
    ubt.cleanse(entry.model, (entry.images, entry.tokens), evaluation=entry.evaluation())
    u, c = ubt.report.after, cleanclip.report.after
    print(f"\nUBT CA {u['clean_accuracy']:.3f} ASR {u['attack_success_rate']:.3f}; CleanCLIP (700 clean pairs) CA "
          f"{c['clean_accuracy']:.3f} ASR {c['attack_success_rate']:.3f}")
    assert u["attack_success_rate"] <= min(0.05, c["attack_success_rate"] + 0.016)  # 0.016: five of 321 images
    assert u["clean_accuracy"] >= c["clean_accuracy"] - 0.005  # equal: within two test images of 359


@pytest.mark.slow
def test_an_open_clip_vit_b_32_goes_through_both_stages():
    """The real-model path: open_clip's ViT-B-32 with random weights (nothing downloaded) at 224 px, 32 pairs."""
    open_clip = pytest.importorskip("open_clip", reason="open_clip is not installed (pip install 'trojanguard[clip]')")
    from trojanguard.clip.loading import build_image_text, get_tokenizer

    torch.manual_seed(0)
    model = build_image_text("open_clip:ViT-B-32").eval()
    assert isinstance(model, open_clip.model.CLIP)
    tokenizer = get_tokenizer("open_clip:ViT-B-32")
    images = torch.rand(32, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    tokens = tokenizer([f"a photo of a {w}" for w in ["dog", "cat", "car", "tree"] * 8])
    start = time.perf_counter()
    ubt = UBT(epochs=1, batch_size=16, draws=2, show_progress=False)
    cleansed = ubt.cleanse(model, (images, tokens))
    seconds = time.perf_counter() - start
    print(f"\nopen_clip ViT-B-32, 224 px: {seconds:.1f} s for 32 pairs, {seconds / 32:.2f} s per pair; unfrozen "
          f"{ubt.report.details['unfrozen']}")
    assert isinstance(cleansed, open_clip.model.CLIP) and len(ubt.report.details["suspicious"]) == 8
    assert "token_embedding.weight" in ubt.report.details["unfrozen"]
    assert any(n.startswith("visual.conv1") for n in ubt.report.details["unfrozen"])
    assert "visual.positional_embedding" in ubt.report.details["unfrozen"]
    plain = open_clip.create_model("ViT-B-32", pretrained=None)  # the same weights, no normalisation inside
    plain.load_state_dict(model.state_dict())
    mean, std = torch.tensor(plain.visual.image_mean).view(1, 3, 1, 1), torch.tensor(plain.visual.image_std).view(1, 3, 1, 1)
    with torch.no_grad():  # the built model takes [0, 1] pixels and normalises them as open_clip's preprocessing does
        torch.testing.assert_close(model.eval().encode_image(images[:2]), plain.eval().encode_image((images[:2] - mean) / std))
