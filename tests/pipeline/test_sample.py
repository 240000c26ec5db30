"""The sampling glue (diffmath.sample) driven by the exact eps of Gaussian data, so each
sampler's output can be judged against the oracle (diffmath.oracle) or the reference loops
(diffmath.samplers) with no network."""

from pathlib import Path

import numpy as np
import pytest
import torch

from diffmath.oracle import GaussianData
from diffmath.pipeline.config import TrainConfig, derive_seed
from diffmath.pipeline.generate import generate
from diffmath.pipeline.loaded import LoadedModel
from diffmath.pipeline.sampler_loops import matched_vpsde, sde_score
from diffmath.samplers import sample_ddim
from diffmath.schedules import named_schedule

torch.set_num_threads(1)

MEAN = np.array([0.5, -0.3])
VAR = np.array([0.04, 0.25])
T = 200


class OracleNet(torch.nn.Module):
    """The exact prediction (eps, x0 or v) for data N(MEAN, diag(VAR)) at a (fractional) index t:
    at a fractional index sigma = sqrt((1 - abar)/abar) interpolates log sigma linearly (the
    convention of diffmath.denoiser and k-diffusion, whose inverse gives every sampler's model
    time), so all three predictions describe one noise level."""

    def __init__(self, s, prediction="eps", learn_sigma=False, v_value=-1.0):
        super().__init__()
        self.s, self.prediction, self.learn_sigma, self.v_value = s, prediction, learn_sigma, v_value

    def forward(self, x, t):
        tt = t.detach().double().cpu().numpy()
        log_sig = 0.5 * np.log(np.expm1(-self.s.log_alphas_cumprod))
        la = -np.log1p(np.exp(2.0 * np.interp(tt, np.arange(self.s.num_timesteps), log_sig)))
        a = torch.as_tensor(np.exp(0.5 * la))[:, None]
        s2 = torch.as_tensor(-np.expm1(la))[:, None]
        m, c = torch.as_tensor(MEAN), torch.as_tensor(VAR)
        xd = x.double()
        eps = s2.sqrt() * (xd - a * m) / (a * a * c + s2)
        x0 = (xd - s2.sqrt() * eps) / a
        out = {"eps": eps, "x0": x0, "v": a * eps - s2.sqrt() * x0}[self.prediction]
        if self.learn_sigma:
            out = torch.cat([out, torch.full_like(out, self.v_value)], dim=1)
        return out.to(x.dtype)


def _loaded(prediction="eps", learn_sigma=False, schedule="linear"):
    cfg = TrainConfig(
        data="gmm", prediction=prediction, learn_sigma=learn_sigma, schedule=schedule, timesteps=T, progress=False
    )
    s = named_schedule(schedule, T)
    return LoadedModel(
        OracleNet(s, prediction, learn_sigma), cfg, s, (2,), None, 0, torch.device("cpu"), Path("oracle")
    )


def _check_moments(x, mean, cov, n_se=5.0, var_rtol=0.12):
    x = np.asarray(x, np.float64)
    n = len(x)
    se = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(x.mean(0) - mean) < n_se * se + 1e-3), (x.mean(0), mean)
    np.testing.assert_allclose(x.var(0, ddof=1), np.diag(cov), rtol=var_rtol)


def test_ddim_glue_matches_the_reference_loop():
    # kernels.ddim_step in sample.py's loop vs diffmath.samplers.sample_ddim, same x_T, eta = 0
    lm = _loaded()
    n = 64
    got = generate(lm, n, sampler="ddim", steps=20, seed=3)
    xT = torch.randn((n, 2), generator=torch.Generator().manual_seed(derive_seed(3, "x_T")))
    ref = sample_ddim(lambda x, t: lm.eps_model(x, t), lm.schedule, steps=20, x_T=xT).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_x0_and_v_models_sample_like_the_eps_model(prediction):
    for sampler, steps in (("ddim", 20), ("em", 50)):
        a = generate(_loaded("eps"), 50, sampler=sampler, steps=steps, seed=1)
        b = generate(_loaded(prediction), 50, sampler=sampler, steps=steps, seed=1)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_ddpm_and_ddim_eta_match_the_exact_output_distribution():
    data = GaussianData(MEAN, np.diag(VAR))
    s = named_schedule("linear", T)
    lm = _loaded()
    x = generate(lm, 4000, sampler="ddpm", steps=50, seed=0)
    ex = data.exact_output(s, "ddpm", steps=50, variance="small")
    _check_moments(x, ex.mean, ex.cov)
    x = generate(lm, 4000, sampler="ddim", steps=25, eta=1.0, seed=0)
    ex = data.exact_output(s, "ddim", steps=25, eta=1.0)
    _check_moments(x, ex.mean, ex.cov)


