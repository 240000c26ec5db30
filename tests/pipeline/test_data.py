import numpy as np
import pytest
import torch
from PIL import Image

from diffmath.pipeline.data import (
    HELD_OUT_PER_CLASS,
    gaussian_mixture,
    load_data,
    load_digits,
    load_image_folder,
    swiss_roll,
)


def test_digits_split_and_grid():
    d = load_digits(8)
    assert d.train.shape == (1797 - 10 * HELD_OUT_PER_CLASS, 1, 8, 8)
    assert d.held_out.shape == (10 * HELD_OUT_PER_CLASS, 1, 8, 8)
    assert d.train.dtype == np.float32 and d.bins == 17
    # the 17-level grid {-1, -1 + 1/8, ..., 1}: 0..16 scaled by x/8 - 1
    levels = np.unique(np.concatenate([d.train.ravel(), d.held_out.ravel()]))
    np.testing.assert_array_equal(levels, np.arange(17) / 8.0 - 1.0)
    # stratified and fixed: 30 per class, the same on every call, no overlap with training
    assert np.all(np.bincount(d.labels_held_out, minlength=10) == HELD_OUT_PER_CLASS)
    d2 = load_digits(8)
    np.testing.assert_array_equal(d.held_out, d2.held_out)
    from sklearn.datasets import load_digits as sk

    raw = sk().images.reshape(len(sk().images), -1) / 8.0 - 1.0
    rows = {r.tobytes() for r in d.held_out.reshape(len(d.held_out), -1).astype(np.float64)}
    n_held = sum(r.tobytes() in rows for r in raw)
    assert n_held >= 10 * HELD_OUT_PER_CLASS  # (duplicates in the raw set can only add)


def test_digits_16_is_torch_bilinear_on_the_8bit_grid():
    d8, d16 = load_digits(8), load_digits(16)
    assert d16.train.shape[1:] == (1, 16, 16) and d16.bins == 256
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(d8.train[:50]).double(), scale_factor=2, mode="bilinear", align_corners=False
    ).numpy()
    ref = np.round((ref + 1) * 127.5) / 127.5 - 1
    np.testing.assert_allclose(d16.train[:50], ref, atol=1e-6)


def test_digits_bad_size():
    with pytest.raises(ValueError, match="image_size for the digits must be 8 or 16; got 32"):
        load_digits(32)


