"""trojanguard cleanse --method ubt / cleanclip: an image–text model file, its tokenizer by --arch, pairs from an
.npz or a folder with captions.csv; bad input is one error line."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from trojanguard.cli import main
from trojanguard.models import save_model


def _model_and_pairs(entry, tmp_path):
    model_path = save_model(entry.model, tmp_path / "clip.safetensors")
    pairs = tmp_path / "pairs.npz"
    images = (entry.images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    np.savez(pairs, images=images, captions=np.array(entry.captions))
    return model_path, pairs


@pytest.mark.slow
def test_ubt_command_cleanses_the_zoo_clip_and_writes_the_pair_scores(clip_zoo, tmp_path, capsys):
    entry = clip_zoo["badnets"]
    model_path, pairs = _model_and_pairs(entry, tmp_path)
    out = tmp_path / "cleansed.safetensors"
    rc = main(["cleanse", "--method", "ubt", "--model", str(model_path), "--arch", "tiny_clip", "--data", str(pairs),
               "--out", str(out), "--eval", "digits", "--attack", "badnets", "--seed", "0"])
    assert rc == 0 and out.is_file()
    report = json.loads((tmp_path / "cleansed.report.json").read_text())
    assert report["method"] == "UBT" and report["before"]["attack_success_rate"] > 0.9
    assert report["after"]["attack_success_rate"] <= 0.1 and len(report["details"]["suspicious"]) == 8
    with (tmp_path / "cleansed.pairs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(entry.images) and sum(int(r["suspicious"]) for r in rows) == 8
    flagged = {int(r["index"]) for r in rows if r["suspicious"] == "1"}
    assert len(flagged & set(entry.poison_indices.tolist())) >= 6
    assert "pair scores:" in capsys.readouterr().out


def test_cleanclip_command_reads_a_folder_with_captions(tmp_path, capsys):
    from trojanguard.clip.loading import build_image_text

    torch.manual_seed(0)
    model_path = save_model(build_image_text("tiny_clip"), tmp_path / "clip.safetensors")
    folder = tmp_path / "pairs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    with (folder / "captions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "caption"])
        for i in range(20):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            writer.writerow([f"{i}.png", f"a photo of the digit {['one', 'two'][i % 2]}"])
        writer.writerow(["missing.png", "a photo of the digit three"])
    out = tmp_path / "cleansed.safetensors"
    rc = main(["cleanse", "--method", "cleanclip", "--model", str(model_path), "--arch", "tiny_clip", "--data",
               str(folder), "--image-size", "16", "--epochs", "1", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0 and out.is_file() and "skipped 1 unreadable image" in captured.err
    assert json.loads((tmp_path / "cleansed.report.json").read_text())["images"] == 20


def test_image_text_commands_refuse_bad_input_in_one_line(tmp_path, capsys):
    from trojanguard.clip.loading import build_image_text

    model_path = save_model(build_image_text("tiny_clip"), tmp_path / "clip.safetensors")
    out = str(tmp_path / "out.safetensors")
    no_captions = tmp_path / "images.npz"
    np.savez(no_captions, images=np.zeros((20, 16, 16, 3), np.uint8))
    wrong_count = tmp_path / "count.npz"
    np.savez(wrong_count, images=np.zeros((20, 16, 16, 3), np.uint8), captions=np.array(["a digit"] * 3))
    base = ["cleanse", "--method", "ubt", "--model", str(model_path), "--out", out]
    for args, message in [
        (["--arch", "small_cnn", "--data", str(no_captions)], "--arch: UBT cleanses image–text models"),
        (["--arch", "tiny_clip", "--data", "digits"], "--data: UBT needs image–caption pairs"),
        (["--arch", "tiny_clip", "--data", str(no_captions)], "expected arrays 'images' and 'captions'"),
        (["--arch", "tiny_clip", "--data", str(wrong_count)], "expected 20 strings"),
        (["--arch", "tiny_clip", "--data", str(tmp_path / "nothing.npz")], "does not exist"),
        (["--arch", "open_clip:NoSuchNet", "--data", str(wrong_count)], "open_clip"),
    ]:
        rc = main([*base, *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc in (1, 2) and any(message in line for line in err), (args, err)
        assert not any(line.startswith("Traceback") for line in err)
