import json
import subprocess
import sys

from trojanguard.cli import main


def test_info_lists_backends(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["reference"] == []
    assert set(info["backends"]) == {"cuda", "triton", "cpp", "reference"}
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


def test_module_entry_point_and_bad_arguments():
    done = subprocess.run([sys.executable, "-m", "trojanguard", "demo", "--attacks", "nope"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "invalid choice" in done.stderr
