"""The VAE (diffmath.nn.vae) and its objective (diffmath.latent): the KL term against scipy,
the reparameterised sample against its stated distribution, and the ELBO / IWAE bounds against
log p(x) computed by quadrature on a model with a one-dimensional latent."""

import math
import pickle

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch

from diffmath.latent import (
    VAEConfig,
    elbo,
    iwae_bound,
    kl_to_standard_normal,
    load_vae,
    reconstruction_log_likelihood,
    save_vae,
    train_vae,
    vae_hash,
    vae_loss,
)
from diffmath.nn.vae import VAE
from diffmath.pipeline.data import Data, load_digits

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- the KL term
@pytest.mark.parametrize("mu, logvar", [(0.0, 0.0), (0.3, -0.2), (-2.5, 1.5), (4.0, -6.0), (1e-3, 1e-4), (-0.7, 3.0)])
def test_kl_term_matches_scipy_quadrature_and_entropy(mu, logvar):
    # KL(q || p) = cross-entropy H(q, p) - entropy H(q): H(q) from scipy.stats.norm.entropy,
    # H(q, p) = -int q log p by scipy quad; and the KL itself by quad of q (log q - log p).
    sd = math.exp(0.5 * logvar)
    q, p = scipy.stats.norm(mu, sd), scipy.stats.norm(0.0, 1.0)
    lo, hi = mu - 40 * sd, mu + 40 * sd
    cross = scipy.integrate.quad(
        lambda z: -q.pdf(z) * p.logpdf(z), lo, hi, points=[mu], epsabs=0, epsrel=1e-12, limit=200
    )[0]
    ref_entropy = cross - float(q.entropy())
    ref_quad = scipy.integrate.quad(
        lambda z: q.pdf(z) * (q.logpdf(z) - p.logpdf(z)), lo, hi, points=[mu], epsabs=1e-14, epsrel=1e-11, limit=200
    )[0]
    m = torch.full((3, 1, 2, 2), mu, dtype=torch.float64)
    lv = torch.full((3, 1, 2, 2), logvar, dtype=torch.float64)
    ours = kl_to_standard_normal(m, lv)
    assert ours.shape == (3,)
    # the sum over the 4 latent dims of one sample; the term comes from gaussian.normal_kl
    np.testing.assert_allclose(ours.numpy(), 4 * ref_entropy, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ours.numpy(), 4 * ref_quad, rtol=1e-7, atol=1e-11)


def test_kl_term_is_the_vae_losss_kl():
    # vae_loss's KL part is exactly sum normal_kl(mean, logvar, 0, 0) of the encoder's output.
    torch.manual_seed(0)
    v = VAE(channels=8)
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    mean, logvar = v.encode(x)
    _, parts = vae_loss(v, x, torch.zeros(5, *v.latent_shape), None, beta=1.0)
    m, lv = mean.detach().double(), logvar.detach().double()
    ref = 0.5 * (m**2 + lv.exp() - 1 - lv)  # the textbook closed form (Kingma & Welling App. B)
    assert math.isclose(parts["kl"], float(ref.sum(dim=(1, 2, 3)).mean()), rel_tol=1e-5)