def test_learned_variance_ddpm():
    # v = -1 selects log Sigma = log beta_tilde (the posterior variance): DDPM with variance "small"
    data = GaussianData(MEAN, np.diag(VAR))
    s = named_schedule("linear", T)
    x = generate(_loaded(learn_sigma=True), 4000, sampler="ddpm", steps=40, seed=2)
    ex = data.exact_output(s, "ddpm", steps=40, variance="small")
    _check_moments(x, ex.mean, ex.cov)


@pytest.mark.parametrize("sampler,steps", [("em", 300), ("pc", 200), ("ode", None)])
def test_sde_samplers_through_the_vp_sde_correspondence(sampler, steps):
    # the exact eps turned into a score (score = -eps / sigma(t)) makes each SDE sampler land
    # on the data distribution up to its discretisation error
    x = generate(_loaded(), 2000 if sampler != "ode" else 500, sampler=sampler, steps=steps, seed=4)
    _check_moments(x, MEAN, np.diag(VAR), n_se=6.0, var_rtol=0.15)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_the_sde_score_is_the_denoisers_tweedie_score(prediction):
    # em/pc/ode take the score of x_t at VP-SDE time t from the one Denoiser (Tweedie), the
    # model queried at t' = the table's time of sigma(t) = s(t)/m(t), interpolated in log sigma.
    # (a) Against the exact score of the data's marginal under VPSDE(0.1, 20, N=T)
    # (diffmath.oracle): OracleNet at t' describes exactly sigma(t), so only rounding remains.
    # (b) Against the former bridge, written out here: the index whose interpolated log abar
    # equals the SDE's log m(t)^2, the prediction there turned into eps with m(t), s(t),
    # score = -eps / s(t). The two model times differ by 0.12 index at t = 0.005, 0.05 at
    # t = 0.02, 0.01 at t = 0.1 and 5e-4 at t = 0.5 (log sigma is curved in the index at low
    # noise), so the former bridge is off by up to ~10% at t = 0.005 and the match tightens with t.
    lm = _loaded(prediction)
    sde = matched_vpsde(lm)
    score = sde_score(lm, sde)
    data = GaussianData(MEAN, np.diag(VAR))
    t = np.array([0.005, 0.02, 0.1, 0.25, 0.5, 0.75, 0.999, 1.0])
    m, std = sde.marginal_coefs(t)
    x = torch.as_tensor(np.random.default_rng(0).standard_normal((t.size, 2)) * 1.5, dtype=torch.float32)
    got = score(x, torch.as_tensor(t)).double().numpy()

    def rel(a, b):
        return np.abs(a - b).max(1) / np.abs(b).max(1)

    # float32: x = x_t/m and D - x lose ~ulp(|x|) / sigma of the score, relatively
    ulp = 8 * 2.0**-24 * x.abs().max(1).values.double().numpy() * m / std
    exact = data.score(x.double().numpy(), t, sde)
    assert np.all(rel(got, exact) < 1e-6 + ulp), rel(got, exact)

    def bridge(x, idx, m, std):
        p = lm.model(x, torch.as_tensor(idx, dtype=torch.float32)).double().numpy()
        xd, m, std = x.double().numpy(), m[:, None], std[:, None]
        eps = {"eps": p, "x0": (xd - m * p) / std, "v": m * p + std * xd}[prediction]
        return -eps / std

    idx = np.interp(-2.0 * np.log(m), -lm.schedule.log_alphas_cumprod, np.arange(T, dtype=np.float64))
    old = bridge(x, idx, m, std)
    assert np.all(rel(got, old) < np.array([0.3, 3e-2, 1e-3, 5e-5, 5e-6, 1e-6, 1e-6, 1e-6]) + ulp), rel(got, old)
    # below the table (t = 1e-3: sigma(t) = 0.0105 < sigma_0 = 0.0224) both query the model at
    # index 0 with the SDE's own m(t), s(t) (clamp_time)
    t0 = np.full(2, 1e-3)
    m0, s0 = sde.marginal_coefs(t0)
    got0 = score(x[:2], torch.as_tensor(t0)).double().numpy()
    ulp0 = 8 * 2.0**-24 * x[:2].abs().max(1).values.double().numpy() * m0 / s0
    assert np.all(rel(got0, bridge(x[:2], np.zeros(2), m0, s0)) < 1e-6 + ulp0)


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.5), ("ddpm", 0.0), ("em", 0.0)])
def test_samples_are_reproducible(sampler, eta):
    lm = _loaded()
    a = generate(lm, 30, sampler=sampler, steps=20, eta=eta, seed=5, batch_size=7)
    b = generate(lm, 30, sampler=sampler, steps=20, eta=eta, seed=5, batch_size=7)
    np.testing.assert_array_equal(a, b)
    c = generate(lm, 30, sampler=sampler, steps=20, eta=eta, seed=6, batch_size=7)
    assert not np.array_equal(a, c)


