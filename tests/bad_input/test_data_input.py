"""Issue 13, data slice: image files of every PIL mode, EXIF orientation, ``--image-size`` for every source,
bad folders and ``.npz`` files, and ``results.csv`` cells that a spreadsheet or ``pandas`` would misread."""

from __future__ import annotations

import csv
import io
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from trojanguard.data import load_image_folder, load_npz
from trojanguard.data.user import read_image
from trojanguard.errors import DataError
from trojanguard.models import build_model, save_model
from trojanguard.screening import screen
from trojanguard.screening.records import CELLS_KEY, PANDAS_READ_OPTIONS, ResultsFile, header_line
from trojanguard.screening.sources import NpzSource, open_source

HYPOTHESIS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_model(build_model("small_cnn", num_classes=4).eval(), path)
    return path


def screen_argv(model_file, data, out, *extra):
    return ["screen", "--model", model_file, "--arch", "small_cnn", "--num-classes", "4", "--data", data,
            "--detector", "features", "--calibration", "none", "--out", out, "--no-report", *extra]


def save_png(path, array, mode=None):
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(path)
    return path


# ------------------------------------------------------------------------------------------------ image modes
def gray(value: int, dtype=np.uint8) -> np.ndarray:
    return np.full((12, 12), value, dtype=dtype)


def palette_with_transparency(path):
    image = Image.fromarray(gray(128)).convert("P")
    image.info["transparency"] = 0
    image.save(path, transparency=0)
    return path


MODE_CASES = {  # file written in that mode -> expected mean over the image read as 1 channel
    "L.png": (lambda p: save_png(p, gray(128)), 128 / 255),
    "LA.png": (lambda p: Image.fromarray(np.stack([gray(128), gray(40)], -1), "LA").save(p), 128 / 255),
    "P-transparency.png": (palette_with_transparency, 128 / 255),
    "RGBA.png": (lambda p: Image.fromarray(np.stack([gray(128)] * 3 + [gray(0)], -1), "RGBA").save(p), 128 / 255),
    "CMYK.jpg": (lambda p: Image.fromarray(gray(128)).convert("CMYK").save(p, quality=100), 128 / 255),
    "1-bit.png": (lambda p: Image.fromarray(np.tile([[0, 255], [255, 0]], (6, 6)).astype(np.uint8)).convert("1")
                  .save(p), 0.5),
    "I16.png": (lambda p: Image.fromarray(gray(32768, np.uint16)).save(p), 32768 / 65535),
    "I32.tif": (lambda p: Image.fromarray(gray(32768, np.int32)).save(p), 32768 / 65535),
    "F.tif": (lambda p: Image.fromarray(np.full((12, 12), 0.25, np.float32)).save(p), 0.25),
}


@pytest.mark.parametrize("name", sorted(MODE_CASES))
@pytest.mark.parametrize("channels", [1, 3])
def test_every_pil_mode_reads_to_its_real_brightness(tmp_path, name, channels):
    write, expected = MODE_CASES[name]
    write(tmp_path / name)
    x = read_image(tmp_path / name, 8, channels)
    assert x.shape == (channels, 8, 8) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    assert abs(x.mean().item() - expected) < 0.02, (name, x.mean().item())


