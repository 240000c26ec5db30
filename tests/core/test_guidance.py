"""Classifier-free guidance: the combination against hand computation, one batched call, the
exact endpoints s = 0 and s = 1, the rescale against numpy, x0/v networks, the denoiser form,
and an analytic check on a Gaussian mixture whose conditional and unconditional eps are exact
(``diffmath.oracle``): guided sampling at s = 1 draws the requested component."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from diffmath.guidance import (
    check_labels,
    classifier_free_guidance,
    drop_labels,
    guided,
    guided_denoiser,
    rescale_guidance,
)
from diffmath.nn import MLPDenoiser, UNet
from diffmath.oracle import GaussianData, GaussianMixture
from diffmath.samplers import sample_ddim, sample_ddpm, sample_sde
from diffmath.schedules import linear_schedule
from diffmath.sde import VPSDE

K = 3  # classes of the toy model; label 3 is the null class


class ToyModel:
    """An elementwise conditional 'network' (no mixing across the batch), so a batched call and
    single calls agree exactly: out = tanh(a_y x + b_y) + 1e-3 t, with class-dependent a_y, b_y."""

    num_classes = K

    def __init__(self):
        self.calls = []

    @staticmethod
    def f(x, t, y):
        # float64 numpy reference of one call, labels y in [0, K]
        a = np.array([0.5, -1.2, 2.0, 0.9])[y].reshape((-1,) + (1,) * (x.ndim - 1))
        b = np.array([0.3, -0.1, 0.7, 0.0])[y].reshape((-1,) + (1,) * (x.ndim - 1))
        tt = np.broadcast_to(np.asarray(t, dtype=np.float64), (x.shape[0],)).reshape(a.shape)
        return np.tanh(a * x + b) + 1e-3 * tt

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], t, y))
        if torch.is_tensor(x):
            yy = y.cpu().numpy()
            tt = t.cpu().numpy() if torch.is_tensor(t) else t
            return torch.from_numpy(self.f(x.cpu().numpy(), tt, yy)).to(x.dtype)
        return self.f(x, t, y)


def _x(rng, shape=(5, 2, 3)):
    return rng.standard_normal(shape)


# ----------------------------------------------------------------------------- the combination
@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0, 2.5, 7.0])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_guided_matches_the_hand_combined_formula(rng, scale, kind):
    x = _x(rng)
    t = np.array([0, 10, 100, 500, 999])
    labels = np.array([0, 2, 1, 1, 0])
    # reference: two separate calls combined as eps_u + s (eps_c - eps_u) in float64
    eps_c = ToyModel.f(x, t, labels)
    eps_u = ToyModel.f(x, t, np.full(5, K))
    ref = eps_u + scale * (eps_c - eps_u)
    m = ToyModel()
    if kind == "torch":
        got = guided(m, torch.tensor(labels), scale)(torch.from_numpy(x), torch.from_numpy(t)).numpy()
    else:
        got = guided(m, labels, scale)(x, t)
    # the two algebraic forms differ by rounding: a few ulp of |eps| (<= 1) times (1 + 2 s)
    np.testing.assert_allclose(got, ref, rtol=0, atol=8e-16 * (1 + 2 * scale))


def test_one_batched_call_with_cond_then_null_labels(rng):
    m = ToyModel()
    x = torch.from_numpy(_x(rng))
    t = torch.tensor([3, 4, 5, 6, 7])
    eps = guided(m, 2, 3.0)(x, t)
    assert eps.shape == x.shape
    assert len(m.calls) == 1  # cond and uncond in ONE forward pass
    B, tt, yy = m.calls[0]
    assert B == 10
    assert torch.equal(tt, torch.cat([t, t]))
    assert torch.equal(yy, torch.tensor([2] * 5 + [K] * 5))
    # a scalar t is passed through as it is
    guided(m, 1, 3.0)(x, 17)
    assert len(m.calls) == 2 and m.calls[1][1] == 17


def test_scale_zero_and_one_are_exactly_the_unconditional_and_conditional(rng):
    x = _x(rng)
    t = np.arange(5) * 200
    y = np.array([1, 0, 2, 2, 1])
    cond = ToyModel.f(x, t, y)
    uncond = ToyModel.f(x, t, np.full(5, K))
    assert np.array_equal(guided(ToyModel(), y, 1.0)(x, t), cond)
    assert np.array_equal(guided(ToyModel(), y, 0.0)(x, t), uncond)
    xt, tt = torch.from_numpy(x).float(), torch.from_numpy(t)
    x32 = xt.numpy()
    cond32 = torch.from_numpy(ToyModel.f(x32, t, y)).float()
    uncond32 = torch.from_numpy(ToyModel.f(x32, t, np.full(5, K))).float()
    assert torch.equal(guided(ToyModel(), torch.from_numpy(y), 1)(xt, tt), cond32)
    assert torch.equal(guided(ToyModel(), torch.from_numpy(y), 0)(xt, tt), uncond32)


def test_classifier_free_guidance_on_arrays(rng):
    c, u = rng.standard_normal((2, 4, 3))
    for s in (0.0, 1.0, 4.0):
        np.testing.assert_allclose(classifier_free_guidance(c, u, s), u + s * (c - u), rtol=0, atol=1e-14 * (1 + s))
    assert np.array_equal(classifier_free_guidance(c, u, 1.0), c)
    ht, hu = torch.from_numpy(c).half(), torch.from_numpy(u).half()
    out = classifier_free_guidance(ht, hu, 2.0)
    assert out.dtype == torch.float32  # half precision computes in float32


# ----------------------------------------------------------------------------- the rescale
def _rescale_reference(g, c, phi):
    """Lin et al. 2023, Sec. 3.4, in the paper's two steps, with numpy's *unbiased* std (as
    diffusers' torch.std) in float64: the ratio of stds is the same for either normalisation."""
    axes = tuple(range(1, g.ndim))
    sd_c = np.std(c, axis=axes, ddof=1, keepdims=True)
    sd_g = np.std(g, axis=axes, ddof=1, keepdims=True)
    rescaled = g * (sd_c / sd_g)
    return phi * rescaled + (1 - phi) * g


@pytest.mark.parametrize("phi", [0.0, 0.3, 0.7, 1.0])
def test_rescale_matches_the_paper_formula(rng, phi):
    c = rng.standard_normal((4, 3, 5, 5)) * np.array([0.5, 1.0, 2.0, 4.0]).reshape(4, 1, 1, 1)
    u = rng.standard_normal((4, 3, 5, 5))
    s = 5.0
    g = u + s * (c - u)
    ref = _rescale_reference(g, c, phi)
    np.testing.assert_allclose(rescale_guidance(g, c, phi), ref, rtol=1e-13, atol=1e-13)  # sqrt, a few ulp
    np.testing.assert_allclose(classifier_free_guidance(c, u, s, rescale=phi), ref, rtol=1e-12, atol=1e-12)
    got_t = rescale_guidance(torch.from_numpy(g), torch.from_numpy(c), phi).numpy()
    np.testing.assert_allclose(got_t, ref, rtol=1e-13, atol=1e-13)
    if phi == 1.0:  # fully rescaled: the guided prediction takes the conditional one's std
        np.testing.assert_allclose(ref.reshape(4, -1).std(1), c.reshape(4, -1).std(1), rtol=1e-13)


def test_rescale_leaves_a_constant_prediction_alone():
    g = np.zeros((2, 4))
    g[1] = 3.0  # std 0 as well
    c = np.ones((2, 4))
    c[0, 0] = 2.0
    out = rescale_guidance(g, c, 0.7)
    assert np.array_equal(out, g) and np.all(np.isfinite(out))
    # an untrained zero-initialised network outputs 0: still 0, no NaN
    m = MLPDenoiser(dim=2, hidden=8, depth=1, time_dim=4, num_classes=2)
    e = guided(m, 1, 3.0, rescale=0.7)(torch.randn(3, 2), torch.tensor([1, 2, 3]))
    assert torch.equal(e, torch.zeros(3, 2))


def test_guided_rescale_through_the_batched_call(rng):
    x = _x(rng, (4, 3, 4))
    t = np.array([5, 50, 500, 900])
    y = np.array([0, 1, 2, 0])
    c, u = ToyModel.f(x, t, y), ToyModel.f(x, t, np.full(4, K))
    ref = _rescale_reference(u + 4.0 * (c - u), c, 0.7)
    np.testing.assert_allclose(guided(ToyModel(), y, 4.0, rescale=0.7)(x, t), ref, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- x0 and v networks
@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_x0_and_v_networks_are_converted_to_eps_before_combining(rng, prediction):
    sch = linear_schedule(1000)
    abar = sch.alphas_cumprod
    x = _x(rng, (4, 3))
    t = np.array([0, 300, 700, 999])

    def as_pred(x, t, y):
        # the same network, outputting x0 or v (x_t = a x0 + sd eps, v = a eps - sd x0), by hand
        eps = ToyModel.f(x, t, y)
        ai, si = np.sqrt(abar[t])[:, None], np.sqrt(1.0 - abar[t])[:, None]
        x0 = (x - si * eps) / ai
        return x0 if prediction == "x0" else ai * eps - si * x0

    as_pred.num_classes = K
    for s in (0.0, 1.0, 3.0):
        ref = guided(ToyModel(), 1, s)(x, t)
        got = guided(as_pred, 1, s, prediction=prediction, schedule=sch)(x, t)
        # the round trip through x0 amplifies rounding by up to sd/a = 157 at t = 999
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)


def test_score_networks_are_combined_as_they_are(rng):
    # score = -eps / sigma_t: the guided score is -(guided eps) / sigma_t
    sde = VPSDE()
    x = _x(rng, (4, 2))
    t = np.array([0.1, 0.3, 0.6, 1.0])
    sig = sde.marginal_coefs(t)[1][:, None]

    def score(x, t, y):
        return -ToyModel.f(x, t, y) / sde.marginal_coefs(np.asarray(t))[1][:, None]

    score.num_classes = K
    got = guided(score, 2, 2.5, rescale=0.5, prediction="score")(x, t)
    ref = -guided(ToyModel(), 2, 2.5, rescale=0.5)(x, t) / sig
    np.testing.assert_allclose(got, ref, rtol=1e-13, atol=0)


# ----------------------------------------------------------------------------- a Gaussian mixture
MIX = GaussianMixture([0.3, 0.7], [[-2.0], [1.5]], [[[0.25**2]], [[0.4**2]]])
COMPONENTS = [GaussianData(MIX.means[k], MIX.covs[k]) for k in range(2)]


def _oracle(what):
    """model(x, t, y): the exact eps (or score, or VE denoiser) of component y, and of the
    whole mixture for the null label y = 2."""

    def model(x, t, y):
        out = np.empty_like(x)
        y = np.asarray(y)
        for k, dist in enumerate(COMPONENTS + [MIX]):
            i = y == k
            if i.any():
                ti = t[i] if np.ndim(t) else t
                if what == "eps":
                    out[i] = dist.eps(x[i], ti, SCH)
                elif what == "score":
                    out[i] = dist.score(x[i], ti, SDE)
                else:  # the denoiser D(x, sigma) = x + sigma^2 score_sigma (Tweedie)
                    sg = ti.reshape(-1, 1) if np.ndim(ti) else ti
                    out[i] = x[i] + sg**2 * dist.score_sigma(x[i], ti)
        return out

    model.num_classes = 2
    return model


SCH = linear_schedule(1000)
SDE = VPSDE()


def test_the_mixture_oracle_is_a_conditional_model(rng):
    # unconditional eps = the responsibility-weighted component eps, computed here by hand from
    # scipy's normal densities of the noised components
    x = rng.standard_normal((6, 1)) * 2
    t = np.array([0, 50, 200, 400, 700, 999])
    abar = SCH.alphas_cumprod[t][:, None]
    dens = []
    for k in range(2):
        var = abar * MIX.covs[k, 0, 0] + (1 - abar)
        dens.append(MIX.weights[k] * stats.norm.pdf(x, np.sqrt(abar) * MIX.means[k, 0], np.sqrt(var)))
    resp = [d / (dens[0] + dens[1]) for d in dens]
    m = _oracle("eps")
    eps_k = [m(x, t, np.full(6, k)) for k in range(2)]
    for k in range(2):  # component k: eps = sqrt(1 - abar) (x - sqrt(abar) mu_k) / var_k
        var = abar * MIX.covs[k, 0, 0] + (1 - abar)
        np.testing.assert_allclose(
            eps_k[k], np.sqrt(1 - abar) * (x - np.sqrt(abar) * MIX.means[k, 0]) / var, rtol=1e-12
        )
    np.testing.assert_allclose(m(x, t, np.full(6, 2)), resp[0] * eps_k[0] + resp[1] * eps_k[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("label", [0, 1])
def test_guidance_at_scale_one_samples_the_requested_component_ddim(label):
    # s = 1 is the exact eps of component `label`, so DDIM's output is exactly the Gaussian
    # GaussianData.exact_output propagates; test the samples against it (KS, n = 4000, seed
    # fixed, reject at p < 1e-3) and check that output is the component itself to < 2e-3 nats
    # (measured 7.6e-4 for component 0 with 200 leading steps).
    steps, n = 200, 4000
    x = sample_ddim(guided(_oracle("eps"), label, 1.0), SCH, (n, 1), steps=steps, generator=np.random.default_rng(11))
    exact = COMPONENTS[label].exact_output(SCH, "ddim", steps=steps)
    assert exact.kl(COMPONENTS[label]) < 2e-3
    p = stats.kstest(x[:, 0], stats.norm(exact.mean[0], np.sqrt(exact.cov[0, 0])).cdf).pvalue
    assert p > 1e-3, p
    # and nothing of the other component: its basin would be > 15 sds away
    assert np.all(np.sign(x[:, 0] + 0.25) == (1 if label else -1))


def test_guidance_at_scale_zero_samples_the_mixture_ddpm():
    # s = 0 is the unconditional model whatever the label: the fraction of samples in the
    # component-1 basin (x > -0.25) is Binomial(n, 0.7) (two-sided exact test, reject at 1e-3)
    n = 2000
    x = sample_ddpm(
        guided(_oracle("eps"), 0, 0.0), SCH.respace(np.arange(0, 1000, 10)), (n, 1), generator=np.random.default_rng(3)
    )
    k = int((x[:, 0] > -0.25).sum())
    assert stats.binomtest(k, n, MIX.weights[1]).pvalue > 1e-3, k


def test_guidance_above_one_sharpens_toward_the_requested_component():
    # the trade-off, on the mixture: at s = 4 every sample of class 0 lands in component 0's
    # basin and their spread shrinks below the component's own (guidance trades diversity)
    n, g = 2000, np.random.default_rng(5)
    x1 = sample_ddim(guided(_oracle("eps"), 0, 1.0), SCH, (n, 1), steps=50, generator=g)
    x4 = sample_ddim(guided(_oracle("eps"), 0, 4.0), SCH, (n, 1), steps=50, generator=g)
    assert np.all(x4[:, 0] < -0.25)
    f = stats.levene(x1[:, 0], x4[:, 0])  # equal variances rejected, and the guided one smaller
    assert f.pvalue < 1e-6 and x4.std() < x1.std()


def test_guided_score_drives_the_sde_sampler():
    # s = 1 through Euler-Maruyama on the reverse VP-SDE: the exact output for component 1
    n, steps = 3000, 200
    score = guided(_oracle("score"), 1, 1.0, prediction="score")
    x = sample_sde(score, SDE, (n, 1), steps=steps, generator=np.random.default_rng(8))
    exact = COMPONENTS[1].exact_sde_output(SDE, "euler_maruyama", steps=steps)
    p = stats.kstest(x[:, 0], stats.norm(exact.mean[0], np.sqrt(exact.cov[0, 0])).cdf).pvalue
    assert p > 1e-3, p


# ----------------------------------------------------------------------------- the denoiser form
@pytest.mark.parametrize("scale,phi", [(0.0, 0.0), (1.0, 0.0), (3.0, 0.0), (3.0, 0.7), (1.5, 1.0)])
def test_guided_denoiser_equals_guided_eps_at_the_same_sigma(rng, scale, phi):
    # D = x - sigma eps: guiding D is guiding eps (the weights sum to 1), and the rescale of
    # x - D = sigma eps is the rescale of eps. The eps model here is -sigma * score_sigma.
    x = rng.standard_normal((6, 1)) * 3
    x2 = rng.standard_normal((6, 2)) * 3  # 2-D, so the per-sample std is not 0
    sigma = np.array([0.05, 0.3, 1.0, 2.0, 10.0, 80.0])
    mix2 = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [2.0, 1.0]], [np.eye(2) * 0.1, np.diag([0.3, 0.05])])
    comps2 = [GaussianData(mix2.means[k], mix2.covs[k]) for k in range(2)]
    for xx, dists in ((x, COMPONENTS + [MIX]), (x2, comps2 + [mix2])):

        def den(x, sg, y, dists=dists):
            out = np.empty_like(x)
            for k, dist in enumerate(dists):
                i = y == k
                out[i] = x[i] + sg[i, None] ** 2 * dist.score_sigma(x[i], sg[i])
            return out

        def eps(x, sg, y, dists=dists):
            out = np.empty_like(x)
            for k, dist in enumerate(dists):
                i = y == k
                out[i] = -sg[i, None] * dist.score_sigma(x[i], sg[i])
            return out

        got = guided_denoiser(den, 1, scale, rescale=phi, null_class=2)(xx, sigma)
        ref = xx - sigma[:, None] * guided(eps, 1, scale, rescale=phi, null_class=2)(xx, sigma)
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12 * 80)


