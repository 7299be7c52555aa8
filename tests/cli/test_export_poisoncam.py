"""``trojanguard export --detector poisoncam``: an encoder's guard graph ``input -> (features, score, flagged)``,
from a saved PoisonCAM fit (what ``screen --detector poisoncam`` writes) or fitted on ``--reference``; the graph
scores as the detector does. (PoisonCAM's quality: tests/detect/test_poisoncam.py.)"""

import numpy as np
import pytest
import torch

from trojanguard.cli import main
from trojanguard.detect.poisoncam import PoisonCAM
from trojanguard.guard import GuardSession, check_triton_repository
from trojanguard.models import save_model
from trojanguard.ssl import build_backbone

QUICK = {"clusters": 4, "iterations": 3, "ensemble": 2, "rounds": 1}  # the plumbing, not quality


@pytest.fixture
def files(tmp_path):
    torch.manual_seed(0)
    encoder = build_backbone("small_cnn").eval()
    save_model(encoder, tmp_path / "encoder.safetensors")
    x = torch.rand(60, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    np.savez(tmp_path / "unlabeled.npz", x=x.numpy())
    return tmp_path, x


def command(tmp_path, *extra) -> list[str]:
    return ["export", "--model", str(tmp_path / "encoder.safetensors"), "--arch", "small_cnn", "--detector",
            "poisoncam", "--out", str(tmp_path / "guard.onnx"), *extra]


def test_export_writes_an_encoder_guard_from_a_saved_fit(files, capsys):
    from trojanguard.models import load_model

    tmp_path, x = files
    encoder = load_model(tmp_path / "encoder.safetensors", "small_cnn")
    detector = PoisonCAM(encoder, show_progress=False, **QUICK).fit(x)
    detector.save(tmp_path / "poisoncam_fit.safetensors")
    assert main(command(tmp_path, "--fit", str(tmp_path / "poisoncam_fit.safetensors"), "--triton-repo",
                        str(tmp_path / "repo"))) == 0, capsys.readouterr().err
    assert "poisoncam, threshold 0.5" in capsys.readouterr().out
    config = check_triton_repository(tmp_path / "repo")  # Triton's schema, checked against the graph's outputs
    assert [o.name for o in config.output] == ["features", "score", "flagged"]
    session = GuardSession(tmp_path / "guard.onnx")
    features, score, flagged = session.run(x[:8].numpy())
    assert np.allclose(features, encoder(x[:8]).detach().numpy(), atol=1e-5)
    assert np.allclose(score, detector.score(x[:8]).numpy(), atol=1e-5)
    assert (flagged == (score > 0.5)).all()
    # a calibrated threshold instead of the 0.5 rule
    np.savez(tmp_path / "clean.npz", x=torch.rand(100, 3, 16, 16).numpy())
    assert main(command(tmp_path, "--fit", str(tmp_path / "poisoncam_fit.safetensors"), "--calibration",
                        str(tmp_path / "clean.npz"), "--fpr", "0.1")) == 0
    assert "threshold 0.5," not in capsys.readouterr().out


def test_export_fits_poisoncam_on_the_reference_set(files, capsys, monkeypatch):
    tmp_path, x = files
    monkeypatch.setattr(PoisonCAM.__init__, "__kwdefaults__",
                        {**PoisonCAM.__init__.__kwdefaults__, **QUICK, "show_progress": False})
    assert main(command(tmp_path, "--reference", str(tmp_path / "unlabeled.npz"))) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "poisoncam" in out and "unlabeled.npz" in out
    features, score, flagged = GuardSession(tmp_path / "guard.onnx").run(x[:4].numpy())
    assert features.shape[0] == 4 and score.shape == (4,) and flagged.dtype == bool


def test_export_poisoncam_usage_errors_name_the_option(files, capsys):
    tmp_path, _ = files
    assert main(command(tmp_path)) == 2  # nothing to fit on and no saved fit
    assert "--reference" in capsys.readouterr().err
    argv = ["export", "--model", str(tmp_path / "encoder.safetensors"), "--arch", "small_cnn", "--fit", "x",
            "--out", str(tmp_path / "g.onnx")]
    assert main(argv) == 2
    assert "--fit" in capsys.readouterr().err and not (tmp_path / "g.onnx").exists()
    (tmp_path / "broken.safetensors").write_bytes(b"not a fit")
    assert main(command(tmp_path, "--fit", str(tmp_path / "broken.safetensors"))) == 1
    err = capsys.readouterr().err
    assert err.startswith("trojanguard export: error:") and "broken.safetensors" in err and len(err.splitlines()) == 1