_CHUNKS = """
import sys; sys.path.insert(0, {tests!r})
import numpy as np, torch
from test_sample import _loaded
from diffmath.pipeline.generate import generate
from diffmath.pipeline.objective import philox_path
assert philox_path(torch.zeros(1))
lm = _loaded()
for sampler, eta in (("ddim", 0.5), ("ddpm", 0.0), ("em", 0.0)):
    a = generate(lm, 12, sampler=sampler, steps=4, eta=eta, seed=5, batch_size=12)
    b = generate(lm, 12, sampler=sampler, steps=4, eta=eta, seed=5, batch_size=5)
    np.testing.assert_array_equal(a, b)
print("ok")
"""


def test_samples_do_not_depend_on_the_chunking_on_the_philox_path():
    # The Triton path draws element i of a call from Philox draw offset + i, so keying the
    # offset by the global sample index makes any chunking draw the same noise. Checked with
    # the Triton interpreter on CPU (the torch fallback keys a fresh stream per call instead).
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "DIFFMATH_KERNELS": "triton", "OMP_NUM_THREADS": "1"}
    code = _CHUNKS.format(tests=str(Path(__file__).parent))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_generate_bad_input():
    lm = _loaded()
    with pytest.raises(ValueError, match="sampler must be one of"):
        generate(lm, 4, sampler="rk4")
    with pytest.raises(ValueError, match=r"steps must lie in \[1, T\] = \[1, 200\]"):
        generate(lm, 4, sampler="ddim", steps=500)
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        generate(lm, 0)
    with pytest.raises(ValueError, match="eta must be finite and >= 0"):
        generate(lm, 4, eta=-1.0)


# ----------------------------------------------------------------------------- x0 clipping by data kind
class ZeroEps(torch.nn.Module):
    """eps = 0: the implied x0 = x_t / sqrt(abar_t) leaves [-1, 1] at high noise, so clipping shows."""

    def forward(self, x, t):
        return torch.zeros_like(x)


def _zero_model(data_shape, bins):
    cfg = TrainConfig(data="digits", timesteps=T, progress=False)
    s = named_schedule("linear", T)
    return LoadedModel(ZeroEps(), cfg, s, data_shape, bins, 0, torch.device("cpu"), Path("zero"))


@pytest.mark.parametrize(
    "data_shape,bins,expected",
    [((1, 8, 8), 17, 1.0), ((3, 16, 16), 256, 1.0), ((2, 4, 4), None, None), ((2,), None, None)],
)
def test_default_clip_only_for_bounded_images(data_shape, bins, expected):
    from diffmath.pipeline.generate import default_clip

    # images on a grid in [-1, 1] are clipped; latents (bins None: unit variance, unbounded) and toy data are not
    assert default_clip(_zero_model(data_shape, bins)) == expected


def test_auto_clip_leaves_latents_alone():
    latent = _zero_model((2, 4, 4), None)
    auto = generate(latent, 8, sampler="ddim", steps=5, seed=0)
    np.testing.assert_array_equal(auto, generate(latent, 8, sampler="ddim", steps=5, seed=0, clip_x0=None))
    assert np.abs(auto).max() > 2  # DDIM with eps = 0 returns x_T / sqrt(abar_T): far outside [-1, 1]
    image = _zero_model((2, 4, 4), 256)  # the same shape, but bounded image data: clipped into [-1, 1]
    clipped = generate(image, 8, sampler="ddim", steps=5, seed=0)
    assert np.abs(clipped).max() <= 1 + 1e-6