def test_guided_denoiser_one_call_and_exact_endpoints(rng):
    m = ToyModel()
    x = _x(rng)
    sigma = np.linspace(0.1, 5, 5)
    assert np.array_equal(guided_denoiser(m, 2, 1.0)(x, sigma), ToyModel.f(x, sigma, np.full(5, 2)))
    assert np.array_equal(guided_denoiser(m, 2, 0.0)(x, sigma), ToyModel.f(x, sigma, np.full(5, K)))
    assert len(m.calls) == 2 and m.calls[0][0] == 10


# ----------------------------------------------------------------------------- real networks
@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_guided_network_matches_separate_calls_and_samples(kind):
    torch.manual_seed(0)
    if kind == "unet":
        net = UNet(
            channels=8, channel_mult=(1, 2), attention_resolutions=(4,), image_size=8, dropout=0.0, num_classes=10
        )
        shape = (3, 1, 8, 8)
    else:
        net = MLPDenoiser(dim=2, hidden=16, depth=2, time_dim=8, num_classes=10)
        shape = (3, 2)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        x = torch.randn(shape, generator=g)
        t = torch.tensor([10, 400, 900])
        y = torch.tensor([7, 0, 3])
        c, u = net(x, t, y), net(x, t, 10)
        got = guided(net, y, 3.0)(x, t)
        # float32 convolutions of a batch of 6 may round differently from a batch of 3
        torch.testing.assert_close(got, u + 3.0 * (c - u), rtol=1e-4, atol=1e-5)
        s = linear_schedule(100)
        out = sample_ddim(guided(net, 4, 2.0), s, shape, steps=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == shape and torch.all(torch.isfinite(out))


# ----------------------------------------------------------------------------- label dropout
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_drop_labels_is_bernoulli_and_reproducible(kind):
    n, p = 20000, 0.1
    y0 = np.random.default_rng(0).integers(0, 10, n)
    if kind == "torch":
        y = torch.from_numpy(y0)
        out = drop_labels(y, p, 10, torch.Generator().manual_seed(4))
        again = drop_labels(y, p, 10, torch.Generator().manual_seed(4))
        assert torch.equal(out, again) and out.dtype == y.dtype and torch.equal(y, torch.from_numpy(y0))
        out = out.numpy()
    else:
        out = drop_labels(y0.copy(), p, 10, np.random.default_rng(4))
        assert np.array_equal(out, drop_labels(y0.copy(), p, 10, np.random.default_rng(4)))
    dropped = out == 10
    # the count of null labels is Binomial(n, p): exact two-sided test, reject at p < 1e-3
    assert stats.binomtest(int(dropped.sum()), n, p).pvalue > 1e-3
    assert np.array_equal(out[~dropped], y0[~dropped])  # the others are kept
    # independent of the label: the drop rate of class 0 vs the rest (chi^2 test of independence)
    table = [
        [np.sum(dropped & (y0 == 0)), np.sum(~dropped & (y0 == 0))],
        [np.sum(dropped & (y0 != 0)), np.sum(~dropped & (y0 != 0))],
    ]
    assert stats.chi2_contingency(table).pvalue > 1e-3


def test_drop_labels_edges_and_stream():
    y = np.arange(5)
    assert np.array_equal(drop_labels(y, 0.0, 5, np.random.default_rng(0)), y)
    assert np.array_equal(drop_labels(y, 1.0, 5, np.random.default_rng(0)), np.full(5, 5))
    # exactly B uniforms are drawn whatever p
    g1, g2 = np.random.default_rng(9), np.random.default_rng(9)
    drop_labels(y, 0.0, 5, g1)
    drop_labels(y, 0.9, 5, g2)
    assert g1.random() == g2.random()
    assert np.array_equal(drop_labels(np.array([5, 1]), 0.0, 5, np.random.default_rng(0)), [5, 1])  # null stays null


@pytest.mark.parametrize(
    "args,exc,match",
    [
        (
            (np.arange(3), 1.5, 5, np.random.default_rng()),
            ValueError,
            r"uncond_prob must lie in \[0, 1\]; got uncond_prob = 1.5",
        ),
        ((np.arange(3), -0.1, 5, np.random.default_rng()), ValueError, "uncond_prob"),
        ((np.arange(3), float("nan"), 5, np.random.default_rng()), ValueError, "uncond_prob"),
        ((np.arange(3), True, 5, np.random.default_rng()), TypeError, "uncond_prob"),
        ((np.arange(3), 0.1, 0, np.random.default_rng()), ValueError, "null_class must be >= 1"),
        ((np.array([0, 6]), 0.1, 5, np.random.default_rng()), ValueError, r"y must lie in \[0, 5\].*got y = 6"),
        ((np.array([-1, 0]), 0.1, 5, np.random.default_rng()), ValueError, "got y = -1"),
        ((np.zeros((2, 2), int), 0.1, 5, np.random.default_rng()), ValueError, r"shape \(B,\)"),
        ((np.zeros(2), 0.1, 5, np.random.default_rng()), TypeError, "integer class indices"),
        (([0, 1], 0.1, 5, np.random.default_rng()), TypeError, "numpy array or torch tensor"),
        ((np.arange(3), 0.1, 5, torch.Generator()), TypeError, "numpy.random.Generator"),
        ((torch.arange(3), 0.1, 5, np.random.default_rng()), TypeError, "torch.Generator"),
        ((np.arange(3), 0.1, 5, None), TypeError, "numpy.random.Generator"),
    ],
)
def test_drop_labels_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        drop_labels(*args)


# ----------------------------------------------------------------------------- bad input
def _m():
    return ToyModel()


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(scale=-1.0), ValueError, r"scale .* must be finite and >= 0.*got scale = -1.0"),
        (dict(scale=float("nan")), ValueError, "got scale = nan"),
        (dict(scale=float("inf")), ValueError, "got scale = inf"),
        (dict(scale=True), TypeError, "scale"),
        (dict(scale="2"), TypeError, "scale"),
        (dict(rescale=-0.1), ValueError, r"rescale .* must lie in \[0, 1\]; got rescale = -0.1"),
        (dict(rescale=1.5), ValueError, "got rescale = 1.5"),
        (dict(rescale=float("nan")), ValueError, "got rescale = nan"),
        (dict(label=3), ValueError, r"label must lie in \[0, 3\).*got label = 3"),
        (dict(label=-1), ValueError, "got label = -1"),
        (dict(label=np.array([0, 5])), ValueError, "got label = 5"),
        (dict(label=np.zeros((2, 1), int)), ValueError, r"shape \(B,\); got shape \(2, 1\)"),
        (dict(label=1.0), TypeError, "label"),
        (dict(label=torch.tensor([0.0])), TypeError, "integer class indices"),
        (dict(label=True), TypeError, "label"),
        (dict(prediction="noise"), ValueError, "prediction must be one of"),
        (dict(prediction="x0"), TypeError, "needs schedule"),
        (dict(null_class=4), ValueError, "null_class = 4 disagrees with the model's num_classes = 3"),
        (dict(null_class=0), ValueError, "null_class must be >= 1"),
    ],
)
def test_guided_bad_input(kwargs, exc, match):
    args = dict(label=1, scale=2.0)
    args.update(kwargs)
    label, scale = args.pop("label"), args.pop("scale")
    with pytest.raises(exc, match=match):
        guided(_m(), label, scale, **args)
    if "prediction" not in kwargs:
        with pytest.raises(exc, match=match):
            guided_denoiser(_m(), label, scale, **args)