def _write_images(folder, n=5, size=(20, 12), mode="L"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(folder / f"img{i}.png")


def test_image_folder_grey_and_rgb(tmp_path):
    _write_images(tmp_path / "grey", 5, mode="L")
    d = load_image_folder(tmp_path / "grey", 8)
    assert d.train.shape[1:] == (1, 8, 8) and len(d.train) + len(d.held_out) == 5 and len(d.held_out) == 1
    assert d.train.min() >= -1 and d.train.max() <= 1 and d.bins == 256
    _write_images(tmp_path / "mixed" / "sub", 3, mode="RGB")
    _write_images(tmp_path / "mixed", 2, mode="L")
    d = load_image_folder(tmp_path / "mixed", 6)
    assert d.train.shape[1:] == (3, 6, 6) and len(d.train) + len(d.held_out) == 5


def test_image_folder_center_crop(tmp_path):
    # a 30x10 image whose middle 10x10 is white and the sides black: the crop keeps the middle
    a = np.zeros((10, 30), dtype=np.uint8)
    a[:, 10:20] = 255
    tmp_path.mkdir(exist_ok=True)
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(a).save(tmp_path / "b.png")
    d = load_image_folder(tmp_path, 10)
    x = np.concatenate([d.train, d.held_out])
    assert x.shape == (2, 1, 10, 10)
    assert np.all(x[:, :, :, 2:8] > 0.9)


def test_image_folder_corrupt_files_are_skipped_with_a_warning(tmp_path):
    _write_images(tmp_path, 3)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "notes.txt").write_text("ignored: not an image extension")
    with pytest.warns(UserWarning, match="broken.png"):
        d = load_image_folder(tmp_path, 8)
    assert len(d.train) + len(d.held_out) == 3
    assert any("broken.png" in s for s in d.info["skipped"])


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_data(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        load_image_folder(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="x.jpg"), pytest.raises(ValueError, match="could be read"):
        load_image_folder(bad)
    f = tmp_path / "file.png"
    f.write_bytes(b"")
    with pytest.raises(ValueError, match="must be a folder"):
        load_image_folder(f)


def test_toy_sets():
    for name, fn in (("swissroll", swiss_roll), ("gmm", gaussian_mixture)):
        d = load_data(name)
        assert d.kind == "toy" and d.bins is None
        assert d.train.shape == (10_000, 2) and d.held_out.shape == (2_000, 2)
        assert 0.3 < d.train.std() < 1.5
        assert not np.array_equal(d.train[:2000], d.held_out)
        np.testing.assert_array_equal(fn(100, 3), fn(100, 3))
    # the mixture: 8 modes on the unit circle with std 0.08
    x = gaussian_mixture(20_000, 1)
    r = np.linalg.norm(x, axis=1)
    assert abs(np.median(r) - 1.0) < 0.02


def _gradient16(h=16, w=16):
    """A 16-bit grey ramp over the whole range 0..65535 (with the end points)."""
    return np.round(np.linspace(0, 65535, h * w)).astype(np.uint16).reshape(h, w)


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16bit_png_is_scaled_not_clipped(tmp_path, mode):
    # issue 11, 6.3: Pillow's 16 -> 8-bit conversion clips; 98% of a 16-bit ramp loaded as +1.0
    a = _gradient16()
    im = Image.frombytes(mode, (16, 16), a.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    assert im.mode == mode
    im.save(tmp_path / "a.png")
    im.save(tmp_path / "b.png")
    assert Image.open(tmp_path / "a.png").mode.startswith("I")  # still 16 bits on disk
    d = load_image_folder(tmp_path, 16)
    x = np.concatenate([d.train, d.held_out])
    assert x.shape == (2, 1, 16, 16) and d.bins == 256
    # the reference: 0..65535 onto the 256 levels 0..255 by v * 255 / 65535, rounded, then x / 127.5 - 1
    ref = np.floor(a.astype(np.float64) * 255 / 65535 + 0.5) / 127.5 - 1
    np.testing.assert_allclose(x[0, 0], ref, atol=1e-6)
    assert x.min() == -1 and x.max() == 1 and (x == 1).mean() < 0.01
    assert len(np.unique(x)) == 256  # every level used, none saturated


def test_mode_I_images_are_16bit_or_refused():
    from diffmath.pipeline.data import to_8bit_grey

    a = _gradient16(4, 4).astype(np.int32)
    im = Image.frombytes("I", (4, 4), a.astype("<i4").tobytes())
    np.testing.assert_array_equal(np.asarray(to_8bit_grey(im)), np.floor(a * 255 / 65535 + 0.5).astype(np.uint8))
    big = Image.frombytes("I", (2, 1), np.array([0, 70000], "<i4").tobytes())
    with pytest.raises(ValueError, match="outside the 16-bit range"):
        to_8bit_grey(big)


def test_a_decompression_bomb_is_skipped_with_a_warning(tmp_path, monkeypatch):
    # issue 11, 6.4: one PIL.Image.DecompressionBombError aborted the whole folder with a traceback
    import warnings

    _write_images(tmp_path, 3, size=(8, 8))
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "bomb.png")  # 4096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # > 2x the limit: DecompressionBombError
    with pytest.warns(UserWarning, match=r"bomb.png.*DecompressionBombError"):
        d = load_image_folder(tmp_path, 8)
    assert len(d.train) + len(d.held_out) == 3 and any("bomb.png" in s for s in d.info["skipped"])
    # between 1x and 2x the limit Pillow only warns; where warnings are errors, the file is skipped too
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    with pytest.warns(UserWarning, match=r"bomb.png.*DecompressionBombWarning"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            d = load_image_folder(tmp_path, 8)
    assert len(d.train) + len(d.held_out) == 3
