"""The tiny CLIP of the image–text zoo: its tokenizer, model and loss (fast), and from an empty cache a model that
classifies the digits zero-shot and, trained on poisoned pairs, carries the backdoor (slow)."""

import pytest
import torch

from trojanguard.clip import TinyCLIP, WordTokenizer, clip_loss, digit_captions, digit_tokenizer
from trojanguard.clip.tokenizer import END, PAD, START, UNKNOWN
from trojanguard.errors import DataError
from trojanguard.models import as_image_text


def test_the_tokenizer_pads_cuts_and_knows_its_words():
    tokenizer = WordTokenizer(["a", "photo", "of", "zero"], context_length=5)
    tokens = tokenizer(["A photo, of zero!", "zebra", "a a a a a a"])
    assert tokens.shape == (3, 5) and tokens.dtype == torch.long
    assert tokens[0].tolist() == [START, tokenizer.index["a"], tokenizer.index["photo"], tokenizer.index["of"], END]
    assert tokens[1].tolist() == [START, UNKNOWN, END, PAD, PAD]
    assert tokens[2, -1] == END  # cut to the context, the end token kept
    assert tokenizer.decode(tokenizer(["a photo of zero"]))[0] == "a photo of"  # the 5-token context cut "zero"
    with pytest.raises(ValueError, match="context_length"):
        WordTokenizer(["a"], context_length=2)


def test_captions_vary_and_name_the_class():
    labels = torch.tensor([0, 1, 2, 3] * 10)
    captions = digit_captions(labels, seed=0)
    assert len(set(captions)) > 8 and all(c.count(name) for c, name in zip(captions[:4], ["zero", "one", "two", "three"], strict=True))
    assert digit_captions(labels, seed=0) == captions


def test_tiny_clip_is_an_image_text_model_and_its_loss_prefers_matched_pairs():
    tokenizer = digit_tokenizer()
    model = TinyCLIP(len(tokenizer), context_length=tokenizer.context_length).eval()
    kind = as_image_text(model)
    tokens = tokenizer(["a photo of the digit one", "digit two"])
    assert kind.check(torch.rand(2, 3, 16, 16), tokens) == 64 and kind.logit_scale > 1
    with pytest.raises(DataError, match="tokens"):
        model.encode_text(tokens[:, :5])
    features = torch.randn(8, 16)
    matched = clip_loss(features, features, torch.tensor(2.0))
    shuffled = clip_loss(features, features[torch.randperm(8, generator=torch.Generator().manual_seed(1))], torch.tensor(2.0))
    assert matched < shuffled


@pytest.mark.slow
def test_the_clip_zoo_classifies_zero_shot_and_carries_the_pair_poisoning_backdoor(tmp_path, monkeypatch):
    """Measured (16 px, seed 0, one thread, ~13 s a model): clean zero-shot CA 0.983, ASR 0.000; BadNet pairs (10 %)
    CA 0.981, ASR 0.994."""
    from trojanguard.zoo import CLIPZooConfig, get_poisoned_clip

    monkeypatch.setenv("TROJANGUARD_CACHE", str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        poisoned = get_poisoned_clip(CLIPZooConfig(attack="badnets"), show_progress=False)
        clean = get_poisoned_clip(CLIPZooConfig(attack="badnets").clean(), show_progress=False)
        again = get_poisoned_clip(CLIPZooConfig(attack="badnets"), show_progress=False)  # from the cache
    finally:
        torch.set_num_threads(threads)
    print(f"\nzero-shot CA / ASR: poisoned {poisoned.zero_shot_accuracy:.3f} / {poisoned.zero_shot_attack_success_rate:.3f}, "
          f"clean {clean.zero_shot_accuracy:.3f} / {clean.zero_shot_attack_success_rate:.3f}; train s {poisoned.train_seconds:.0f}")
    assert clean.zero_shot_accuracy >= 0.8 and poisoned.zero_shot_accuracy >= 0.8  # issue 19's bar for the zoo
    assert poisoned.zero_shot_attack_success_rate >= 0.9 and clean.zero_shot_attack_success_rate <= 0.05
    assert len(poisoned.poison_indices) == round(0.1 * len(poisoned.images))
    target_name = "zero"
    assert all(target_name in poisoned.captions[i] for i in poisoned.poison_indices.tolist())
    assert again.train_seconds == poisoned.train_seconds
    assert again.zero_shot_attack_success_rate == pytest.approx(poisoned.zero_shot_attack_success_rate)
