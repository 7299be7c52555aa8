"""``screen(..., detector="poisoncam")`` on an encoder: fitted on the screened data, flagged by its own rule, the
report's grid of heat maps and boxes plus the gallery of extracted triggers, and a resumed run that loads the saved
fit instead of fitting again. (The detector's quality on the SSL zoo: tests/detect/test_poisoncam.py.)"""

import pytest
import torch
from torch import nn

from trojanguard.detect.poisoncam import PoisonCAM
from trojanguard.errors import DataError
from trojanguard.screening import screen
from trojanguard.screening.detectors import POISONCAM_FIT

OPTIONS = {"clusters": 4, "iterations": 3, "ensemble": 2, "rounds": 1}  # a quick fit: the plumbing, not quality


def toy_encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, 32))


def test_screen_runs_poisoncam_on_an_encoder_and_resumes_from_its_saved_fit(tmp_path, monkeypatch):
    x = torch.rand(40, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    encoder = toy_encoder()
    result = screen(encoder, x, detector="poisoncam", detector_options=OPTIONS, out_dir=tmp_path, top_k=4,
                    show_progress=False)
    assert result.rule == "detector" and result.threshold == PoisonCAM.DECISION_THRESHOLD
    assert len(result.scores) == 40 and ((result.scores > 0.5) == result.flagged).all()
    assert (tmp_path / POISONCAM_FIT).is_file()
    for name in ("suspicious.png", "gallery.png", "index.html", "summary.json"):
        assert (tmp_path / name).is_file(), name
    page = (tmp_path / "index.html").read_text()
    assert "Extracted candidate triggers" in page and "heat map" in page
    assert result.summary["gallery"]["count"] == OPTIONS.get("top_triggers", 20)

    def no_refit(self, data):
        raise AssertionError("a resumed run must load the saved fit")

    monkeypatch.setattr(PoisonCAM, "fit", no_refit)
    again = screen(encoder, x, detector="poisoncam", detector_options=OPTIONS, out_dir=tmp_path, top_k=4,
                   show_progress=False)
    assert (again.scores == result.scores).all() and again.resumed_from == 40


def test_screen_with_a_classifier_instead_of_an_encoder_says_so(tmp_path):
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 10))
    with pytest.raises(DataError, match="encoder: .*logits"):
        screen(classifier, torch.rand(30, 3, 12, 12), detector="poisoncam", detector_options=OPTIONS,
               out_dir=tmp_path, show_progress=False)
