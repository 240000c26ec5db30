import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
from hypothesis import given
from hypothesis import strategies as st

from diffmath.pipeline.classifier import digit_classifier
from diffmath.pipeline.metrics import (
    class_metrics,
    frechet_distance,
    frechet_distance_features,
    sliced_wasserstein,
    wasserstein_1d,
)


def _spd(rng, d, scale=1.0):
    a = rng.standard_normal((d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def test_fd_closed_form_for_commuting_gaussians(rng):
    # diagonal covariances commute: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    d = 7
    a, b = rng.uniform(0.01, 4, d), rng.uniform(0.01, 4, d)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    ref = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(ref, rel=1e-12)
    # in 1-D: (mu1 - mu2)^2 + (sigma1 - sigma2)^2
    assert frechet_distance([0.5], [[4.0]], [-1.0], [[0.25]]) == pytest.approx(1.5**2 + 1.5**2, rel=1e-13)
    # a common rotation leaves it unchanged
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    got = frechet_distance(Q @ m1, Q @ np.diag(a) @ Q.T, Q @ m2, Q @ np.diag(b) @ Q.T)
    assert got == pytest.approx(ref, rel=1e-9)


def test_fd_matches_the_scipy_sqrtm_form(rng):
    # the FID reference implementation: tr(S1 + S2 - 2 sqrtm(S1 S2)) with scipy.linalg.sqrtm
    for d in (2, 5, 16):
        s1, s2 = _spd(rng, d), _spd(rng, d, 3.0)
        m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
        ref = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
        assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-9)
        assert frechet_distance(m2, s2, m1, s1) == pytest.approx(ref, rel=1e-9)  # symmetric


def test_fd_identical_and_singular(rng):
    s = _spd(rng, 4)
    assert frechet_distance(np.zeros(4), s, np.zeros(4), s) == pytest.approx(0, abs=1e-12)
    # rank-deficient covariances (ReLU features can be constant): still finite, matches the closed form
    a = np.diag([1.0, 0.0, 4.0])
    b = np.diag([0.0, 0.0, 1.0])
    assert frechet_distance(np.zeros(3), a, np.zeros(3), b) == pytest.approx(1.0 + 0 + 1.0, rel=1e-12)


def test_fd_of_samples_converges_to_the_closed_form(rng):
    # Monte Carlo: 200k samples from two 3-D Gaussians; the plug-in FD is within 1% of the exact one
    d = 3
    s1, s2 = _spd(rng, d), _spd(rng, d, 2.0)
    m1, m2 = np.zeros(d), np.ones(d)
    x = rng.multivariate_normal(m1, s1, 200_000)
    y = rng.multivariate_normal(m2, s2, 200_000)
    assert frechet_distance_features(x, y) == pytest.approx(frechet_distance(m1, s1, m2, s2), rel=0.01)


def test_fd_bad_input():
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="symmetric"):
        frechet_distance(np.zeros(2), [[1, 1], [0, 1]], np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance(np.zeros(2), -np.eye(2), np.zeros(2), np.eye(2))


@given(n=st.integers(1, 40), m=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_w1_matches_scipy(n, m, seed):
    r = np.random.default_rng(seed)
    u, v = r.standard_normal(n), 2 * r.standard_normal(m) + 0.5
    assert wasserstein_1d(u, v, 1) == pytest.approx(scipy.stats.wasserstein_distance(u, v), rel=1e-9, abs=1e-12)


def test_w2_in_1d_equal_sizes(rng):
    # equal sizes: W_p^p = mean |sorted(u) - sorted(v)|^p
    u, v = rng.standard_normal(50), rng.exponential(size=50)
    ref = np.mean((np.sort(u) - np.sort(v)) ** 2) ** 0.5
    assert wasserstein_1d(u, v, 2) == pytest.approx(ref, rel=1e-12)


def test_sliced_wasserstein(rng):
    u, v = rng.standard_normal(300), rng.standard_normal(200) + 1
    # in 1-D the slices are +-1: SW_1 is W_1 (scipy)
    assert sliced_wasserstein(u[:, None], v[:, None]) == pytest.approx(scipy.stats.wasserstein_distance(u, v), rel=1e-9)
    # a pure shift c in 2-D: W_1 of each slice is |<theta, c>|; E|cos| over the circle = 2/pi
    x = rng.standard_normal((500, 2))
    c = np.array([0.6, -0.8])
    sw = sliced_wasserstein(x, x + c, num_projections=4000, seed=1)
    assert sw == pytest.approx(2 / math.pi * np.linalg.norm(c), rel=0.03)
    assert sliced_wasserstein(x, x) == pytest.approx(0, abs=1e-12)


def test_class_metrics_entropy_matches_scipy():
    p = np.zeros((10, 10))
    labels = [0, 0, 1, 2, 3, 3, 3, 9, 9, 5]
    p[np.arange(10), labels] = 0.7
    p += 0.3 / 10
    m = class_metrics(p)
    hist = np.bincount(labels, minlength=10)
    assert m["class_histogram"] == hist.tolist()
    assert m["class_entropy_bits"] == pytest.approx(scipy.stats.entropy(hist, base=2), rel=1e-12)
    assert m["classes_present"] == 6 and m["mean_confidence"] == pytest.approx(0.73)


def test_digit_classifier_is_accurate_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFMATH_CACHE", str(tmp_path))
    from diffmath.pipeline.data import load_digits

    clf = digit_classifier()
    assert clf.info["held_out_accuracy"] > 0.93
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1
    with np.load(files[0], allow_pickle=False) as z:  # plain arrays, no pickle
        assert int(z["num_layers"]) == 3
    again = digit_classifier()
    d = load_digits(8)
    np.testing.assert_array_equal(clf.proba(d.held_out), again.proba(d.held_out))
    # 16x16 input is average-pooled to 8x8
    d16 = load_digits(16)
    acc16 = (clf.proba(d16.held_out).argmax(1) == d16.labels_held_out).mean()
    assert acc16 > 0.9
    # a damaged cache file is replaced
    files[0].write_bytes(b"junk")
    assert digit_classifier().info["held_out_accuracy"] == clf.info["held_out_accuracy"]


class _PointMassEps(torch.nn.Module):
    """The exact eps for data that is one point x*: eps = (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t)."""

    def __init__(self, s, x_star):
        super().__init__()
        self.s, self.x_star = s, x_star

    def forward(self, x, t):
        a = torch.from_numpy(self.s.sqrt_alphas_cumprod.copy())[t.long()].float().reshape(-1, 1, 1, 1)
        b = torch.from_numpy(self.s.sqrt_one_minus_alphas_cumprod.copy())[t.long()].float().reshape(-1, 1, 1, 1)
        return (x - a * self.x_star) / b


def test_vlb_of_the_exact_model_for_a_point_mass():
    # With the exact model every reverse mean is the true posterior mean, so with sigma^2 = the
    # posterior variance ("small") each KL term vanishes and the VLB is L_T + L_0; with
    # sigma^2 = beta ("large") each L_{t-1} is the closed-form KL of two Gaussians of equal mean.
    from pathlib import Path

    from diffmath.pipeline.config import TrainConfig
    from diffmath.pipeline.evaluate import vlb_bpd
    from diffmath.pipeline.loaded import LoadedModel
    from diffmath.schedules import named_schedule

    T = 40
    s = named_schedule("linear", T)
    x_star = torch.tensor([-1.0, -0.375, 0.25, 1.0]).reshape(1, 1, 2, 2)  # on the 17-level grid
    lm = LoadedModel(
        _PointMassEps(s, x_star),
        TrainConfig(timesteps=T, progress=False),
        s,
        (1, 2, 2),
        17,
        0,
        torch.device("cpu"),
        Path("exact"),
    )
    res = vlb_bpd(lm, x_star.repeat(3, 1, 1, 1).numpy(), 17, batch_size=60)
    ln2 = math.log(2)
    # L_T: KL(N(sqrt(abar) x*, 1 - abar) || N(0, 1)) per dim, scipy-free closed form in numpy
    ab = s.alphas_cumprod[-1]
    prior = np.mean(0.5 * (-np.log1p(-ab) + (1 - ab) + ab * x_star.numpy().ravel() ** 2 - 1)) / ln2
    assert res["prior_bpd"] == pytest.approx(prior, rel=1e-5)
    # L_0: the decoder N(x*, posterior_variance[1]) on bins of half-width 1/16, edges open (scipy)
    sd = math.sqrt(s.posterior_variance[1])
    xs = x_star.numpy().ravel()
    hi = np.where(xs >= 1, np.inf, xs + 1 / 16)
    lo = np.where(xs <= -1, -np.inf, xs - 1 / 16)
    dec = -np.mean(np.log(scipy.stats.norm.cdf(hi, xs, sd) - scipy.stats.norm.cdf(lo, xs, sd))) / ln2
    assert res["small"]["decoder_bpd"] == pytest.approx(dec, rel=1e-4, abs=1e-9)
    assert res["small"]["vlb_bpd"] == pytest.approx(prior + dec, rel=1e-4, abs=1e-6)
    # "large": + sum_t 1/2 (log(beta/var) + var/beta - 1), var the clipped posterior variance
    var = np.exp(s.posterior_log_variance_clipped[1:])
    kl = np.sum(0.5 * (np.log(s.betas[1:] / var) + var / s.betas[1:] - 1)) / ln2
    assert res["large"]["vlb_bpd"] == pytest.approx(prior + dec + kl, rel=1e-4)
    assert res["test_vlb_bpd"] == res["small"]["vlb_bpd"] and res["variance"] == "small"


def test_evaluate_a_run_whose_data_hold_nothing_out(tmp_path):
    # one image: nothing can be held out, so the test VLB is reported as skipped, not a crash
    from PIL import Image

    from diffmath.pipeline.config import TrainConfig
    from diffmath.pipeline.evaluate import evaluate_run
    from diffmath.pipeline.loop import train
    from diffmath.pipeline.sample_run import sample_run

    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).save(tmp_path / "imgs" / "a.png")
    cfg = TrainConfig(
        data=str(tmp_path / "imgs"),
        image_size=8,
        steps=2,
        batch_size=1,
        channels=8,
        channel_mult=(1,),
        num_res_blocks=1,
        attention_resolutions=(),
        save_every=2,
        timesteps=21,
        warmup=0,
        progress=False,
    )
    train(cfg, tmp_path / "run")
    sample_run(run=tmp_path / "run", out=tmp_path / "run", sampler="ddim", steps=2, num_samples=2, progress=False)
    m = evaluate_run(tmp_path / "run", progress=False)
    assert isinstance(m["test_vlb"], str) and "no held-out images" in m["test_vlb"]


def test_a_truncated_samples_file_is_a_clear_error(tmp_path):
    # a .npz cut short is a bad zip archive (zipfile.BadZipFile), which was not caught
    from diffmath.pipeline.evaluate import _load_samples

    p = tmp_path / "samples.npz"
    np.savez(p, samples=np.zeros((4, 1, 8, 8), np.float32))
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ValueError, match="is not a readable samples .npz"):
        _load_samples(p)


def test_a_vae_on_data_that_hold_nothing_out(tmp_path):
    # one image: the held-out ELBO is reported as skipped (it crashed on an empty batch)
    from PIL import Image

    from diffmath.latent import VAEConfig, train_vae

    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).save(tmp_path / "imgs" / "a.png")
    res = train_vae(
        VAEConfig(data=str(tmp_path / "imgs"), steps=2, batch_size=1, channels=4, progress=False, device="cpu"),
        tmp_path / "vae",
    )
    assert res.metrics["held_out_images"] == 0 and res.metrics["held_out_elbo_bpd"] is None
    assert "no held-out images" in res.metrics["held_out_elbo_skipped"]