def test_sixteen_bit_gradient_is_not_read_as_white(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    x = load_image_folder(tmp_path, size=32, channels=1).x
    assert abs(x.mean().item() - 0.5) < 0.01  # was 0.998: clipped at 255 of 65535


def test_float_and_32_bit_images_out_of_range_are_skipped_with_the_reason(tmp_path):
    Image.fromarray(np.full((8, 8), 3.0, np.float32)).save(tmp_path / "bright.tif")
    Image.fromarray(np.full((8, 8), 100_000, np.int32)).save(tmp_path / "deep.tif")
    save_png(tmp_path / "ok.png", gray(10))
    data = load_image_folder(tmp_path, size=8)
    assert len(data) == 1
    reasons = dict(data.skipped)
    assert "expected values in [0, 1]" in reasons[str(tmp_path / "bright.tif")]
    assert "expected 16-bit values" in reasons[str(tmp_path / "deep.tif")]


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((16, 32), np.uint8)
    stored[:, 16:] = 255  # stored: left half black, right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": the black left half ends on top
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    x = read_image(tmp_path / "phone.jpg", 16, 1)[0]
    assert x[:6].mean() < 0.1 and x[-6:].mean() > 0.9, x.mean(dim=1)


# ------------------------------------------------------------------------------------------------ --image-size
def test_image_size_means_the_same_for_arrays_tensors_and_folders(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=x)
    (tmp_path / "folder").mkdir()
    save_png(tmp_path / "folder" / "0.png", x[0])
    assert open_source(tmp_path / "a.npz").read(0, 1).x.shape[-1] == 28  # default: the array's own size
    assert open_source(tmp_path / "folder").read(0, 1).x.shape[-1] == 32  # default for files: 32
    for data in (tmp_path / "a.npz", tmp_path / "folder", torch.rand(2, 3, 28, 28), "digits"):
        assert open_source(data, image_size=12).read(0, 1).x.shape[-2:] == (12, 12), data
    assert load_npz(tmp_path / "a.npz", size=12).x.shape == (3, 3, 12, 12)
    streamed = open_source(tmp_path / "a.npz", image_size=12)
    assert torch.allclose(streamed.read(0, 3).x, load_npz(tmp_path / "a.npz", size=12).x)
    assert streamed.fingerprint()["size"] == 12 and "size" not in open_source(tmp_path / "a.npz").fingerprint()


def test_cli_image_size_resizes_an_npz(tmp_path, cli, model_file):
    np.savez(tmp_path / "a.npz", x=np.random.default_rng(0).integers(0, 256, (6, 28, 28, 3), dtype=np.uint8))
    result = cli(*screen_argv(model_file, tmp_path / "a.npz", tmp_path / "out", "--image-size", "16"))
    assert result.code == 0, result.err
    assert "resized to 16 × 16" in result.out


@pytest.mark.parametrize("value", ["0", "-3", "big"])
def test_cli_image_size_must_be_a_positive_integer(tmp_path, cli, expect_error, model_file, value):
    result = cli(*screen_argv(model_file, "digits", tmp_path / "out", "--image-size", value))
    expect_error(result, 2, "--image-size", "positive integer")


# ------------------------------------------------------------------------------------------------ bad folders
def make_bad_data(root, kind):
    """A path of bad data of ``kind``; returns (path, words the one error line must hold)."""
    rng = np.random.default_rng(0)
    images = rng.random((4, 3, 8, 8)).astype(np.float32)
    if kind == "missing":
        return root / "nowhere", ["nowhere", "neither an existing file or folder"]
    if kind == "empty-folder":
        (root / "empty").mkdir()
        return root / "empty", ["empty", "holds no image files", "an empty folder"]
    if kind == "no-image-files":
        (root / "texts").mkdir()
        (root / "texts" / "a.txt").write_text("hi")
        return root / "texts", ["texts", "holds no image files", "1 files, none with an image suffix"]
    if kind == "unreadable-folder":
        (root / "broken").mkdir()
        for i in range(4):
            (root / "broken" / f"{i}.png").write_bytes(b"not a png")
        return root / "broken", ["broken", "none of 4 image files could be read", "0.png: UnidentifiedImageError",
                                 "1 more"]
    if kind == "file-not-npz":
        save_png(root / "one.png", (images[0, 0] * 255).astype(np.uint8))
        return root / "one.png", ["one.png", "not an .npz"]
    if kind == "folder-named-npz":
        (root / "dir.npz").mkdir()
        return root / "dir.npz", ["dir.npz", "expected an .npz file, got a folder"]
    path = root / f"{kind}.npz"
    if kind == "npz-without-x":
        np.savez(path, images=images)
        return path, [path.name, "no array named 'x'", "images"]
    if kind == "npz-int64":
        np.savez(path, x=images.astype(np.int64))
        return path, [path.name, "dtype int64"]
    if kind == "npz-3d":
        np.savez(path, x=images[:, 0])
        return path, [path.name, "expected 4 dimensions", "(4, 8, 8)"]
    if kind == "npz-5-channels":
        np.savez(path, x=np.zeros((2, 5, 8, 8), np.float32))
        return path, [path.name, "c in (1, 3)", "(2, 5, 8, 8)"]
    if kind == "npz-empty":
        np.savez(path, x=np.zeros((0, 3, 8, 8), np.float32))
        return path, [path.name, "at least one image"]
    if kind == "npz-range":
        np.savez(path, x=images * 3)
        return path, [path.name, "[0, 1]"]
    if kind == "npz-nan":
        images[0, 0, 0, 0] = np.nan
        np.savez(path, x=images)
        return path, [path.name, "nan"]
    if kind == "npz-truncated":
        np.savez(path, x=images)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return path, [path.name, "cannot be read"]
    if kind == "npz-corrupt-member":
        np.savez_compressed(path, x=rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8))
        raw = bytearray(path.read_bytes())
        raw[200:400] = bytes(200)  # inside the deflated member: the zip directory stays intact
        path.write_bytes(bytes(raw))
        return path, [path.name, "array 'x'", "expected"]
    if kind == "npz-object-labels":
        np.savez(path, x=images, y=np.array([{"a": 1}] * 4, dtype=object))
        return path, [path.name, "'y'"]
    raise AssertionError(kind)


