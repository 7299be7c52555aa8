import numpy as np
import pytest
import torch
from PIL import Image

from trojanguard.data import (
    ImageDataset,
    load_digits,
    load_image_folder,
    load_npz,
    load_ood_crops,
    load_ood_source,
    load_procedural,
)
from trojanguard.errors import DataError


def test_digits_shape_range_and_deterministic_split():
    train, test = load_digits(size=32)
    assert len(train) + len(test) == 1797
    assert train.x.shape[1:] == (3, 32, 32) and train.x.dtype == torch.float32
    assert 0 <= train.x.min() and train.x.max() <= 1
    assert set(train.y.unique().tolist()) == set(range(10))
    again, _ = load_digits(size=32)
    assert torch.equal(train.x, again.x) and torch.equal(train.y, again.y)
    other, _ = load_digits(size=32, seed=1)
    assert not torch.equal(train.y, other.y)
    small, _ = load_digits(size=16, channels=1)
    assert small.x.shape[1:] == (1, 16, 16)


def test_colour_digits_vary_in_colour_keep_the_digit_and_are_deterministic():
    grey, _ = load_digits(size=16)
    colour, _ = load_digits(size=16, colour=True)
    assert colour.x.shape == grey.x.shape and torch.equal(colour.y, grey.y)
    assert 0 <= colour.x.min() and colour.x.max() <= 1
    assert (grey.x[:, 0] == grey.x[:, 1]).all()  # grey: R = G = B, the cue colour triggers would give away
    spread = colour.x.amax(1) - colour.x.amin(1)  # per-pixel colour spread
    assert spread.mean() > 0.2
    # the digit stays: ink pixels differ from paper pixels by at least the contrast, in each image
    ink, paper = grey.x[:, :1] > 0.7, grey.x[:, :1] < 0.05
    per_image = [(colour.x[i][:, ink[i, 0]].mean(1) - colour.x[i][:, paper[i, 0]].mean(1)).abs().mean()
                 for i in range(50)]
    assert min(per_image) > 0.2
    again, _ = load_digits(size=16, colour=True)
    assert torch.equal(colour.x, again.x)
    with pytest.raises(ValueError, match="channels"):
        load_digits(channels=1, colour=True)


def test_ood_crops_are_natural_images_of_requested_size():
    crops = load_ood_crops(n=20, size=24, seed=3)
    assert crops.x.shape == (20, 3, 24, 24) and crops.y is None
    assert crops.x.std() > 0.05  # real photo content, not blank
    assert torch.equal(crops.x, load_ood_crops(n=20, size=24, seed=3).x)
    with pytest.raises(DataError, match="n:"):
        load_ood_crops(n=0)


def _save_png(path, value, size=10):
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def _spectral_slope(x: torch.Tensor) -> torch.Tensor:
    """Per image: the slope of log power vs log radial frequency (natural images: about −2; 1/f^α noise: −2α)."""
    size = x.shape[-1]
    power = torch.fft.rfft2(x.mean(1)).abs().pow(2)
    radius = torch.sqrt(torch.fft.fftfreq(size)[:, None] ** 2 + torch.fft.rfftfreq(size)[None, :] ** 2)
    band = (radius > 0.05) & (radius < 0.4)
    logf, logp = radius[band].log(), power[:, band].log()
    logf = logf - logf.mean()
    return ((logp - logp.mean(1, keepdim=True)) * logf).sum(1) / (logf * logf).sum()