def test_save_grid_takes_any_channel_count(tmp_path):
    from PIL import Image

    from diffmath.pipeline.sample_run import save_grid

    for C in (1, 2, 3, 4):
        save_grid(tmp_path / f"g{C}.png", np.linspace(-3, 3, 4 * C * 16, dtype=np.float32).reshape(4, C, 4, 4), nrow=2)
        im = Image.open(tmp_path / f"g{C}.png")
        # C = 1 grey, 3 RGB; other counts put the channels side by side (with a 1-pixel gap) in grey
        width = 2 * ((4 if C in (1, 3) else C * 4 + C - 1) + 1) + 1
        assert im.mode == ("RGB" if C == 3 else "L") and im.size == (width * 4, (2 * 5 + 1) * 4)


# ----------------------------------------------------------------------------- --dtype: the U-Net's precision
class AutocastProbe(torch.nn.Module):
    """OracleNet's exact eps through an identity Linear layer (an op autocast runs in half
    precision), recording the dtype of the input x and of the layer's output at each call."""

    def __init__(self, s):
        super().__init__()
        self.inner = OracleNet(s)
        self.lin = torch.nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.eye(2))
        self.seen = set()

    def forward(self, x, t):
        y = self.lin(self.inner(x, t))
        self.seen.add((x.dtype, y.dtype))
        return y


@pytest.mark.parametrize("sampler,steps", [("ddim", 20), ("ddpm", 20), ("em", 100), ("pc", 50), ("ode", None)])
def test_dtype_bf16_runs_the_net_in_autocast_over_a_float32_state(sampler, steps):
    # --dtype bf16: the network's layers run in bfloat16 (torch.autocast on CPU), its input is
    # the float32 state, the samples are float32 and differ from the float32 network's only by
    # the network's rounding (bf16 epsilon 2^-8 on eps: well under 5% of the data's std here).
    cfg = TrainConfig(data="gmm", timesteps=T, progress=False)
    s = named_schedule("linear", T)
    net = AutocastProbe(s)
    lm = LoadedModel(net, cfg, s, (2,), None, 0, torch.device("cpu"), Path("probe"))
    ref = generate(lm, 200, sampler=sampler, steps=steps, seed=2, dtype="fp32")
    assert net.seen == {(torch.float32, torch.float32)}
    net.seen.clear()
    x = generate(lm, 200, sampler=sampler, steps=steps, seed=2, dtype="bf16")
    assert net.seen == {(torch.float32, torch.bfloat16)} and x.dtype == np.float32
    assert lm.dtype is None  # generate does not change the caller's model
    d = np.abs(x - ref).max(0)
    assert np.all(d < 0.05 * np.sqrt(VAR)), d
    assert not np.array_equal(x, ref)
    np.testing.assert_array_equal(generate(lm, 200, sampler=sampler, steps=steps, seed=2), ref)  # None = fp32 on CPU


def test_dtype_must_be_a_known_precision():
    with pytest.raises(ValueError, match=r"dtype must be one of fp32, bf16, fp16 .*; got 'float8'"):
        generate(_loaded(), 4, dtype="float8")


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_the_default_ladder_has_a_lower_exact_kl_than_karras(name):
    # generate's (and `sample --sigmas`') default ladder: dpmpp-2m driven by the exact denoiser,
    # started as generate starts it, lands closer to the data than on Karras rho = 7 at 10 and 20
    # steps (exact KL, diffmath.oracle); on cosine(1000), sigma_max = 2e4, by 20x or more at 10
    import inspect
    import math

    from diffmath.cli import build_parser
    from diffmath.sample import solver_ladder

    default = inspect.signature(generate).parameters["sigmas"].default
    assert build_parser().parse_args(["sample", "--run", "r"]).sigmas == default == "exponential"
    lm = _loaded()
    lm.schedule = named_schedule(name, 1000)
    for data in (GaussianData([0.5], [[0.01]]), GaussianData(MEAN, np.diag(VAR))):
        for n in (10, 20):
            kl = {}
            for lad in (default, "karras"):
                sig = solver_ladder(lm, n, lad)
                kl[lad] = data.exact_solver_output("dpmpp_2m", sig, start=math.sqrt(1 + float(sig[0]) ** 2)).kl(data)
            assert kl[default] < kl["karras"], (name, n, kl)
            if name == "cosine" and n == 10:
                assert kl[default] < kl["karras"] / 20, kl