BAD_DATA = ["missing", "empty-folder", "no-image-files", "unreadable-folder", "file-not-npz", "folder-named-npz",
            "npz-without-x", "npz-int64", "npz-3d", "npz-5-channels", "npz-empty", "npz-range", "npz-nan",
            "npz-truncated", "npz-corrupt-member", "npz-object-labels"]


@pytest.mark.parametrize("kind", BAD_DATA)
def test_screen_cli_names_the_bad_data(tmp_path, cli, expect_error, model_file, kind):
    path, words = make_bad_data(tmp_path, kind)
    expect_error(cli(*screen_argv(model_file, path, tmp_path / "out")), 1, *words)


@pytest.mark.parametrize("kind", ["unreadable-folder", "npz-truncated", "folder-named-npz"])
def test_screen_cli_names_the_bad_data_in_a_child_process(tmp_path, cli, expect_error, model_file, kind):
    path, words = make_bad_data(tmp_path, kind)
    expect_error(cli(*screen_argv(model_file, path, tmp_path / "out"), subprocess=True), 1, *words)


@pytest.mark.parametrize("kind", [k for k in BAD_DATA if k not in ("missing", "file-not-npz")])
def test_loaders_raise_a_data_error_naming_the_file(tmp_path, kind):
    path, words = make_bad_data(tmp_path, kind)
    load = load_npz if path.suffix == ".npz" else load_image_folder
    with pytest.raises(DataError) as caught:
        load(path)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word.lower() in message.lower(), (word, message)


def test_cleanse_cli_names_the_bad_data(tmp_path, cli, expect_error, model_file):
    argv = ["cleanse", "--model", model_file, "--arch", "small_cnn", "--num-classes", "4", "--epochs", "1",
            "--out", tmp_path / "c.safetensors", "--data"]
    for kind in ("unreadable-folder", "folder-named-npz", "npz-nan", "file-not-npz"):
        path, words = make_bad_data(tmp_path, kind)
        words = ["expected a folder, got a file"] if kind == "file-not-npz" else words
        expect_error(cli(*argv, path), 1, *words)
    assert not (tmp_path / "c.safetensors").exists()


def test_cd_run_on_an_unreadable_folder_keeps_every_row(tmp_path, cli, expect_error, model_file):
    path, _ = make_bad_data(tmp_path, "unreadable-folder")
    argv = screen_argv(model_file, path, tmp_path / "out", "--steps", "2")
    argv[argv.index("features")] = "cd"
    expect_error(cli(*argv), 1, "none of the 4 samples could be screened", "results.csv")
    rows = ResultsFile(tmp_path / "out" / "results.csv").read()[1]
    assert rows.ids == ["0.png", "1.png", "2.png", "3.png"] and all("UnidentifiedImageError" in e for e in rows.errors)


# ------------------------------------------------------------------------------------------------ results.csv
AWKWARD_IDS = ["#x.png", "=HYPERLINK(\"http://x\")", "+1", "-2", "@SUM(A1)", "\tx", "\rx", "'quoted", "''", "plain.png",
               "a,b\"c", "NA", "None", "null", "007", "", "line\nbreak"]


def write_rows(path, ids):
    results = ResultsFile(path)
    results.create({"run": {"x": 1}, "threshold": None})
    n = len(ids)
    results.append(0, ids, ids, list(range(n)), [0.5] * n, [None] * n, [""] * (n - 1) + ["=error"])
    return results


def test_results_cells_are_formula_safe_and_read_back_exactly(tmp_path):
    results = write_rows(tmp_path / "results.csv", AWKWARD_IDS)
    meta, rows = results.read()
    assert rows.ids == AWKWARD_IDS and rows.labels == AWKWARD_IDS and rows.errors[-1] == "=error"
    assert meta[CELLS_KEY] == "formula-safe"
    with open(tmp_path / "results.csv", encoding="utf-8", newline="") as f:
        text = f.read()
    cells = [row[1] for row in csv.reader(io.StringIO(text.split("\n", 2)[2], newline=""))]
    for original, cell in zip(AWKWARD_IDS, cells):
        assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell
        assert cell.removeprefix("'") == original