# ----------------------------------------------------------------------------- reparameterisation
def test_reparameterized_sample_has_the_posterior_mean_and_variance():
    # z = mean + exp(logvar/2) * noise with noise ~ N(0, I) from a seeded generator, n = 200,000
    # draws per coordinate. Stated tests at family-wise level ~1e-4 over 6 coordinates:
    # z-test of the mean, |mean_hat - mu| / (sigma/sqrt(n)) < 4.4; chi-square test of the
    # variance, (n-1) s^2 / sigma^2 ~ chi2(n-1), two-sided p > 1e-5; Kolmogorov-Smirnov against
    # scipy.stats.norm(mu, sigma), p > 1e-5.
    n = 200_000
    mu = torch.tensor([0.0, 1.5, -3.0, 0.2, 10.0, -0.01], dtype=torch.float64)
    logvar = torch.tensor([0.0, -4.0, 2.0, -0.5, 1.0, -12.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(1234)
    noise = torch.randn((n, 6), generator=g, dtype=torch.float64)
    z = VAE.reparameterize(mu.expand(n, 6), logvar.expand(n, 6), noise).numpy()
    sd = np.exp(0.5 * logvar.numpy())
    for j in range(6):
        zj = z[:, j]
        zstat = (zj.mean() - float(mu[j])) / (sd[j] / math.sqrt(n))
        assert abs(zstat) < 4.4, (j, zstat)
        chi = (n - 1) * zj.var(ddof=1) / sd[j] ** 2
        p_var = 2 * min(scipy.stats.chi2.cdf(chi, n - 1), scipy.stats.chi2.sf(chi, n - 1))
        assert p_var > 1e-5, (j, p_var)
        assert scipy.stats.kstest(zj, scipy.stats.norm(float(mu[j]), sd[j]).cdf).pvalue > 1e-5
    # and a wrong variance is detected by the same test (the test has power)
    chi_bad = (n - 1) * z[:, 0].var(ddof=1) / 1.01**2
    assert 2 * min(scipy.stats.chi2.cdf(chi_bad, n - 1), scipy.stats.chi2.sf(chi_bad, n - 1)) < 1e-5


# ----------------------------------------------------------------------------- shapes and bad input
@pytest.mark.parametrize(
    "size, mult, latent", [(8, (1, 2), (2, 4, 4)), (16, (1, 2, 2), (3, 4, 4)), (8, (1,), (3, 8, 8))]
)
def test_shapes(size, mult, latent):
    v = VAE(image_size=size, channel_mult=mult, latent_channels=latent[0], channels=8)
    assert v.latent_shape == latent and v.factor == 2 ** (len(mult) - 1)
    x = torch.zeros(3, 1, size, size)
    m, lv = v.encode(x)
    assert m.shape == lv.shape == (3,) + latent
    dm, dls = v.decode(m)
    assert dm.shape == dls.shape == x.shape
    assert v.config()["channel_mult"] == list(mult)


def test_bad_input_gets_clear_errors():
    with pytest.raises(ValueError, match=r"divisible by the VAE's down-sampling factor .* = 4; got image_size = 6"):
        VAE(image_size=6, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="latent_channels must be a positive integer"):
        VAE(latent_channels=0)
    v = VAE(channels=8)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 8, 8\); got \(2, 1, 16, 16\)"):
        v.encode(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"z must have shape \(B, 2, 4, 4\)"):
        v.decode(torch.zeros(2, 4, 4, 4))
    with pytest.raises(TypeError, match="floating"):
        v.encode(torch.zeros(2, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="noise must have the posterior's shape"):
        VAE.reparameterize(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="beta must be a finite number"):
        VAEConfig(beta=-1.0)
    # a dataset whose image size the VAE cannot handle
    data = Data("odd", "image", np.zeros((8, 1, 6, 6), np.float32), np.zeros((2, 1, 6, 6), np.float32), 256)
    with pytest.raises(ValueError, match=r"down-samples by f = 4 .* divisible by 4; the 'odd' images are 6x6"):
        train_vae(
            VAEConfig(image_size=6, channel_mult=(1, 2, 2), steps=1, progress=False, device="cpu"),
            "/nonexistent",
            data=data,
        )


def test_log_variances_are_bounded_softly():
    v = VAE(channels=8)
    with torch.no_grad():
        v.encoder[-1].bias.fill_(1e4)
        v.decoder[-1].bias.fill_(-1e4)
    with torch.no_grad():
        m, lv = v.encode(torch.zeros(1, 1, 8, 8))
        dm, dls = v.decode(m)
    assert torch.isfinite(lv).all() and float(lv.max()) <= 20.0 and torch.isfinite(lv.exp()).all()
    assert torch.isfinite(dls).all() and float(dls.min()) >= -9.0


# ----------------------------------------------------------------------------- the bounds, exactly
def _tiny_vae_on_2x2_digits():
    """A VAE with a 1-D latent on the 2x2 centre crops of the digits (still on the 17-level
    grid), trained briefly so that q(z|x) differs from the true posterior."""
    d = load_digits()
    crop = lambda a: np.ascontiguousarray(a[:, :, 3:5, 3:5])  # noqa: E731
    data = Data("digits2x2", "image", crop(d.train), crop(d.held_out), 17)
    cfg = VAEConfig(
        image_size=2,
        channels=4,
        channel_mult=(1, 2),
        latent_channels=1,
        steps=150,
        batch_size=64,
        lr=5e-3,
        warmup=10,
        seed=3,
        progress=False,
        device="cpu",
        elbo_samples=1,
    )
    return data, cfg


def _log_px_decoder(v, x, z):
    """log p(x | z) for scalar z, computed with scipy.stats.norm CDF differences (not diffmath)."""
    with torch.no_grad():
        m, ls = v.decode(torch.tensor([[[[z]]]], dtype=torch.float64))
    m, s = m.numpy().ravel(), np.exp(ls.numpy().ravel())
    xv = x.ravel()
    delta = 1.0 / 16
    upper = np.where(xv > 1 - delta / 2, np.inf, xv + delta)
    lower = np.where(xv < -1 + delta / 2, -np.inf, xv - delta)
    p = scipy.stats.norm.cdf(upper, m, s) - scipy.stats.norm.cdf(lower, m, s)
    return float(np.sum(np.log(p)))


def test_elbo_and_iwae_against_log_likelihood_by_quadrature(tmp_path):
    # With a 1-D latent, log p(x) = log int p(x|z) N(z; 0, 1) dz is computed by scipy quad, and
    # the exact ELBO = int q(z|x) [log p(x|z) + log N(z; 0, 1) - log q(z|x)] dz likewise (with
    # scipy.stats.norm for every density). Stated checks, per image:
    #   exact ELBO < log p(x)  (the gap is KL(q || true posterior) > 0);
    #   diffmath's ELBO (analytic KL + 4000-draw Monte Carlo reconstruction) = exact ELBO within 4 SE;
    #   E[IWAE_1] = exact ELBO within 4 SE (40 replicates of K = 1);
    #   exact ELBO + 4 SE < E[IWAE_K] <= log p(x) + 4 SE for K = 2000 (20 replicates), and
    #   IWAE_2000 closes most of the gap: log p(x) - E[IWAE] < 0.2 (log p(x) - ELBO) + 4 SE.
    data, cfg = _tiny_vae_on_2x2_digits()
    res = train_vae(cfg, tmp_path / "vae", data=data)
    v = res.loaded.vae.double().eval()
    with torch.no_grad():  # move q(z|x) off the true posterior: the bounds hold for any encoder
        v.encoder[-1].bias += torch.tensor([0.7, -1.0], dtype=torch.float64)
    xs = data.held_out[[0, 5, 17]].astype(np.float64)
    g = torch.Generator().manual_seed(7)
    gaps = []
    for x in xs:
        xt = torch.from_numpy(x[None])
        with torch.no_grad():
            qm, qlv = v.encode(xt)
        qm, qs = float(qm), math.exp(0.5 * float(qlv))
        q = scipy.stats.norm(qm, qs)
        lo, hi = min(-12.0, qm - 12 * qs), max(12.0, qm + 12 * qs)
        joint = lambda z: _log_px_decoder(v, x, z) + scipy.stats.norm.logpdf(z)  # noqa: E731
        # p(x) by quadrature, scaled by exp(c) to avoid underflow
        c = max(joint(z) for z in np.linspace(lo, hi, 201))
        px = scipy.integrate.quad(
            lambda z: math.exp(joint(z) - c), lo, hi, points=[qm], epsabs=0, epsrel=1e-9, limit=200
        )[0]
        log_px = math.log(px) + c
        elbo_exact = scipy.integrate.quad(
            lambda z: q.pdf(z) * (joint(z) - q.logpdf(z)),
            qm - 12 * qs,
            qm + 12 * qs,
            points=[qm],
            epsabs=1e-12,
            epsrel=1e-9,
            limit=200,
        )[0]
        assert elbo_exact < log_px
        # diffmath's ELBO estimate
        e = elbo(v, xt.expand(4000, 1, 2, 2), 17, samples=1, generator=g)["elbo"].numpy()
        assert abs(e.mean() - elbo_exact) < 4 * e.std(ddof=1) / math.sqrt(len(e)) + 1e-9
        # IWAE_1 is the ELBO in expectation
        i1 = iwae_bound(v, xt.expand(40, 1, 2, 2), 17, 1, generator=g).numpy()
        assert abs(i1.mean() - elbo_exact) < 4 * i1.std(ddof=1) / math.sqrt(len(i1))
        # IWAE_K with K large: between the ELBO and log p(x)
        ik = iwae_bound(v, xt.expand(20, 1, 2, 2), 17, 2000, generator=g).numpy()
        se = ik.std(ddof=1) / math.sqrt(len(ik))
        assert ik.mean() > elbo_exact + 4 * se, (ik.mean(), elbo_exact, se)
        assert ik.mean() <= log_px + 4 * se + 1e-9
        assert log_px - ik.mean() < 0.2 * (log_px - elbo_exact) + 4 * se
        gaps.append(log_px - elbo_exact)
    assert min(gaps) > 1e-2  # the model is not trivially exact (the bounds were tested, not equalities)


# ----------------------------------------------------------------------------- the objective
def test_reconstruction_term_is_the_discretized_likelihood_and_loss_is_neg_elbo():
    # -loss * D at beta = 1 equals log p(x|z) - KL for the same noise; the reconstruction term
    # agrees with scipy.stats.norm CDF differences on the 17-level grid.
    torch.manual_seed(1)
    v = VAE(channels=8).double()
    x = torch.from_numpy(load_digits().held_out[:4].astype(np.float64))
    noise = torch.randn(4, *v.latent_shape, dtype=torch.float64)
    z, m, lv, dm, dls = v(x, noise)
    ours = reconstruction_log_likelihood(x, dm, dls, 17).detach().numpy()
    xv, mv, sv = x.numpy(), dm.detach().numpy(), np.exp(dls.detach().numpy())
    up = np.where(xv > 1 - 1 / 32, np.inf, xv + 1 / 16)
    dn = np.where(xv < -1 + 1 / 32, -np.inf, xv - 1 / 16)
    ref = np.log(scipy.stats.norm.cdf(up, mv, sv) - scipy.stats.norm.cdf(dn, mv, sv)).reshape(4, -1).sum(1)
    np.testing.assert_allclose(ours, ref, rtol=1e-9)
    # continuous data: the Gaussian density
    cont = reconstruction_log_likelihood(x, dm, dls, None).detach().numpy()
    np.testing.assert_allclose(cont, scipy.stats.norm.logpdf(xv, mv, sv).reshape(4, -1).sum(1), rtol=1e-10)
    loss, parts = vae_loss(v, x, noise, 17, beta=1.0)
    kl = 0.5 * (m**2 + lv.exp() - 1 - lv).sum(dim=(1, 2, 3)).detach().numpy()
    assert math.isclose(float(loss.detach()) * 64, float(np.mean(-ref + kl)), rel_tol=1e-9)
    assert math.isclose(parts["elbo_bpd"], float(np.mean(-ref + kl)) / (64 * math.log(2)), rel_tol=1e-9)
    loss0, _ = vae_loss(v, x, noise, 17, beta=0.0)
    assert math.isclose(float(loss0.detach()) * 64, float(np.mean(-ref)), rel_tol=1e-9)


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_roundtrip_hash_and_no_pickle(tmp_path, monkeypatch):
    torch.manual_seed(0)
    v = VAE(channels=8)
    ck = save_vae(tmp_path / "a", v, bins=17)
    assert ck.name == "vae.json" and (tmp_path / "a" / "vae.safetensors").exists()

    def no_pickle(*a, **k):
        raise AssertionError("pickle must never be used to load a checkpoint")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    lv = load_vae(tmp_path / "a")
    assert lv.hash == vae_hash(v) and lv.bins == 17 and lv.latent_shape == (2, 4, 4)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(lv.vae.encode(x)[0], v.eval().encode(x)[0], rtol=0, atol=0)
    # another init has another hash; a bit flip in the weights is detected
    torch.manual_seed(1)
    assert vae_hash(VAE(channels=8)) != lv.hash
    raw = bytearray((tmp_path / "a" / "vae.safetensors").read_bytes())
    raw[-5] ^= 1
    (tmp_path / "a" / "vae.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="SHA-256 differs"):
        load_vae(tmp_path / "a")
    with pytest.raises(FileNotFoundError):
        load_vae(tmp_path / "missing")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "vae.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_vae(tmp_path / "b")