def test_guided_bad_models_and_calls(rng):
    with pytest.raises(ValueError, match=r"unconditional \(num_classes = 0\)"):
        guided(UNet(channels=8, channel_mult=(1,), image_size=4), 0, 2.0)
    with pytest.raises(TypeError, match="pass null_class"):
        guided(lambda x, t, y: x, 0, 2.0)
    with pytest.raises(TypeError, match="callable"):
        guided("model", 0, 2.0)
    x = _x(rng)
    with pytest.raises(ValueError, match="label has 2 entries but x holds a batch of 5"):
        guided(_m(), np.array([0, 1]), 2.0)(x, np.arange(5))
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(5,\); got shape \(3,\)"):
        guided(_m(), 0, 2.0)(x, np.arange(3))

    def half(x, t, y):
        return x[: x.shape[0] // 2]

    half.num_classes = 3
    with pytest.raises(ValueError, match=r"returned shape \(5, 2, 3\) for the doubled batch.*expected \(10, 2, 3\)"):
        guided(half, 0, 2.0)(x, np.arange(5))
    with pytest.raises(ValueError, match=r"out of range|must lie in"):
        check_labels(np.array([0, 9]), 3)
    assert check_labels(3, 3, allow_null=True) == 3


# ----------------------------------------------------------------------------- the docs run
def _doc_blocks():
    text = (Path(__file__).resolve().parents[2] / "docs" / "guidance.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S), re.findall(
        r"\nprints[^\n]*\n\n```\n(.*?)```", text, flags=re.S
    )


def test_docs_examples_run_and_print_what_they_say(capsys):
    code, printed = _doc_blocks()
    assert len(code) == 2 and len(printed) == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(code[0], "docs/guidance.md example 1", "exec"), {})
        # numpy only, seeded: the printed table is the one in the docs
        assert capsys.readouterr().out == printed[0]
        exec(compile(code[1], "docs/guidance.md example 2", "exec"), {})
    finally:
        torch.set_num_threads(threads)
    # torch's float rounding differs by platform: check the reading, not the digits
    agree = [float(line.split(": ")[1].split()[0]) for line in capsys.readouterr().out.splitlines()]
    assert len(agree) == 3 and agree[0] < 0.6 and agree[1] > 0.9 and agree[2] > 0.9, agree
