import json
import re
import subprocess
import sys

import pytest

from trojanguard.cli import main


def test_info_lists_backends(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["reference"] == []
    assert set(info["backends"]) == {"cuda", "triton", "cpp", "reference"}
    assert set(info["ops"]) >= {"mask_step"} and info["ops"]["mask_step"]["reference"] == []
    assert "torch" in info["versions"] and info["devices"][0] == "cpu"


def test_native_extension_and_kernels_package_import():
    """The extension loads (installed, or built just in time from a source tree) and the kernels package imports."""
    import trojanguard._kernels  # noqa: F401

    from trojanguard import _native

    assert "cuda" in _native.build_info()


def test_demo_prints_table_for_requested_attack(capsys, tmp_path):
    assert main(["demo", "--attacks", "badnets", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("badnets"))
    ca, asr = map(float, row.split()[2:4])
    assert ca >= 0.95 and asr >= 0.95
    cd = next(line for line in out.splitlines() if line.startswith("badnets") and line.split()[1] == "cd")
    assert float(cd.split()[4]) >= 0.9  # issue 3: CD AUROC on BadNets with the defaults
    # issue 4: the demo ends by exporting the guard and running it in ONNX Runtime
    assert (tmp_path / "guard-badnets.onnx").stat().st_size > 0
    flagged = next(line for line in out.splitlines() if line.startswith("flagged:"))
    numbers = [float(word.strip(",;")) for word in flagged.split() if word[0].isdigit()]
    clean_rate, triggered_rate, gap = numbers
    assert clean_rate <= 0.15 and triggered_rate >= 0.8 and gap < 1e-3
    bcu = next(line for line in out.splitlines() if line.startswith("badnets") and line.split()[1] == "bcu")
    ca_bcu, asr_bcu = map(float, bcu.split()[2:4])
    assert ca - ca_bcu <= 0.03 and asr_bcu <= 0.05  # issue 5's in-distribution bar


def test_module_entry_point_and_bad_arguments():
    done = subprocess.run([sys.executable, "-m", "trojanguard", "demo", "--attacks", "nope"],
                          check=False, capture_output=True, text=True)
    assert done.returncode == 2 and "invalid choice" in done.stderr


# ------------------------------------------------------------------------------------------------ cleanse


def _save_small_cnn(tmp_path):
    import torch

    from trojanguard.models import SmallCNN, save_model

    torch.manual_seed(0)
    return save_model(SmallCNN(), tmp_path / "suspicious.safetensors")


def test_cleanse_command_end_to_end(tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    from trojanguard.models import load_model

    model_path, out = _save_small_cnn(tmp_path), tmp_path / "out" / "cleansed.safetensors"
    rc = main(["cleanse", "--model", str(model_path), "--arch", "small_cnn", "--data", "ood", "--ood-images", "128",
               "--epochs", "2", "--batch-size", "32", "--out", str(out), "--eval", "digits", "--attack", "badnets"])
    assert rc == 0
    printed = capsys.readouterr()
    report = json.loads((tmp_path / "out" / "cleansed.report.json").read_text())
    assert report["method"] == "BCU" and report["images"] == 128 and len(report["epochs"]) == 2
    assert set(report["epochs"][-1]["metrics"]) == {"clean_accuracy", "attack_success_rate"}
    far = report["details"]["domain"] == "out-of-distribution"
    assert report["details"]["rule"] == ("adaptive" if far else "uniform") and report["details"]["data"] == "ood"
    assert report["details"]["ood"]["view"] and report["details"]["domain"] in ("in-distribution", "out-of-distribution")
    assert "epoch" in printed.out and "after:" in printed.out and "cleansed.report.json" in printed.out
    assert "128 unlabeled images" in printed.err
    assert set(load_file(str(out))) == set(load_model(model_path, "small_cnn").state_dict())  # plain tensors
    cleansed = load_model(out, "small_cnn")
    assert cleansed(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_cleanse_command_reads_npz_and_refuses_bad_input(tmp_path, capsys):
    import numpy as np

    model_path = _save_small_cnn(tmp_path)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "rgb.npz", x=rng.integers(0, 256, (120, 32, 32, 3), dtype=np.uint8))
    np.savez(tmp_path / "gray.npz", x=rng.integers(0, 256, (120, 32, 32, 1), dtype=np.uint8))
    out = tmp_path / "c.safetensors"
    args = ["cleanse", "--model", str(model_path), "--arch", "small_cnn", "--epochs", "1", "--out", str(out)]
    assert main([*args, "--data", str(tmp_path / "rgb.npz")]) == 0 and out.is_file()
    capsys.readouterr()
    assert main([*args, "--data", str(tmp_path / "gray.npz")]) == 1
    assert "3 input channels" in capsys.readouterr().err
    assert main([*args, "--data", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    bad_out = ["cleanse", "--model", str(model_path), "--arch", "small_cnn", "--data", "ood",
               "--out", str(tmp_path / "m.pkl")]
    assert main(bad_out) == 2 and ".safetensors" in capsys.readouterr().err
    wrong_arch = ["cleanse", "--model", str(model_path), "--arch", "resnet18_cifar", "--data", "ood", "--out", str(out)]
    assert main(wrong_arch) == 1 and "does not fit architecture" in capsys.readouterr().err
    assert main([*args, "--data", "ood:waves"]) == 1
    expected = ("--data: expected ood or ood:<source> with a source of photos, dead_leaves, fractal, strokes, "
                "photos+strokes, got 'ood:waves'")
    assert expected in capsys.readouterr().err
    assert main([*args, "--data", "ood:fractal", "--ood-images", "100", "--ood-view", "gap"]) == 0 and out.is_file()
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["details"]["data"] == "ood:fractal" and report["details"]["ood"]["source"] == "fractal"
    assert report["details"]["ood"]["view_rule"] == "gap"


def test_cleanse_command_defaults_match_bcu_and_bad_reinit_is_refused(tmp_path):
    from trojanguard.cleanse import CLEANSERS, BCUConfig
    from trojanguard.cli import build_parser

    args = build_parser().parse_args(["cleanse", "--model", "m.safetensors", "--arch", "small_cnn", "--data", "ood",
                                      "--out", "c.safetensors"])
    options = CLEANSERS["bcu"].options
    assert CLEANSERS["bcu"].config is BCUConfig
    assert {"epochs", "lr", "batch_size", "augment", "reinit", "seed"} <= set(options)
    assert not any(hasattr(args, k) for k in options)  # options not given: BCU keeps BCUConfig's defaults
    given = build_parser().parse_args(["cleanse", "--model", "m", "--arch", "a", "--data", "d", "--out", "o",
                                       *[arg for k in options for arg in (f"--{k.replace('_', '-')}",
                                                                          str(getattr(BCUConfig(), k)))]])
    assert {k: getattr(given, k) for k in options} == {k: getattr(BCUConfig(), k) for k in options}
    parsed = build_parser().parse_args(["cleanse", "--model", "m", "--arch", "a", "--data", "d", "--out", "o",
                                        "--reinit", "0.3", "--epochs", "2", "--norm-stats", "keep"])
    assert (parsed.reinit, parsed.epochs, parsed.norm_stats) == (0.3, 2, "keep")
    done = subprocess.run([sys.executable, "-m", "trojanguard", "cleanse", "--model", "m.safetensors", "--arch",
                           "small_cnn", "--data", "ood", "--out", str(tmp_path / "c.safetensors"), "--reinit", "lots"],
                          check=False, capture_output=True, text=True)
    assert done.returncode == 2 and "--reinit" in done.stderr and "ratio" in done.stderr


def test_cleanse_command_runs_mimic_on_an_encoder(tmp_path, capsys):
    import numpy as np
    import torch

    from trojanguard.models import SmallCNN, load_model, save_model
    from trojanguard.ssl import build_backbone

    torch.manual_seed(0)
    encoder = save_model(build_backbone("small_cnn"), tmp_path / "encoder.safetensors")
    np.savez(tmp_path / "clean.npz", x=torch.rand(64, 3, 16, 16).numpy())
    out = tmp_path / "cleansed.safetensors"
    rc = main(["cleanse", "--method", "mimic", "--model", str(encoder), "--arch", "small_cnn", "--data",
               str(tmp_path / "clean.npz"), "--epochs", "2", "--mi-epochs", "3", "--batch-size", "32", "--out", str(out),
               "--eval", "digits", "--attack", "badencoder", "--image-size", "16"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["method"] == "MIMIC" and report["images"] == 64 and len(report["epochs"]) == 2
    assert report["details"]["stages"] == ["features.0.2", "features.1.2", "features.2.2", "features"]
    assert set(report["after"]) == {"clean_accuracy", "attack_success_rate"}
    assert "with MIMIC on 64 unlabeled images" in printed.err
    assert load_model(out, "small_cnn")(torch.rand(2, 3, 16, 16)).shape == (2, 256)  # an encoder again
    classifier = save_model(SmallCNN(), tmp_path / "classifier.safetensors")  # BCU measures with classifier attacks
    assert main(["cleanse", "--model", str(classifier), "--arch", "small_cnn", "--data", "digits", "--out", str(out),
                 "--eval", "digits", "--attack", "badencoder"]) == 2
    assert "--attack: 'badencoder' is an SSL attack" in capsys.readouterr().err


HELP_COMMANDS = [[], ["info"], ["demo"], ["screen"], ["export"], ["cleanse"]]


def _help_text(capsys, *command: str) -> str:
    try:
        main([*command, "--help"])
    except SystemExit as exc:
        assert exc.code == 0, f"trojanguard {' '.join(command)} --help exited {exc.code}"
    else:
        raise AssertionError("--help did not exit")
    return capsys.readouterr().out


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: " ".join(c) or "top-level")
def test_help_is_plain_text(capsys, command):
    """--help is read by people: it exits 0 and shows no reStructuredText markup (``code``, :func:`name`)."""
    text = _help_text(capsys, *command)
    assert text.startswith("usage: trojanguard")
    assert "``" not in text and not re.search(r":[a-z]+:`", text), text


def test_help_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "trojanguard", "--help"], check=False, capture_output=True, text=True)
    assert done.returncode == 0 and "usage: trojanguard" in done.stdout and "``" not in done.stdout


def test_cleanse_method_choices_come_from_the_registry(capsys, monkeypatch):
    """A second cleanser is one registration: --method then offers it, with its summary in --help."""
    from trojanguard.cleanse import BCU, CLEANSERS, register_cleanser

    def squeezed(text: str) -> str:  # argparse wraps help lines, also at hyphens
        return "".join(text.split())

    assert "bcu" in CLEANSERS
    register_cleanser("plain", BCU, "plain distillation, for this test")
    try:
        text = squeezed(_help_text(capsys, "cleanse"))
    finally:
        del CLEANSERS["plain"]
    assert "--method{bcu,cleanclip,mimic,plain,ubt}" in text and squeezed("plain distillation, for this test") in text
    assert squeezed(CLEANSERS["bcu"].summary) in text
