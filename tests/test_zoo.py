"""The zoo bar (issue 2): on digits with the small CNN, CA ≥ 0.95 and ASR ≥ 0.95 (SIG ≥ 0.8), < 1 min each."""

import time

import pytest

from trojanguard.zoo import ZooConfig, cache_dir, get_backdoored_model

BAR_ASR = {"badnets": 0.95, "blended": 0.95, "wanet": 0.95, "trojan": 0.95, "sig": 0.8}
TRAIN_SECONDS_LIMIT = 60


@pytest.mark.slow
@pytest.mark.parametrize("attack", sorted(BAR_ASR))
def test_zoo_bar(attack):
    entry = get_backdoored_model(ZooConfig(attack=attack), show_progress=False)
    assert entry.clean_accuracy >= 0.95
    assert entry.attack_success_rate >= BAR_ASR[attack]
    assert entry.train_seconds < TRAIN_SECONDS_LIMIT


@pytest.mark.slow
def test_cache_is_reused_and_keyed_by_config():
    config = ZooConfig(attack="badnets")
    get_backdoored_model(config, show_progress=False)
    start = time.perf_counter()
    entry = get_backdoored_model(config, show_progress=False)
    assert time.perf_counter() - start < 10  # loaded, not retrained
    assert (cache_dir() / config.key() / "model.safetensors").is_file()
    assert ZooConfig(attack="badnets", seed=1).key() != config.key()
    assert entry.clean_accuracy >= 0.95
