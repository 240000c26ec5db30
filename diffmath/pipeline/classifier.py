"""The digit classifier whose probabilities and features score samples of the digits: scikit-learn's
``MLPClassifier`` (64-256-64-10, ReLU), trained once on the 1,497 training digits at 8x8 and cached
as plain arrays (an ``.npz`` read with ``allow_pickle=False``; never a pickle) in
``$DIFFMATH_CACHE``, else ``$XDG_CACHE_HOME/diffmath``, else ``~/.cache/diffmath`` (falls back to
training in memory when no cache folder is writable). 16x16 images are average-pooled to 8x8 first.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from .io import atomic_write_npz

_CLF_VERSION = "digits-mlp-v1"
CLF_HIDDEN = (256, 64)


def cache_dir() -> Path:
    """$DIFFMATH_CACHE, else $XDG_CACHE_HOME/diffmath, else ~/.cache/diffmath."""
    if os.environ.get("DIFFMATH_CACHE"):
        return Path(os.environ["DIFFMATH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "diffmath"


class DigitClassifier:
    """An MLP (ReLU hidden layers, softmax output) held as plain float64 arrays.

    ``features(x)`` is the last hidden layer; ``proba(x)`` the class probabilities; x: images
    (N, 1, 8, 8) or (N, 1, 16, 16) in [-1, 1] (16x16 is 2x2 average-pooled) or (N, 64)."""

    def __init__(self, weights: list, biases: list, info: dict):
        self.weights = [np.asarray(w, np.float64) for w in weights]
        self.biases = [np.asarray(b, np.float64) for b in biases]
        self.info = info

    @staticmethod
    def prepare(x) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if x.ndim == 4:
            if x.shape[1] != 1 or x.shape[2] != x.shape[3] or x.shape[2] not in (8, 16):
                raise ValueError(f"digit images must have shape (N, 1, 8, 8) or (N, 1, 16, 16); got {x.shape}")
            if x.shape[2] == 16:
                x = x.reshape(x.shape[0], 1, 8, 2, 8, 2).mean(axis=(3, 5))
            x = x.reshape(x.shape[0], 64)
        if x.ndim != 2 or x.shape[1] != 64:
            raise ValueError(f"expected (N, 64) digit vectors; got {x.shape}")
        return np.clip(x, -1.0, 1.0)

    def _hidden(self, x):
        h = self.prepare(x)
        for w, b in zip(self.weights[:-1], self.biases[:-1]):
            h = np.maximum(h @ w + b, 0.0)
        return h

    def features(self, x) -> np.ndarray:
        return self._hidden(x)

    def proba(self, x) -> np.ndarray:
        z = self._hidden(x) @ self.weights[-1] + self.biases[-1]
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


def _train_classifier() -> DigitClassifier:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    from .data import load_digits

    d = load_digits(8)
    xtr = DigitClassifier.prepare(d.train)
    xte = DigitClassifier.prepare(d.held_out)
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    clf = MLPClassifier(hidden_layer_sizes=CLF_HIDDEN, alpha=1e-3, max_iter=400, random_state=0)
    # one BLAS thread: these matrices are small, and spinning BLAS threads on busy cores make
    # the fit ~5x slower
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(xtr, d.labels_train)
    model = DigitClassifier(clf.coefs_, clf.intercepts_, {})
    p = model.proba(xte)
    model.info = {
        "kind": f"sklearn MLPClassifier {64}-{'-'.join(map(str, CLF_HIDDEN))}-10 (ReLU), alpha=1e-3, random_state=0",
        "version": _CLF_VERSION,
        "held_out_accuracy": float((p.argmax(1) == d.labels_held_out).mean()),
        "held_out_mean_confidence": float(p.max(1).mean()),
        "trained_on": f"{len(xtr)} training digits (8x8)",
    }
    return model


def digit_classifier(cache: bool = True) -> DigitClassifier:
    """The cached digit classifier (trained on first use, a few seconds on a CPU)."""
    import sklearn

    key = hashlib.sha256(f"{_CLF_VERSION}|{sklearn.__version__}|{np.__version__}".encode()).hexdigest()[:12]
    path = cache_dir() / f"{_CLF_VERSION}-{key}.npz"
    if cache and path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                n = int(z["num_layers"])
                info = json.loads(str(z["info"]))
                return DigitClassifier([z[f"w{i}"] for i in range(n)], [z[f"b{i}"] for i in range(n)], info)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # a damaged cache file: retrain and replace it
    model = _train_classifier()
    if cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            arrays = {f"w{i}": w for i, w in enumerate(model.weights)} | {
                f"b{i}": b for i, b in enumerate(model.biases)
            }
            atomic_write_npz(
                path, num_layers=np.int64(len(model.weights)), info=np.str_(json.dumps(model.info)), **arrays
            )
        except OSError:
            pass  # no writable cache: the classifier lives in memory for this call
    return model