def test_procedural_images_are_seeded_in_range_and_natural_like():
    for kind in ("dead_leaves", "fractal"):
        x = load_procedural(kind, 64, size=32, seed=3).x
        assert x.shape == (64, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
        assert torch.equal(x, load_procedural(kind, 64, size=32, seed=3).x)
        assert not torch.equal(x, load_procedural(kind, 64, size=32, seed=4).x)
        assert load_procedural(kind, 5, size=16, channels=1).x.shape == (5, 1, 16, 16)
        slope = _spectral_slope(x)
        assert -6.0 < float(slope.median()) < -1.0, kind  # falls with frequency as natural images do (white: 0)
    fractal = load_procedural("fractal", 200, size=32, seed=0).x
    assert -5.5 < float(_spectral_slope(fractal).min()) and float(_spectral_slope(fractal).max()) < -1.5  # −2α, α ∈ [1, 2.5]
    leaves = load_procedural("dead_leaves", 32, size=32, seed=0).x
    flat = (leaves[..., 1:] == leaves[..., :-1]).all(1).float().mean()
    assert flat > 0.5  # opaque discs: most neighbouring pixels share one colour ...
    colours = [len(torch.unique(image.flatten(1), dim=1).T) for image in leaves]
    assert min(colours) >= 5  # ... and every image shows many discs


def test_strokes_are_thin_seeded_line_drawings():
    x = load_procedural("strokes", 300, size=32, seed=5).x
    assert x.shape == (300, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x, load_procedural("strokes", 300, size=32, seed=5).x)
    assert not torch.equal(x, load_procedural("strokes", 300, size=32, seed=6).x)
    background = x.flatten(2).median(-1).values[..., None, None]  # the flat background: most of every image
    stroke = (x - background).abs().amax(1) > 0.02
    share = stroke.flatten(1).float().mean(1)
    assert float(share.median()) < 0.35  # thin lines on a flat field, not a texture
    assert float((share > 0.02).float().mean()) > 0.95  # almost every image shows a stroke
    # thin (at most ~6 px wide): few stroke pixels sit inside a 7 x 7 square of stroke pixels (a blob's do)
    inside = -torch.nn.functional.max_pool2d(-stroke[:, None].float(), 7, stride=1, padding=3)
    assert float(inside.sum() / stroke.sum()) < 0.12  # measured 0.06 (dead leaves: 0.27)
    assert load_procedural("strokes", 3, size=64, channels=1).x.shape == (3, 1, 64, 64)


def test_ood_source_mixes_photo_crops_and_strokes():
    mixed = load_ood_source("photos+strokes", 40, size=16, seed=2).x
    photos = load_ood_crops(20, size=16, seed=2).x
    strokes = load_procedural("strokes", 20, size=16, seed=3).x
    assert mixed.shape == (40, 3, 16, 16)
    as_set = {tuple(img.flatten().tolist()) for img in torch.cat([photos, strokes])}
    assert {tuple(img.flatten().tolist()) for img in mixed} == as_set  # every half, each once, in a shuffled order
    assert not torch.equal(mixed[:20], photos)
    assert torch.equal(load_ood_source("photos", 7, size=16, seed=2).x, load_ood_crops(7, size=16, seed=2).x)
    assert len(load_ood_source("photos+strokes", 1, size=16)) == 1
    with pytest.raises(DataError, match="source: expected one of photos, dead_leaves, fractal, strokes, photos"):
        load_ood_source("noise", 4)


def test_procedural_bad_inputs():
    with pytest.raises(DataError, match="kind: expected one of dead_leaves, fractal, strokes, got 'waves'"):
        load_procedural("waves")
    with pytest.raises(DataError, match="n: expected a positive"):
        load_procedural("fractal", 0)
    with pytest.raises(DataError, match="channels"):
        load_procedural("fractal", 4, channels=2)
    with pytest.raises(DataError, match="size"):
        load_procedural("dead_leaves", 4, size=2)


def test_image_folder_with_classes_skips_corrupt_files(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            _save_png(tmp_path / cls / f"{i}.png", 40 * i)
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = tmp_path / "cat" / "0.png"
    (tmp_path / "cat" / "truncated.png").write_bytes(good.read_bytes()[:30])
    ds = load_image_folder(tmp_path, size=8)
    assert ds.x.shape == (6, 3, 8, 8)
    assert ds.y.tolist() == [0, 0, 0, 1, 1, 1] and ds.class_names == ["cat", "dog"]
    assert sorted(p.split("/")[-1] for p, _ in ds.skipped) == ["broken.png", "truncated.png"]


def test_flat_image_folder_has_no_labels(tmp_path):
    for i in range(2):
        _save_png(tmp_path / f"{i}.png", 255)
    ds = load_image_folder(tmp_path, size=4, channels=1)
    assert ds.y is None and ds.x.shape == (2, 1, 4, 4)
    assert torch.allclose(ds.x, torch.ones_like(ds.x))


def test_image_folder_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope")
    with pytest.raises(DataError, match="no image files"):
        load_image_folder(tmp_path)
    (tmp_path / "a.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="none of 1 image files"):
        load_image_folder(tmp_path)


def test_npz_uint8_nhwc_and_float_nchw(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(5))
    ds = load_npz(tmp_path / "a.npz")
    assert ds.x.shape == (5, 3, 8, 8)
    assert torch.allclose(ds.x[0, :, 1, 2] * 255, torch.tensor(x[0, 1, 2], dtype=torch.float32))
    assert ds.y.tolist() == list(range(5))
    np.savez(tmp_path / "b.npz", x=np.random.rand(4, 1, 6, 6).astype(np.float32))
    assert load_npz(tmp_path / "b.npz").y is None


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((2, 8, 8), np.uint8)}, "4 dimensions"),
        ({"x": np.zeros((2, 3, 8, 8), np.int32)}, "dtype int32"),
        ({"x": np.full((2, 3, 8, 8), 2.0, np.float32)}, r"values in \[0, 1\]"),
        ({"x": np.full((2, 3, 8, 8), np.nan, np.float32)}, "NaN"),
        ({"x": np.zeros((2, 8, 8, 5), np.uint8)}, "C in"),
        ({"x": np.zeros((2, 3, 8, 8), np.float32), "y": np.zeros(3, np.int64)}, "expected shape"),
        ({"x": np.zeros((2, 3, 8, 8), np.float32), "y": np.zeros(2, np.float32)}, "integer labels"),
        ({"images": np.zeros((2, 3, 8, 8), np.float32)}, "no array named 'x'"),
    ],
)
def test_npz_bad_inputs(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_npz(tmp_path / "bad.npz")


def test_npz_missing_and_corrupt(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_npz(tmp_path / "none.npz")
    (tmp_path / "c.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="cannot be read"):
        load_npz(tmp_path / "c.npz")


def test_image_dataset_validates():
    with pytest.raises(DataError, match="4 dimensions"):
        ImageDataset(torch.zeros(3, 8, 8))
    with pytest.raises(DataError, match="floating"):
        ImageDataset(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(DataError, match="expected shape"):
        ImageDataset(torch.zeros(2, 3, 8, 8), torch.zeros(3))