def test_results_read_back_exactly_with_the_documented_pandas_call(tmp_path):
    pandas = pytest.importorskip("pandas")
    write_rows(tmp_path / "results.csv", AWKWARD_IDS)
    frame = pandas.read_csv(tmp_path / "results.csv", **PANDAS_READ_OPTIONS)
    assert len(frame) == len(AWKWARD_IDS)
    assert [cell.removeprefix("'") for cell in frame["id"]] == AWKWARD_IDS
    assert frame["score"].iloc[:-1].tolist() == [0.5] * (len(AWKWARD_IDS) - 1) and frame["score"].isna().iloc[-1]
    assert frame["predicted"].dtype.kind in "if" and frame["flagged"].isna().all()
    assert frame["error"].tolist() == [""] * (len(AWKWARD_IDS) - 1) + ["'=error"]


def test_results_of_an_earlier_version_are_read_as_is_and_upgraded_on_resume(tmp_path):
    path = tmp_path / "results.csv"
    old_ids = ["=old", "'kept quote", "plain"]
    lines = [header_line({"format": 1, "run": {"x": 1}, "threshold": None}).rstrip("\n"),
             "index,id,label,predicted,score,flagged,error"]
    lines += [f"{i},{sample_id},,1,0.25,," for i, sample_id in enumerate(old_ids)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    results = ResultsFile(path)
    assert results.read()[1].ids == old_ids  # no unescaping of a file that was never escaped
    meta, rows = results.read(repair=True)  # what a resumed run does: the file is upgraded before appending
    assert rows.ids == old_ids and meta[CELLS_KEY] == "formula-safe"
    results.append(3, ["=new"], [""], [2], [0.5], [None], [""])
    assert results.read()[1].ids == [*old_ids, "=new"]
    assert "\n3,'=new," in path.read_text(encoding="utf-8")


def test_screening_a_folder_of_awkward_names_resumes_from_an_old_results_file(tmp_path, model_file):
    from trojanguard.models import load_model

    names = ["#a.png", "=b.png", "+c.png", "-d.png", "@e.png", "f.png"]
    (tmp_path / "data").mkdir()
    for i, name in enumerate(names):
        save_png(tmp_path / "data" / name, np.full((8, 8, 3), 40 * i, np.uint8))
    model = load_model(model_file, "small_cnn", num_classes=4)
    kwargs = {"detector": "features", "out_dir": tmp_path / "out", "calibration": None, "image_size": 8,
              "report": False, "show_progress": False, "batch_size": 2}
    first = screen(model, tmp_path / "data", **kwargs)
    assert sorted(first.ids) == sorted(names)
    path = first.results_path
    header, columns, *rows = path.read_text(encoding="utf-8").splitlines()
    meta = __import__("json").loads(header.split(" ", 2)[2])
    del meta[CELLS_KEY], meta["complete"]
    old = [header_line(meta).rstrip("\n"), columns] + [row.replace(",'", ",", 1) for row in rows[:3]]
    path.write_text("\n".join(old) + "\n", encoding="utf-8")  # an earlier version's file, stopped after 3 rows
    second = screen(model, tmp_path / "data", **kwargs)
    assert second.resumed_from == 3 and second.ids == first.ids
    np.testing.assert_allclose(second.scores, first.scores, rtol=1e-5)


def test_calibration_ids_are_formula_safe_too(tmp_path, model_file):
    from trojanguard.models import load_model

    (tmp_path / "clean").mkdir()
    for i, name in enumerate(["=a.png", "+b.png", "c.png", "@d.png"]):
        save_png(tmp_path / "clean" / name, np.full((8, 8, 3), 50 * i, np.uint8))
    model = load_model(model_file, "small_cnn", num_classes=4)
    screen(model, tmp_path / "clean", detector="features", out_dir=tmp_path / "out", calibration=tmp_path / "clean",
           fpr=0.25, image_size=8, report=False, show_progress=False)
    rows = list(csv.reader(io.StringIO((tmp_path / "out" / "calibration.csv").read_text(encoding="utf-8"))))[2:]
    assert sorted(row[1] for row in rows) == sorted(["'=a.png", "'+b.png", "c.png", "'@d.png"])


# ------------------------------------------------------------------------------------------------ properties
DTYPES = [np.uint8, np.uint16, np.int16, np.int64, np.float16, np.float32, np.float64, np.bool_, np.complex64]


@st.composite
def user_arrays(draw):
    """(array, cut, compressed, valid): ``valid`` arrays are a documented layout with values in range and must
    load; the others are random shapes, dtypes and values (NaN, inf, out of range), maybe truncated at ``cut``."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    n, c, h, w = (draw(st.integers(1, 4)), draw(st.sampled_from([1, 3])), draw(st.integers(1, 5)),
                  draw(st.integers(1, 5)))
    compressed = draw(st.booleans())
    if draw(st.booleans()):
        dtype = np.dtype(draw(st.sampled_from([np.uint8, np.float16, np.float32, np.float64])))
        if dtype == np.uint8:
            return rng.integers(0, 256, (n, h, w, c), dtype=np.uint8), None, compressed, True
        return rng.random((n, c, h, w)).astype(dtype), None, compressed, True
    ndim = draw(st.integers(1, 5))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim)))
    if ndim == 4 and draw(st.booleans()):
        shape = draw(st.sampled_from([(n, c, h, w), (n, h, w, c)]))
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    special = draw(st.sampled_from([None, np.nan, np.inf, -np.inf, -0.5, 1.5, 255.0]))
    values = rng.random(shape) * draw(st.sampled_from([1.0, 255.0, 1000.0]))
    if special is not None and values.size:
        values.flat[rng.integers(values.size)] = special
    with np.errstate(invalid="ignore", over="ignore"):
        array = values.astype(dtype)
    return array, draw(st.one_of(st.none(), st.floats(0.0, 0.999))), compressed, False


def check_loaded(data, array):
    assert data.x.dim() == 4 and data.x.dtype == torch.float32 and data.x.shape[1] in (1, 3)
    assert data.x.shape[0] == array.shape[0] and data.x.shape[0] > 0
    assert torch.isfinite(data.x).all() and data.x.min() >= 0 and data.x.max() <= 1


@HYPOTHESIS
@given(case=user_arrays())
def test_npz_loaders_give_images_in_range_or_a_data_error(tmp_path, case):
    array, cut, compressed, valid = case
    path = tmp_path / "random.npz"
    (np.savez_compressed if compressed else np.savez)(path, x=array)
    if cut is not None:
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * cut)])
    try:
        data = load_npz(path)
    except DataError:
        assert not valid, "a documented layout with values in range was refused"
        data = None
    else:
        check_loaded(data, array)
    try:
        source = NpzSource(path)
        streamed = torch.cat([batch.x for batch in source.batches(3)])
    except DataError:
        assert data is None or cut is not None  # the stream may fail where a whole load did too
    else:
        assert data is not None and torch.equal(streamed, data.x)
    for size in (None, 5):
        try:
            resized = load_npz(path, size=size)
        except DataError:
            continue
        if size:
            assert resized.x.shape[-2:] == (5, 5)
        check_loaded(resized, array)


IMAGE_MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]


@HYPOTHESIS
@given(mode=st.sampled_from(IMAGE_MODES), height=st.integers(1, 9), width=st.integers(1, 9),
       suffix=st.sampled_from([".png", ".tif", ".jpg", ".bmp", ".webp"]), cut=st.one_of(st.none(), st.floats(0, 0.99)),
       seed=st.integers(0, 2**16), channels=st.sampled_from([1, 3]))
def test_image_folders_give_images_in_range_or_a_data_error(tmp_path_factory, mode, height, width, suffix, cut,
                                                            seed, channels):
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(seed)
    base = {"I;16": rng.integers(0, 65536, (height, width)).astype(np.uint16),
            "I": rng.integers(-10, 70000, (height, width)).astype(np.int32),
            "F": (rng.random((height, width)) * 1.2 - 0.1).astype(np.float32)}.get(mode)
    image = Image.fromarray(base) if base is not None else Image.fromarray(
        rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
    path = root / f"image{suffix}"
    try:
        image.save(path)
    except (OSError, ValueError, KeyError):
        return  # PIL cannot write this mode in this format: nothing a user could hand in
    if cut is not None:
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * cut)])
    try:
        data = load_image_folder(root, size=6, channels=channels)
    except DataError as exc:
        assert "\n" not in str(exc) and str(root) in str(exc)
        assert cut is not None or mode in ("I", "F"), f"an intact {mode} {suffix} file was refused: {exc}"
        return
    assert data.x.shape == (1, channels, 6, 6)
    check_loaded(data, data.x)


def test_zip_without_an_npy_member_is_a_data_error(tmp_path):
    with zipfile.ZipFile(tmp_path / "odd.npz", "w") as archive:
        archive.writestr("x.npy", b"\x93NUMPY garbage")
    with pytest.raises(DataError, match="odd.npz"):
        load_npz(tmp_path / "odd.npz")
    with pytest.raises(DataError, match="odd.npz"):
        NpzSource(tmp_path / "odd.npz")
