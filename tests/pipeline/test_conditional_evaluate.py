"""diffmath evaluate on class-conditional samples: per requested class the classifier's agreement
with the label, the per-class Fréchet distance beside its real held-out floor, the feature spread,
their means; the guidance sweep and its plot."""

import json

import numpy as np
import pytest
import torch

from diffmath.pipeline.classifier import digit_classifier
from diffmath.pipeline.config import TrainConfig
from diffmath.pipeline.data import gmm_means, load_data
from diffmath.pipeline.evaluate import evaluate_run, guidance_sweep, per_class_metrics
from diffmath.pipeline.loop import train
from diffmath.pipeline.metrics import frechet_distance_features
from diffmath.pipeline.report import format_metrics

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def test_real_held_out_digits_score_as_the_classifier_and_sit_on_the_floor(digits):
    clf = digit_classifier()
    m = per_class_metrics(digits.held_out, digits.labels_held_out, digits, clf=clf)
    pred = clf.proba(digits.held_out).argmax(1)
    for c in range(10):
        row = m["classes"][str(c)]
        mask = digits.labels_held_out == c
        assert row["samples"] == 30 and row["agreement"] == pytest.approx((pred[mask] == c).mean())
        # the samples ARE the held-out digits of c: the same set as the floor, one set of n = 30
        assert row["fd_n"] == 30 and row["fd_sets"] == 1 and row["fd"] == row["fd_floor"]
        ref = clf.features(digits.train[digits.labels_train == c])
        assert row["fd_floor"] == pytest.approx(frechet_distance_features(ref, clf.features(digits.held_out[mask])))
    assert m["mean"]["agreement"] == pytest.approx((pred == digits.labels_held_out).mean())
    assert m["min_agreement"]["agreement"] == min(r["agreement"] for r in m["classes"].values())


def test_wrong_labels_disagree_and_sit_far_from_the_floor(digits):
    x = digits.train[:400]
    y = (digits.labels_train[:400] + 1) % 10  # every image asked as the next digit
    order = np.argsort(y, kind="stable")
    m = per_class_metrics(x[order], y[order], digits)
    assert m["mean"]["agreement"] < 0.05
    assert m["mean"]["fd"] > 5 * m["mean"]["fd_floor"]
    # the per-class FD of the training digits themselves, asked as their own class, is small
    m2 = per_class_metrics(x[order], digits.labels_train[:400][order], digits)
    assert m2["mean"]["agreement"] > 0.95 and m2["mean"]["fd"] < m["mean"]["fd"] / 5


def test_gmm_components_by_nearest_mean():
    d = load_data("gmm")
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(8), 200)
    x = (gmm_means()[y] + 0.08 * rng.standard_normal((len(y), 2))).astype(np.float32)
    m = per_class_metrics(x, y, d)
    assert m["mean"]["agreement"] > 0.99
    # drawn from the components themselves: within a few floors of the held-out floor
    assert m["mean"]["sliced_wasserstein"] < 3 * m["mean"]["sliced_wasserstein_floor"] + 0.01
    m_bad = per_class_metrics(x, (y + 4) % 8, d)
    assert m_bad["mean"]["agreement"] == 0.0 and m_bad["mean"]["sliced_wasserstein"] > 1.0


TINY = dict(
    data="digits",
    steps=2,
    batch_size=16,
    channels=8,
    channel_mult=(1,),
    num_res_blocks=1,
    attention_resolutions=(),
    save_every=2,
    timesteps=50,
    progress=False,
    device="cpu",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalruns")
    train(TrainConfig(**TINY, conditional=True), root / "cond")
    train(TrainConfig(**TINY), root / "uncond")
    return root


def _write(path, x, labels=None, info=None):
    extra = {} if labels is None else {"labels": labels}
    np.savez(path, samples=x.astype(np.float32), info=np.str_(json.dumps(info or {})), **extra)


def test_evaluate_run_reports_per_class(runs, digits, tmp_path):
    x, y = digits.held_out, digits.labels_held_out
    order = np.argsort(y, kind="stable")
    _write(tmp_path / "s.npz", x[order], y[order])
    m = evaluate_run(runs / "cond", samples=tmp_path / "s.npz", out=tmp_path / "o", vlb_images=0, progress=False)
    assert set(m["per_class"]["classes"]) == {str(c) for c in range(10)}
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["per_class"]["mean"] == m["per_class"]["mean"]
    text = format_metrics(m)
    assert "agreement with the requested class (mean over 10 classes)" in text and "per-class floor" in text


@pytest.mark.parametrize(
    "run,labels,msg",
    [
        ("uncond", lambda n: np.zeros(n, np.int64), "holds class labels but the run .* is unconditional"),
        ("cond", lambda n: np.full(n, 10, np.int64), r"label 10 is outside \[0, 10\)"),
        ("cond", lambda n: np.zeros(n - 1, np.int64), r"'labels' must hold one integer class per sample"),
        ("cond", lambda n: np.zeros(n, np.float32), r"'labels' must hold one integer class per sample"),
    ],
)
def test_bad_labels_are_refused_before_anything_is_written(runs, digits, tmp_path, run, labels, msg):
    _write(tmp_path / "s.npz", digits.held_out[:20], labels(20))
    with pytest.raises(ValueError, match=msg):
        evaluate_run(runs / run, samples=tmp_path / "s.npz", out=tmp_path / "o", vlb_images=0, progress=False)
    assert not (tmp_path / "o").exists()


def test_guidance_sweep_and_its_plot(runs, digits, tmp_path):
    from PIL import Image

    from diffmath.pipeline.loaded import load_model
    from diffmath.pipeline.plots import plot_guidance

    lm = load_model(run=runs / "cond", device="cpu")
    rows, kept = guidance_sweep(lm, digits, [0.0, 2.0], per_class={0.0: 2, 2.0: 3}, steps=2, keep=2.0)
    assert [r["guidance"] for r in rows] == [0.0, 2.0] and [r["per_class"] for r in rows] == [2, 3]
    x, y = kept
    assert x.shape == (30, 1, 8, 8) and y.tolist() == list(np.repeat(np.arange(10), 3))
    assert all(r["classes"]["3"]["samples"] == r["per_class"] for r in rows)
    plot_guidance(tmp_path / "g.png", rows)
    assert Image.open(tmp_path / "g.png").size[0] > 1000  # three panels: agreement, FD, spread


def test_evaluate_guidance_sweep_cli(runs, tmp_path, capsys):
    from diffmath.cli import main

    out = tmp_path / "g"
    assert (
        main(
            [
                "evaluate",
                "--run",
                str(runs / "cond"),
                "--out",
                str(out),
                "--guidance-sweep",
                "0,2",
                "--per-class",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "| guidance s |" in capsys.readouterr().out
    g = json.loads((out / "guidance.json").read_text())
    assert [r["guidance"] for r in g["scales"]] == [0.0, 2.0] and (out / "guidance.png").exists()
    assert main(["evaluate", "--run", str(runs / "uncond"), "--out", str(tmp_path / "h"), "--guidance-sweep", "1"]) == 2
    assert "--guidance-sweep needs a class-conditional run" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()
    with pytest.raises(SystemExit):
        main(["evaluate", "--run", str(runs / "cond"), "--guidance-sweep", "1,-2"])
    assert "expected finite numbers >= 0" in capsys.readouterr().err
