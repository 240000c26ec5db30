"""Training data: the embedded handwritten digits, a folder of images, and 2-D toy sets.

Every loader returns a ``Data`` bundle of float32 numpy arrays scaled to the model's range:

- **digits** (the default, no download): scikit-learn's copy of the UCI handwritten digits,
  1,797 real 8x8 grey images with integer values 0..16 (``sklearn.datasets.load_digits``),
  scaled by x / 8 - 1 to the 17-level grid {-1, -1 + 1/8, ..., 1}. A fixed, stratified
  split keeps 300 images (30 per class; ``HELD_OUT_PER_CLASS``) as the held-out set
  used for the Fréchet-distance floor and the test VLB; the other 1,497 are for training.
  ``image_size=16`` upsamples bilinearly by 2 and rounds to the 8-bit grid of 256 levels,
  so the VLB's discretized decoder uses ``bins=256`` there and ``bins=17`` at 8x8.
- **a folder** of PNG/JPEG/BMP/GIF/WebP images (searched recursively): each is resized so
  its short side is ``image_size`` (Lanczos) and center-cropped to a square; the folder is
  grey (1 channel) when every image is grey, RGB otherwise; values x / 127.5 - 1 (256
  levels). 16-bit grey images (Pillow modes I;16, I;16B, I;16L, and I as older Pillow reads
  16-bit PNGs) are scaled from their range 0..65535 to 0..255 (round(v / 257)), not clipped
  the way Pillow's own conversion to 8 bits is. Unreadable or corrupt files, decompression
  bombs (``PIL.Image.DecompressionBombError``, or ``DecompressionBombWarning`` turned into an
  error), and mode-I images with values outside 0..65535 are **skipped with a warning naming the
  file**; if none is left, ``ValueError``. A missing path raises ``FileNotFoundError``, a folder with
  no image files ``ValueError``. 10% of the images (at least one, when there are two or
  more) are held out, by a fixed seeded permutation.
- **swissroll** and **gmm**: 2-D point clouds of roughly unit scale (continuous, no bins),
  10,000 training points and 2,000 held-out ones, each from its own fixed seed.

Class labels (for ``diffmath train --conditional``): the digits carry their digit 0-9; the
gmm points the index of the mixture component each was drawn from (8 classes "0".."7"); a
folder laid out as torchvision's ``ImageFolder`` expects, ``root/<class>/**/<image>``, labels
each image by its top-level sub-folder, the classes being the sub-folder names in sorted
order (``find_classes``: class index i is the i-th name). A folder with images directly in it
(outside every sub-folder), or a class sub-folder with no readable image, has no labels; so
has the swiss roll. ``Data.class_names`` names the classes (empty when there are no labels).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "Data",
    "load_data",
    "load_digits",
    "load_image_folder",
    "swiss_roll",
    "gaussian_mixture",
    "gmm_means",
    "folder_labels",
    "IMAGE_EXTENSIONS",
    "TOY_DATASETS",
    "HELD_OUT_PER_CLASS",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
TOY_DATASETS = ("swissroll", "gmm")
HELD_OUT_PER_CLASS = 30
GMM_MODES = 8
_SPLIT_SEED = 20240531  # the digits split and the toy sets are fixed: never change these
_TOY_TRAIN, _TOY_HELD = 10_000, 2_000


@dataclass
class Data:
    """A training set and its held-out set.

    train, held_out: float32 arrays, (N, C, H, W) for images, (N, 2) for toy data, in [-1, 1]
    for images. labels_*: integer class labels (digits only). bins: the number of
    discrete levels per value ([-1, 1] grid) for the VLB's decoder, or None for continuous
    data. kind: "image" or "toy".
    """

    name: str
    kind: str
    train: np.ndarray
    held_out: np.ndarray
    bins: int | None
    labels_train: np.ndarray | None = None
    labels_held_out: np.ndarray | None = None
    info: dict = field(default_factory=dict)
    class_names: tuple = ()

    @property
    def shape(self) -> tuple:
        """The shape of one sample: (C, H, W) or (2,)."""
        return tuple(self.train.shape[1:])


def load_data(spec: str, image_size: int = 8) -> Data:
    """``spec`` = "digits", "swissroll", "gmm", or the path of a folder of images."""
    if spec == "digits":
        return load_digits(image_size)
    if spec == "swissroll":
        return Data(
            "swissroll", "toy", swiss_roll(_TOY_TRAIN, _SPLIT_SEED), swiss_roll(_TOY_HELD, _SPLIT_SEED + 1), None
        )
    if spec == "gmm":
        (tr, ytr), (ho, yho) = (
            gaussian_mixture(n, seed, return_labels=True)
            for n, seed in ((_TOY_TRAIN, _SPLIT_SEED), (_TOY_HELD, _SPLIT_SEED + 1))
        )
        return Data("gmm", "toy", tr, ho, None, ytr, yho, class_names=tuple(str(k) for k in range(GMM_MODES)))
    return load_image_folder(spec, image_size)


def _check_image_size(image_size):
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer; got {image_size!r}")


def load_digits(image_size: int = 8) -> Data:
    """The 1,797 scikit-learn digits as (N, 1, S, S) in [-1, 1], split 1,497 / 300 (fixed)."""
    from sklearn.datasets import load_digits as _sk_load_digits

    if image_size not in (8, 16):
        raise ValueError(f"image_size for the digits must be 8 or 16; got {image_size!r}")
    d = _sk_load_digits()
    x = d.images.astype(np.float64) / 8.0 - 1.0  # 0..16 -> [-1, 1]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(_SPLIT_SEED)
    held = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        held[rng.choice(idx, HELD_OUT_PER_CLASS, replace=False)] = True
    bins = 17
    if image_size == 16:
        x = _upsample2_bilinear(x)
        x = np.round((x + 1.0) * 127.5) / 127.5 - 1.0  # the 8-bit grid
        bins = 256
    x = x[:, None].astype(np.float32)
    return Data(
        "digits",
        "image",
        x[~held],
        x[held],
        bins,
        y[~held],
        y[held],
        info={"source": "sklearn.datasets.load_digits", "levels": bins},
        class_names=tuple(str(c) for c in range(10)),
    )


def _upsample2_bilinear(x: np.ndarray) -> np.ndarray:
    """Bilinear 2x upsampling of (N, H, W) with half-pixel centres and edge clamping
    (torch's ``interpolate(..., align_corners=False)``): output pixel 2i+a samples input
    position i - 1/4 (a = 0) or i + 1/4 (a = 1)."""

    def up(a, axis):
        n = a.shape[axis]
        idx = np.arange(n)
        prev = np.take(a, np.clip(idx - 1, 0, n - 1), axis=axis)
        nxt = np.take(a, np.clip(idx + 1, 0, n - 1), axis=axis)
        even = 0.75 * a + 0.25 * prev
        odd = 0.75 * a + 0.25 * nxt
        out = np.stack([even, odd], axis=axis + 1)
        shape = list(a.shape)
        shape[axis] = 2 * n
        return out.reshape(shape)

    return up(up(x, 1), 2)


def load_image_folder(path, image_size: int = 32, held_out_fraction: float = 0.1) -> Data:
    """Images under ``path`` (recursively), resized (short side to ``image_size``, Lanczos)
    and center-cropped, as (N, C, S, S) float32 in [-1, 1] with C = 1 if all are grey, else 3.

    Unreadable/corrupt files are skipped with a ``UserWarning`` naming each; ``ValueError``
    if no image is left, ``FileNotFoundError`` if ``path`` does not exist.
    """
    from PIL import Image, UnidentifiedImageError

    _check_image_size(image_size)
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(
            f"--data {str(path)!r}: no such file or folder (use digits, swissroll, gmm or a folder of images)"
        )
    if not root.is_dir():
        raise ValueError(f"--data {str(path)!r} must be a folder of images (or digits, swissroll, gmm); it is a file")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(
            f"the folder {str(path)!r} holds no image files (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)"
        )
    images, modes, skipped, kept = [], [], [], []
    unreadable = (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    )  # the warning is raised only where warnings are errors
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                grey = im.mode in ("1", "L", "LA", "F") or im.mode in SIXTEEN_BIT_MODES
                im = to_8bit_grey(im) if im.mode in SIXTEEN_BIT_MODES else im.convert("L" if grey else "RGB")
                images.append(_resize_center_crop(im, image_size))
                modes.append(grey)
                kept.append(f)
        except unreadable as e:
            skipped.append(str(f))
            warnings.warn(f"skipping unreadable image {str(f)!r}: {type(e).__name__}: {e}", UserWarning, stacklevel=2)
    if not images:
        raise ValueError(
            f"none of the {len(files)} image files in {str(path)!r} could be read (all were skipped as corrupt)"
        )
    all_grey = all(modes)
    arrs = []
    for im in images:
        a = np.asarray(im.convert("L" if all_grey else "RGB"), dtype=np.float32)
        arrs.append(a[None] if all_grey else a.transpose(2, 0, 1))
    x = np.stack(arrs) / 127.5 - 1.0
    n = len(x)
    n_held = 0 if n < 2 else max(1, int(round(held_out_fraction * n)))
    perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
    held, train = perm[:n_held], perm[n_held:]
    info = {"source": str(root.resolve()), "files": n, "skipped": skipped, "levels": 256}
    labels, class_names, why = folder_labels(root, kept)
    if labels is None:
        info["no_labels"] = why
    return Data(
        os.path.basename(os.path.normpath(str(path))) or str(path),
        "image",
        np.ascontiguousarray(x[train], dtype=np.float32),
        np.ascontiguousarray(x[held], dtype=np.float32),
        256,
        None if labels is None else labels[train],
        None if labels is None else labels[held],
        info=info,
        class_names=class_names,
    )


def folder_labels(root, files):
    """The class of each image of an ``ImageFolder`` layout, ``root/<class>/**/<image>``:
    the classes are the names of root's sub-folders in sorted order (torchvision's
    ``find_classes``) and an image's label is the index of the top-level sub-folder it lies in.
    files: the image paths under root (those that were read). Returns (int64 labels (N,),
    class names, None), or (None, (), the reason there are no labels): images directly in root,
    no sub-folder, or a sub-folder without a readable image."""
    root = Path(root)
    names = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not names:
        return None, (), f"{str(root)!r} has no sub-folders (one per class, as torchvision's ImageFolder reads them)"
    index = {c: i for i, c in enumerate(names)}
    labels = np.empty(len(files), dtype=np.int64)
    for j, f in enumerate(files):
        parts = Path(f).relative_to(root).parts
        if len(parts) < 2:
            return (
                None,
                (),
                (
                    f"{str(f)!r} lies directly in {str(root)!r}, outside the class sub-folders (the "
                    "ImageFolder layout is root/<class>/<image>)"
                ),
            )
        labels[j] = index[parts[0]]
    empty = [c for c in names if not np.any(labels == index[c])]
    if empty:
        return None, (), f"the class sub-folder(s) {empty} of {str(root)!r} hold no readable image"
    return labels, tuple(names), None


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_8bit_grey(im):
    """A 16-bit grey image (modes I;16*, or I holding 16-bit values) as an 8-bit "L" image,
    v8 = round(v16 / 257), which maps 0..65535 onto 0..255 (257 = 65535 / 255; v16 / 257 is
    never half-way between integers, so the rounding has no ties). Pillow's own ``convert("L")``
    clips values above 255 instead. ``ValueError`` for values outside 0..65535 (mode I of
    another depth), which no 16-bit range describes."""
    from PIL import Image

    a = np.asarray(im).astype(np.int64)
    if a.size and (a.min() < 0 or a.max() > 65535):
        raise ValueError(
            f"mode {im.mode} image with values in [{a.min()}, {a.max()}], outside the 16-bit range 0..65535"
        )
    return Image.fromarray(np.rint(a / 257.0).astype(np.uint8))  # 2-D uint8: mode L


def _resize_center_crop(im, size: int):
    from PIL import Image

    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.LANCZOS)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def swiss_roll(n: int, seed: int = 0, noise: float = 0.03) -> np.ndarray:
    """A 2-D swiss roll: r = 1.5 pi (1 + 2u), u ~ U(0, 1), point (r cos r, r sin r) / 7.5,
    plus N(0, noise^2) jitter. Float32 (n, 2), roughly in [-1.5, 1.5]."""
    rng = np.random.default_rng(seed)
    r = 1.5 * math.pi * (1 + 2 * rng.random(n))
    x = np.stack([r * np.cos(r), r * np.sin(r)], axis=1) / 7.5
    return (x + noise * rng.standard_normal(x.shape)).astype(np.float32)


def gaussian_mixture(
    n: int, seed: int = 0, modes: int = GMM_MODES, radius: float = 1.0, std: float = 0.08, return_labels: bool = False
):
    """Equal-weight mixture of ``modes`` isotropic Gaussians N(mu_k, std^2 I) with means on a
    circle of ``radius``: mu_k = radius (cos 2 pi k / modes, sin 2 pi k / modes). Float32 (n, 2);
    with ``return_labels``, also the component k of each point (int64 (n,)): the same points."""
    rng = np.random.default_rng(seed)
    k = rng.integers(0, modes, n)
    ang = 2 * math.pi * k / modes
    mu = radius * np.stack([np.cos(ang), np.sin(ang)], axis=1)
    x = (mu + std * rng.standard_normal((n, 2))).astype(np.float32)
    return (x, k.astype(np.int64)) if return_labels else x


def gmm_means(modes: int = GMM_MODES, radius: float = 1.0) -> np.ndarray:
    """The component means mu_k of ``gaussian_mixture`` (float64 (modes, 2))."""
    ang = 2 * math.pi * np.arange(modes) / modes
    return radius * np.stack([np.cos(ang), np.sin(ang)], axis=1)
