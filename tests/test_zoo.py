"""The zoo bar (issue 2): on digits with the small CNN, CA ≥ 0.95 and ASR ≥ 0.95 (SIG ≥ 0.8). The training time
(< 1 min each) is a benchmark figure (README, RESULTS.md), not a test: it moves with the machine and its load."""

import pytest
import torch

from trojanguard.zoo import ZooConfig, cache_dir, get_backdoored_model

BAR_ASR = {"badnets": 0.95, "blended": 0.95, "wanet": 0.95, "trojan": 0.95, "sig": 0.8}


@pytest.mark.slow
@pytest.mark.parametrize("attack", sorted(BAR_ASR))
def test_zoo_bar(attack):
    entry = get_backdoored_model(ZooConfig(attack=attack), show_progress=False)
    assert entry.clean_accuracy >= 0.95
    assert entry.attack_success_rate >= BAR_ASR[attack]


@pytest.mark.slow
def test_cache_is_reused_and_keyed_by_config():
    config = ZooConfig(attack="badnets")
    first = get_backdoored_model(config, show_progress=False)
    weights = cache_dir() / config.key() / "model.safetensors"
    written = weights.stat().st_mtime_ns
    entry = get_backdoored_model(config, show_progress=False)
    assert weights.stat().st_mtime_ns == written and entry.train_seconds == first.train_seconds  # loaded, not retrained
    assert all(torch.equal(a, b) for a, b in zip(entry.model.state_dict().values(), first.model.state_dict().values()))
    assert ZooConfig(attack="badnets", seed=1).key() != config.key()
    assert entry.clean_accuracy >= 0.95


def test_cache_key_follows_the_zoo_attack_defaults(monkeypatch):
    """A changed zoo setting of an attack is a new model, not the old cached one; other attacks keep their key."""
    from trojanguard import zoo

    wanet, badnets = ZooConfig(attack="wanet"), ZooConfig(attack="badnets")
    before = wanet.key(), badnets.key()
    monkeypatch.setitem(zoo.ZOO_ATTACK_DEFAULTS, "wanet", {"strength": 5.0})
    assert wanet.key() != before[0] and badnets.key() == before[1]


def test_cache_key_follows_an_attack_class_default(monkeypatch):
    """A changed default of the attack's own class is a new model too (a class default is not a zoo setting, and once
    reused a stale model whose ASR was then measured with the new trigger)."""
    from trojanguard import attacks
    from trojanguard.attacks import BadNets

    class WiderBadNets(BadNets):
        def __init__(self, size: float = 0.2, **kwargs):
            super().__init__(size=size, **kwargs)

    config = ZooConfig(attack="badnets")
    before = config.key()
    monkeypatch.setitem(attacks.ATTACKS, "badnets", WiderBadNets)
    assert config.make_attack().size == 0.2 and config.key() != before


def test_concurrent_callers_train_a_zoo_model_once(monkeypatch, tmp_path):
    """Two callers asking for one uncached model (test workers, Ray tasks) train it once: the second waits on the
    entry's lock and loads what the first wrote."""
    import threading
    import time

    from trojanguard import zoo

    monkeypatch.setenv("TROJANGUARD_CACHE", str(tmp_path))
    trainings = []

    def slow_training(model, *args, **kwargs):
        trainings.append(threading.get_ident())
        time.sleep(0.5)  # the second caller arrives while this one trains

    monkeypatch.setattr(zoo, "train_classifier", slow_training)
    config, entries = ZooConfig(attack="badnets", epochs=1), []
    callers = [threading.Thread(target=lambda: entries.append(get_backdoored_model(config, show_progress=False)))
               for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(trainings) == 1 and len(entries) == 2
    assert all(torch.equal(a, b) for a, b in zip(*(e.model.state_dict().values() for e in entries)))
