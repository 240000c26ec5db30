"""diffmath.integrations.diffusers: the DDPM/DDIM adapters against diffusers' own classes
(diffusers' float32 error), 50-digit mpmath (float64 steps within 1e-12), diffmath's core
samplers, the exact Gaussian oracle and a real pipeline with a small local UNet2DModel."""

from __future__ import annotations

import inspect
import json
import logging
import subprocess
import sys

import mpmath as mp
import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers.schedulers import scheduling_ddim, scheduling_ddpm  # noqa: E402
from diffusers.utils import torch_utils  # noqa: E402

from diffmath.integrations import diffusers as dm  # noqa: E402
from diffmath.oracle import GaussianData  # noqa: E402
from diffmath.samplers import ddim_step, ddpm_step  # noqa: E402
from tests.reference import _mpref_diffusers as ref  # noqa: E402

SHAPE = (2, 3, 4, 4)
KINDS = ("DDPMScheduler", "DDIMScheduler")
# float64 steps against 50-digit mpmath: the promise (observed ~5e-16; products of a few
# exp/log/sqrt of libm, so far above the ~4 ulp that SIMD libm differences can cost)
TOL_MP = 1e-12
# float32: the adapter rounds its float64 result once (observed <= 3.2e-8 norm-wise)
TOL_FP32 = 1e-7


def make_inputs(sched, t, gen, dtype=torch.float64):
    """(x_t, model output) a perfect model would meet at step t: x_t = sqrt(abar) x0 +
    sqrt(1 - abar) eps with x0, eps ~ N(0, I), and the true eps / v / x0."""
    s = sched.schedule
    x0 = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    eps = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    a, b = float(s.sqrt_alphas_cumprod[t]), float(s.sqrt_one_minus_alphas_cumprod[t])
    x = a * x0 + b * eps
    m = {"epsilon": eps, "v_prediction": a * eps - b * x0, "sample": x0}[sched.config.prediction_type]
    return x.to(dtype), m.to(dtype)


def grid_pairs(sched):
    ts = sched.timesteps.tolist()
    return list(zip(ts, ts[1:] + [-1]))


# ----------------------------------------------------------------------------- import, config
def test_importing_diffmath_does_not_import_diffusers():
    code = "import sys, diffmath, diffmath.integrations; assert 'diffusers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("kind", KINDS)
def test_config_keys_and_defaults_are_diffusers(kind):
    ours = inspect.signature(getattr(dm, kind).__init__).parameters
    theirs = inspect.signature(getattr(diffusers, kind).__init__).parameters
    assert [k for k in ours if k != "diffusers_compat"] == list(theirs)
    for k, p in theirs.items():
        assert ours[k].default == p.default, k
    assert ours["diffusers_compat"].default is False
    assert getattr(dm, kind)._compatibles == getattr(diffusers, kind)._compatibles
    a = getattr(dm, kind)()
    assert a.order == 1 and a.init_noise_sigma == 1.0 and len(a) == 1000
    assert a.timesteps.dtype == torch.int64 and a.timesteps.tolist() == list(range(999, -1, -1))


CONFIGS = {
    "DDPMScheduler": dict(
        beta_schedule="squaredcos_cap_v2",
        variance_type="learned_range",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        clip_sample=False,
        thresholding=True,
        sample_max_value=1.5,
    ),
    "DDIMScheduler": dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
    ),
}


class _Warnings(logging.Handler):
    """Collects the warnings of diffusers' loggers (which do not propagate to the root)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def diffusers_warnings():
    h = _Warnings()
    log = logging.getLogger("diffusers")
    log.addHandler(h)
    yield h.messages
    log.removeHandler(h)


@pytest.mark.parametrize("kind", KINDS)
def test_config_round_trips_both_directions(kind, tmp_path, diffusers_warnings):
    theirs_cls, ours_cls = getattr(diffusers, kind), getattr(dm, kind)
    d = theirs_cls(**CONFIGS[kind])
    a = ours_cls.from_config(d.config)
    assert type(a) is ours_cls
    back = theirs_cls.from_config(a.config)
    assert dict(back.config) == dict(d.config)
    # save_pretrained by either, from_pretrained by the other: same config; diffusers only
    # warns that it ignores the adapter's one extra key
    a.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == kind and saved["diffusers_compat"] is False
    assert set(saved) - {"diffusers_compat"} == set(json.loads(d.to_json_string()))
    d.save_pretrained(tmp_path / "theirs")
    a2 = ours_cls.from_pretrained(tmp_path / "theirs")
    assert diffusers_warnings == []
    d2 = theirs_cls.from_pretrained(tmp_path / "ours")
    assert len(diffusers_warnings) == 1 and "{'diffusers_compat': False}" in diffusers_warnings[0]
    strip = lambda c: {k: v for k, v in c.items() if k != "_use_default_values"}  # noqa: E731
    # (diffusers keeps the key it ignored as a hidden config entry)
    assert {k: v for k, v in strip(d2.config).items() if k != "diffusers_compat"} == strip(d.config)
    assert strip(a2.config) == strip(a.config)
    assert torch.equal(a2.alphas_cumprod, a.alphas_cumprod)
    # the option survives its own round trip; from_config to diffusers drops it silently when
    # it has its default value (diffusers' _use_default_values), and says so otherwise
    c = ours_cls.from_config(d.config, diffusers_compat=True)
    c.save_pretrained(tmp_path / "compat")
    assert ours_cls.from_pretrained(tmp_path / "compat").config.diffusers_compat is True
    diffusers_warnings.clear()
    theirs_cls.from_config(a.config)
    assert diffusers_warnings == []
    theirs_cls.from_config(c.config)
    assert len(diffusers_warnings) == 1 and "diffusers_compat" in diffusers_warnings[0]


def test_pipeline_save_and_load_keeps_the_adapter(tmp_path):
    unet = tiny_unet()
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=dm.DDPMScheduler(num_train_timesteps=100))
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["diffmath.integrations.diffusers", "DDPMScheduler"]
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is dm.DDPMScheduler
    assert loaded.scheduler.config.num_train_timesteps == 100


# ----------------------------------------------------------------------------- the schedule
def _mp_betas(config, T):
    """The betas a config names, from their definitions in 50-digit mpmath."""
    bs, be = mp.mpf(config.get("beta_start", 0.0001)), mp.mpf(config.get("beta_end", 0.02))
    name = config.get("beta_schedule", "linear")
    lin = lambda a, b: [a + (b - a) * i / (T - 1) for i in range(T)]  # noqa: E731
    if name == "linear":
        return lin(bs, be)
    if name == "scaled_linear":
        return [v**2 for v in lin(mp.sqrt(bs), mp.sqrt(be))]
    if name == "sigmoid":
        return [1 / (1 + mp.exp(-u)) * (be - bs) + bs for u in lin(mp.mpf(-6), mp.mpf(6))]
    if name == "squaredcos_cap_v2":
        f = lambda u: mp.cos((u + mp.mpf("0.008")) / mp.mpf("1.008") * mp.pi / 2) ** 2  # noqa: E731
    else:  # laplace

        def f(u):
            c = mp.mpf(1) / 2 - u
            lam = -mp.sign(c or 1) * mp.log(1 - 2 * abs(c) + mp.mpf("1e-6")) / 2
            return mp.sqrt(1 / (1 + mp.exp(-lam)))

    return [min(1 - f(mp.mpf(i + 1) / T) / f(mp.mpf(i) / T), mp.mpf("0.999")) for i in range(T)]


@pytest.mark.parametrize(
    "config",
    [
        {},
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        dict(beta_schedule="squaredcos_cap_v2"),
        dict(beta_schedule="sigmoid"),
        dict(beta_schedule="laplace"),
    ],
    ids=lambda c: c.get("beta_schedule", "linear"),
)
def test_schedule_betas_and_tables_against_mpmath(config):
    T = 200
    a = dm.DDPMScheduler(num_train_timesteps=T, **config)
    with mp.workdps(50):
        betas = _mp_betas(config, T)
        # the cosine/laplace betas are 1 - f(u2)/f(u1): 1e-12 for the laplace, whose abar(u)
        # is evaluated as diffusers does (a ratio, ~eps/beta relative); 4e-14 elsewhere
        tol = 1e-12 if config.get("beta_schedule") == "laplace" else 4e-14
        err = max(abs(mp.mpf(float(o)) / r - 1) for o, r in zip(a.schedule.betas, betas))
        assert err < tol
        p, worst = mp.mpf(1), 0
        for t, b in enumerate(a.schedule.betas.tolist()):
            p *= 1 - mp.mpf(b)
            worst = max(worst, abs(mp.mpf(float(a.schedule.alphas_cumprod[t])) / p - 1))
            # the public float32 table is the float64 value correctly rounded
            assert float(a.alphas_cumprod[t]) == float(np.float32(a.schedule.alphas_cumprod[t]))
        assert worst < 4e-15
    assert a.alphas_cumprod.dtype == a.betas.dtype == torch.float32


# ----------------------------------------------------------------------------- steps
DDIM_CASES = [
    ("eps clip", dict(), 10),
    ("eps", dict(clip_sample=False), 10),
    ("v", dict(prediction_type="v_prediction", clip_sample=False), 10),
    ("sample", dict(prediction_type="sample", clip_sample_range=2.0), 10),
    ("threshold", dict(thresholding=True, sample_max_value=2.0, dynamic_thresholding_ratio=0.9), 10),
    ("no alpha one", dict(set_alpha_to_one=False, beta_start=0.01, clip_sample=False), 10),
    ("offset", dict(steps_offset=1, clip_sample=False), 10),
    ("scaled_linear", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False), 10),
    ("trailing 7", dict(timestep_spacing="trailing", clip_sample=False), 7),
    ("linspace 10", dict(timestep_spacing="linspace", clip_sample=False), 10),
    (
        "zero snr v",
        dict(
            beta_schedule="squaredcos_cap_v2",
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            timestep_spacing="trailing",
            clip_sample=False,
        ),
        5,
    ),
]
DDPM_CASES = [
    ("eps clip", dict(), 10, None),
    ("v large", dict(prediction_type="v_prediction", variance_type="fixed_large", clip_sample=False), 10, None),
    ("sample threshold", dict(prediction_type="sample", thresholding=True, sample_max_value=1.5), 10, None),
    (
        "small_log trailing",
        dict(variance_type="fixed_small_log", timestep_spacing="trailing", clip_sample=False),
        7,
        None,
    ),
    (
        "large_log linspace",
        dict(variance_type="fixed_large_log", timestep_spacing="linspace", clip_sample=False),
        6,
        None,
    ),
    ("custom", dict(variance_type="fixed_large", clip_sample=False), None, [100, 87, 50, 1, 0]),
    ("learned", dict(variance_type="learned", clip_sample=False), 10, None),
    ("learned_range", dict(variance_type="learned_range", clip_sample=False), 10, None),
    ("offset sigmoid", dict(beta_schedule="sigmoid", steps_offset=1, clip_sample=False), 10, None),
    (
        "zero snr v",
        dict(
            beta_schedule="squaredcos_cap_v2",
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            timestep_spacing="trailing",
            clip_sample=False,
        ),
        5,
        None,
    ),
]


def _ddim_ref(sched, x, m, t, t_prev, eta, noise, use_clipped):
    c = sched.config
    threshold = (c.dynamic_thresholding_ratio, c.sample_max_value) if c.thresholding else None
    return ref.ddim_step(
        sched.schedule.betas,
        x,
        m,
        t,
        t_prev,
        eta=eta,
        noise=noise,
        prediction=c.prediction_type,
        clip=c.clip_sample_range if (c.clip_sample and not c.thresholding) else None,
        threshold=threshold,
        final_abar=None if c.set_alpha_to_one else 0,
        use_clipped=use_clipped,
    )


def _ddpm_ref(sched, x, m, t, t_prev, noise, pv):
    c = sched.config
    threshold = (c.dynamic_thresholding_ratio, c.sample_max_value) if c.thresholding else None
    return ref.ddpm_step(
        sched.schedule.betas,
        x,
        m,
        t,
        t_prev,
        noise=noise,
        variance=c.variance_type,
        prediction=c.prediction_type,
        threshold=threshold,
        predicted_variance=pv,
        clip=c.clip_sample_range if (c.clip_sample and not c.thresholding) else None,
    )


def _learned_output(sched, m, gen):
    """The model output for learned variances: (prediction, variance channel)."""
    vt = sched.variance_type if hasattr(sched, "variance_type") else None
    if vt == "learned":
        pv = 1e-3 * (1 + torch.rand(m.shape, generator=gen, dtype=torch.float64))  # a variance
    elif vt == "learned_range":
        pv = 2 * torch.rand(m.shape, generator=gen, dtype=torch.float64) - 1
    else:
        return m, None
    pv = pv.to(m.dtype)
    return torch.cat([m, pv], dim=1), pv


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("name,config,steps", DDIM_CASES, ids=[c[0] for c in DDIM_CASES])
def test_ddim_step_against_mpmath_and_diffusers(name, config, steps, eta):
    gen = torch.Generator().manual_seed(7)
    ours = dm.DDIMScheduler(**config)
    ours.set_timesteps(steps)
    # diffusers' rule is right on leading grids; elsewhere the comparison is with the compat rule
    compat = dm.DDIMScheduler(**config, diffusers_compat=True)
    theirs = diffusers.DDIMScheduler(**config)
    compat.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    use_clipped = bool(config.get("clip_sample", True))
    for t, t_prev in grid_pairs(ours):
        assert int(ours.previous_timestep(t)) == t_prev
        x, m = make_inputs(ours, t, gen)
        noise = torch.randn(SHAPE, generator=gen, dtype=torch.float64) if eta else None
        kw = dict(eta=eta, variance_noise=noise, use_clipped_model_output=use_clipped)
        out = ours.step(m, t, x, **kw)
        r, r_x0 = _ddim_ref(ours, x, m, t, t_prev, eta, noise, use_clipped)
        assert ref.rel_error(out.prev_sample, r) < TOL_MP
        assert ref.rel_error(out.pred_original_sample, r_x0) < TOL_MP
        # float32, with diffusers' previous timestep
        x32, m32 = x.float(), m.float()
        kw32 = dict(kw, variance_noise=noise.float() if eta else None)
        tp_d = t - 1000 // steps
        mine = compat.step(m32, t, x32, **kw32).prev_sample
        d = theirs.step(m32, t, x32, **kw32).prev_sample
        r32, _ = _ddim_ref(ours, x32, m32, t, tp_d, eta, kw32["variance_noise"], use_clipped)
        assert mine.dtype == torch.float32
        assert ref.rel_error(mine, r32) < TOL_FP32
        err_d = ref.rel_error(d, r32)
        assert ref.rel_error(mine, d) <= max(1e-5, err_d + TOL_FP32), (t, err_d)


@pytest.mark.parametrize("name,config,steps,custom", DDPM_CASES, ids=[c[0] for c in DDPM_CASES])
def test_ddpm_step_against_mpmath_and_diffusers(name, config, steps, custom):
    gen = torch.Generator().manual_seed(11)
    ours = dm.DDPMScheduler(**config)
    compat = dm.DDPMScheduler(**config, diffusers_compat=True)
    theirs = diffusers.DDPMScheduler(**config)
    for s in (ours, compat, theirs):
        s.set_timesteps(steps) if custom is None else s.set_timesteps(timesteps=custom)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    for i, (t, t_prev) in enumerate(grid_pairs(ours)):
        assert int(ours.previous_timestep(t)) == t_prev == int(theirs.previous_timestep(t))
        x, m = make_inputs(ours, t, gen)
        mo, pv = _learned_output(ours, m, gen)
        out = ours.step(mo, t, x, generator=torch.Generator().manual_seed(100 + i))
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64)
        r, r_x0 = _ddpm_ref(ours, x, m, t, t_prev, z if t > 0 else None, pv)
        assert ref.rel_error(out.prev_sample, r) < TOL_MP
        assert ref.rel_error(out.pred_original_sample, r_x0) < TOL_MP
        if config.get("variance_type") == "fixed_large_log":
            continue  # diffusers steps with sqrt(log beta) = NaN there
        x32, mo32 = x.float(), mo.float()
        mine = compat.step(mo32, t, x32, generator=torch.Generator().manual_seed(100 + i)).prev_sample
        d = theirs.step(mo32, t, x32, generator=torch.Generator().manual_seed(100 + i)).prev_sample
        z32 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i))
        r32, _ = _ddpm_ref(
            ours, x32, m.float(), t, t_prev, z32 if t_prev >= 0 else None, None if pv is None else pv.float()
        )
        if t_prev >= 0 or t == 0:  # (diffusers' extra noise on a last step from t > 0 is checked below)
            assert ref.rel_error(mine, r32) < TOL_FP32
        err_d = ref.rel_error(d, r32)
        assert ref.rel_error(mine, d) <= max(1e-5, err_d + TOL_FP32), (t, err_d)


def test_ddpm_full_chain_without_set_timesteps():
    gen = torch.Generator().manual_seed(3)
    ours, theirs = dm.DDPMScheduler(clip_sample=False), diffusers.DDPMScheduler(clip_sample=False)
    for t in (999, 500, 1, 0):
        assert ours.previous_timestep(t) == t - 1
        x, m = make_inputs(ours, t, gen)
        out = ours.step(m, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        r, _ = ref.ddpm_step(ours.schedule.betas, x, m, t, t - 1, noise=z)
        assert ref.rel_error(out, r) < TOL_MP
        d = theirs.step(m.float(), t, x.float(), generator=torch.Generator().manual_seed(t)).prev_sample
        r32, _ = ref.ddpm_step(
            ours.schedule.betas,
            x.float(),
            m.float(),
            t,
            t - 1,
            noise=torch.randn(SHAPE, generator=torch.Generator().manual_seed(t)),
        )
        mine = ours.step(m.float(), t, x.float(), generator=torch.Generator().manual_seed(t)).prev_sample
        assert ref.rel_error(mine, r32) < TOL_FP32
        assert ref.rel_error(mine, d) <= max(1e-5, ref.rel_error(d, r32) + TOL_FP32)


def test_steps_are_the_core_step_functions():
    """eps-prediction without clipping: the adapter's step is diffmath.samplers' step."""
    gen = torch.Generator().manual_seed(5)
    a = dm.DDIMScheduler(clip_sample=False, timestep_spacing="linspace")
    a.set_timesteps(9)
    for t, t_prev in grid_pairs(a):
        x, m = make_inputs(a, t, gen)
        z = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
        out = a.step(m, t, x, eta=0.5, variance_noise=z).prev_sample
        core = ddim_step(a.schedule, x, t, t_prev, m, noise=z, eta=0.5)
        torch.testing.assert_close(out, core, rtol=4e-15, atol=4e-15)  # same float64 ops, up to ordering
    p = dm.DDPMScheduler(clip_sample=False, variance_type="fixed_large", timestep_spacing="trailing")
    p.set_timesteps(9)
    chain = p.schedule.respace(p.timesteps.numpy())  # Improved DDPM's respaced chain, as sample_ddpm
    for j, (t, _) in zip(range(8, -1, -1), grid_pairs(p)):
        x, m = make_inputs(p, t, gen)
        out = p.step(m, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        core = ddpm_step(chain, x, j, m, z, variance="large")  # no noise at j = 0 (DDPM Alg. 2)
        # the chain's abar is the original's to an ulp, amplified by 1/sqrt(abar) in x0
        torch.testing.assert_close(out, core, rtol=1e-13, atol=1e-13)


def test_ddpm_last_step_noise_rule():
    """On a trailing grid the last timestep is > 0: diffusers adds sqrt(1 - abar_t) noise there
    with fixed_large; the adapter adds none (DDPM Alg. 2) unless diffusers_compat=True. Both
    draw it, so the generator's stream stays the same."""
    cfg = dict(variance_type="fixed_large", timestep_spacing="trailing", clip_sample=False)
    ours, compat, theirs = (
        dm.DDPMScheduler(**cfg),
        dm.DDPMScheduler(**cfg, diffusers_compat=True),
        diffusers.DDPMScheduler(**cfg),
    )
    for s in (ours, compat, theirs):
        s.set_timesteps(10)
    t = int(ours.timesteps[-1])
    assert t == 99
    x, m = make_inputs(ours, t, torch.Generator().manual_seed(0), torch.float32)
    gens = [torch.Generator().manual_seed(1) for _ in range(3)]
    o, c, d = (s.step(m, t, x, generator=g) for s, g in zip((ours, compat, theirs), gens))
    assert torch.equal(o.prev_sample, o.pred_original_sample)  # the step to t' = -1 returns x0
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    expected = o.pred_original_sample.double() + float(ours.schedule.sqrt_one_minus_alphas_cumprod[t]) * z.double()
    assert ref.rel_error(c.prev_sample, expected) < TOL_FP32
    assert ref.rel_error(c.prev_sample, d.prev_sample) < 1e-5
    assert all(torch.equal(gens[0].get_state(), g.get_state()) for g in gens[1:])


def test_ddim_previous_timestep_fixes_diffusers_rule():
    """linspace and non-divisible trailing grids: the adapter steps to the next timestep of the
    grid; diffusers (and diffusers_compat=True) to t - T // S (issues #11347, #12633)."""
    for spacing, S in (("linspace", 10), ("trailing", 7), ("trailing", 3)):
        ours = dm.DDIMScheduler(timestep_spacing=spacing)
        compat = dm.DDIMScheduler(timestep_spacing=spacing, diffusers_compat=True)
        ours.set_timesteps(S)
        compat.set_timesteps(S)
        ts = ours.timesteps.tolist()
        assert [int(ours.previous_timestep(t)) for t in ts] == ts[1:] + [-1]
        assert [int(compat.previous_timestep(t)) for t in ts] == [t - 1000 // S for t in ts]
    ours = dm.DDIMScheduler()
    ours.set_timesteps(10)
    # leading: the same steps as diffusers' rule (its last, 0 - 100, also means the final alpha)
    assert [int(ours.previous_timestep(t)) for t in ours.timesteps] == list(range(800, -1, -100)) + [-1]


# ----------------------------------------------------------------------------- dtypes, noise, forward
@pytest.mark.parametrize("kind", KINDS)
def test_dtypes_follow_diffusers(kind):
    a = getattr(dm, kind)()
    a.set_timesteps(10)
    t = int(a.timesteps[3])
    x, m = make_inputs(a, t, torch.Generator().manual_seed(0), torch.float32)
    for xd, md, want in (
        (torch.float16, torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.float16, torch.float32),
        (torch.float64, torch.float64, torch.float64),
    ):
        out = a.step(m.to(md), t, x.to(xd), generator=torch.Generator().manual_seed(0))
        assert out.prev_sample.dtype == want and out.pred_original_sample.dtype == want
    if kind == "DDIMScheduler":  # half precision: computed in float64 and rounded once
        out = a.step(m.half(), t, x.half()).prev_sample
        assert torch.equal(out, a.step(m.half().double(), t, x.half().double()).prev_sample.half())


def test_ddim_noise_is_drawn_like_diffusers():
    ours, theirs = dm.DDIMScheduler(clip_sample=False), diffusers.DDIMScheduler(clip_sample=False)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    x, _ = make_inputs(ours, 999, torch.Generator().manual_seed(0), torch.float32)
    xa, xd = x.clone(), x.clone()
    ga, gd = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for t in ours.timesteps:
        xa = ours.step(0.1 * xa, t, xa, eta=0.7, generator=ga).prev_sample
        xd = theirs.step(0.1 * xd, t, xd, eta=0.7, generator=gd).prev_sample
    assert torch.equal(ga.get_state(), gd.get_state())
    assert ref.rel_error(xa, xd) < 1e-5
    with pytest.raises(ValueError, match="Cannot pass both generator and variance_noise"):
        ours.step(x, 900, x, eta=1.0, generator=ga, variance_noise=x)


@pytest.mark.parametrize("kind", KINDS)
def test_add_noise_and_get_velocity(kind):
    a, d = (
        getattr(dm, kind)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        getattr(diffusers, kind)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    )
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn((4, 3, 2, 2), generator=gen, dtype=torch.float64)
    eps = torch.randn((4, 3, 2, 2), generator=gen, dtype=torch.float64)
    for t in (torch.tensor([0, 1, 500, 999]), torch.tensor([637])):
        xt, v = a.add_noise(x0, eps, t), a.get_velocity(x0, eps, t)
        tt = t.tolist() * (4 if t.numel() == 1 else 1)
        with mp.workdps(50):
            for i, ti in enumerate(tt):
                ab = ref.abar(a.schedule.betas, ti)
                sa, sb = mp.sqrt(ab), mp.sqrt(1 - ab)
                rx = [
                    float(sa * mp.mpf(p) + sb * mp.mpf(e))
                    for p, e in zip(x0[i].flatten().tolist(), eps[i].flatten().tolist())
                ]
                rv = [
                    float(sa * mp.mpf(e) - sb * mp.mpf(p))
                    for p, e in zip(x0[i].flatten().tolist(), eps[i].flatten().tolist())
                ]
                assert ref.rel_error(xt[i].flatten(), rx) < TOL_MP
                assert ref.rel_error(v[i].flatten(), rv) < TOL_MP
        assert ref.rel_error(a.add_noise(x0.float(), eps.float(), t), d.add_noise(x0.float(), eps.float(), t)) < 1e-5
        assert (
            ref.rel_error(a.get_velocity(x0.float(), eps.float(), t), d.get_velocity(x0.float(), eps.float(), t)) < 1e-5
        )
        assert a.add_noise(x0.float(), eps.float(), t).dtype == torch.float32
    assert torch.equal(a.scale_model_input(x0, 3), x0)


# ----------------------------------------------------------------------------- bad input
def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\]"):
        dm.DDPMScheduler(beta_start=0.1, beta_end=2)
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\]"):
        dm.DDIMScheduler(beta_start=0.0)
    with pytest.raises(ValueError, match="trained_betas"):
        dm.DDIMScheduler(trained_betas=[0.1, 1.3])
    with pytest.raises(ValueError, match="variance_type must be one of"):
        dm.DDPMScheduler(variance_type="other")
    with pytest.raises(NotImplementedError, match="squaredcos_cap_v3 is not implemented"):
        dm.DDIMScheduler(beta_schedule="squaredcos_cap_v3")
    with pytest.raises(ValueError, match="prediction_type"):
        dm.DDIMScheduler(prediction_type="score")
    with pytest.raises(ValueError, match="timestep_spacing"):
        dm.DDPMScheduler(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="T >= 2"):
        dm.DDPMScheduler(num_train_timesteps=1, rescale_betas_zero_snr=True)
    with pytest.raises(TypeError, match="diffusers_compat"):
        dm.DDIMScheduler(diffusers_compat="yes")
    s = dm.DDIMScheduler(trained_betas=[0.1, 0.3])  # diffusers' test builds this: refused when used
    with pytest.raises(ValueError, match="num_train_timesteps=2"):
        s.set_timesteps(2)


def test_bad_steps_get_clear_errors():
    ddim = dm.DDIMScheduler()
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="you need to run 'set_timesteps'"):
        ddim.step(x, 999, x)
    with pytest.raises(ValueError, match="cannot be larger than"):
        ddim.set_timesteps(1001)
    ddim.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 901 is not on the inference grid"):
        ddim.step(x, 901, x)
    with pytest.raises(ValueError, match="shape of sample"):
        ddim.step(x[:1], 900, x)
    with pytest.raises(TypeError, match="floating-point"):
        ddim.step(x.long(), 900, x)
    with pytest.raises(ValueError, match="integer timestep"):
        ddim.step(x, 900.5, x)
    compat = dm.DDIMScheduler(diffusers_compat=True)
    compat.set_timesteps(10)
    compat.step(x, 901, x)  # diffusers accepts it (prev = 801), and so does the compat rule
    with pytest.raises(ValueError, match=r"lie in \[0, 1000\)"):
        compat.step(x, 1000, x)
    ddpm = dm.DDPMScheduler(variance_type="learned_range")
    with pytest.raises(ValueError, match="twice the sample's channels"):
        ddpm.step(x, 999, x)
    with pytest.raises(ValueError, match="custom_timesteps` must be in descending order"):
        ddpm.set_timesteps(timesteps=[100, 87, 50, 51, 0])
    with pytest.raises(ValueError, match="Can only pass one of"):
        ddpm.set_timesteps(5, timesteps=[100, 87, 50, 1, 0])
    with pytest.raises(ValueError, match="must start before"):
        ddpm.set_timesteps(timesteps=[1000])
    ddpm.set_timesteps(timesteps=[100, 87, 50, 1, 0])
    with pytest.raises(ValueError, match="timestep 99 is not on the inference grid"):
        ddpm.step(torch.cat([x, x], 1), 99, x)
    learned = dm.DDPMScheduler(variance_type="learned")
    with pytest.raises(ValueError, match="negative value"):
        learned.step(torch.cat([x, x - 1], 1), 500, x)
    zsnr = dm.DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    zsnr.set_timesteps(10)
    with pytest.raises(ValueError, match="alphas_cumprod = 0"):  # eps says nothing about x0 there
        zsnr.step(x, 999, x)
    with pytest.raises(ValueError, match="steps_offset"):
        dm.DDIMScheduler(num_train_timesteps=10, steps_offset=1).set_timesteps(10)


# ----------------------------------------------------------------------------- pipelines
def tiny_unet():
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    return unet.eval()


@pytest.mark.parametrize(
    "pipeline,kind,kwargs",
    [
        ("DDIMPipeline", "DDIMScheduler", dict(num_inference_steps=8, eta=0.0)),
        ("DDIMPipeline", "DDIMScheduler", dict(num_inference_steps=8, eta=1.0)),
        ("DDPMPipeline", "DDPMScheduler", dict(num_inference_steps=8)),
    ],
)
def test_pipeline_gives_diffusers_images(pipeline, kind, kwargs):
    unet = tiny_unet()
    pipe = getattr(diffusers, pipeline)(unet=unet, scheduler=getattr(diffusers, kind)())
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    want = pipe(batch_size=2, generator=g, output_type="np", **kwargs).images
    state = g.get_state()
    pipe.scheduler = getattr(dm, kind).from_config(pipe.scheduler.config)  # the one-line swap
    assert type(pipe.scheduler) is getattr(dm, kind)
    g = torch.Generator().manual_seed(0)
    got = pipe(batch_size=2, generator=g, output_type="np", **kwargs).images
    assert torch.equal(g.get_state(), state)  # the same draws, in the same order
    assert np.abs(got - want).max() <= 1e-3


# ----------------------------------------------------------------------------- exact oracle
DATA = GaussianData([0.5, -0.3], [[0.04, 0.01], [0.01, 0.09]])


def oracle_output(sched, s, dtype, monkeypatch, **step_kwargs):
    """The exact output distribution of the scheduler's full loop driven by the data's exact
    eps from x_T ~ N(0, I): the loop is affine in (x_T, z_1, .., z_K), so one batched run on
    the basis vectors (x_T = e_i, then z_k = e_i one draw at a time, the draws replaced by a
    stub of randn_tensor) gives mean' = b and cov' = A A^T + sum_k N_k N_k^T."""
    D, K = DATA.dim, len(sched.timesteps)
    x = torch.zeros(1 + D + K * D, D, dtype=dtype)
    x[1 : 1 + D] = torch.eye(D, dtype=dtype)
    calls = []

    def stub(shape, generator=None, device=None, dtype=None, layout=None):
        k = len(calls)
        calls.append(k)
        z = torch.zeros(shape, dtype=dtype)
        if k < K:
            z[1 + D + k * D : 1 + D + (k + 1) * D] = torch.eye(D, dtype=dtype)
        return z

    for mod in (torch_utils, scheduling_ddim, scheduling_ddpm):
        monkeypatch.setattr(mod, "randn_tensor", stub)
    for t in sched.timesteps:
        eps = torch.as_tensor(DATA.eps(x.double().numpy(), int(t), s)).to(dtype)
        x = sched.step(eps, t, x, **step_kwargs).prev_sample
    monkeypatch.undo()
    assert len(calls) <= K
    out = x.double().numpy()
    b = out[0]
    A = (out[1 : 1 + D] - b).T
    cov = A @ A.T
    for k in range(len(calls)):
        N = (out[1 + D + k * D : 1 + D + (k + 1) * D] - b).T
        cov += N @ N.T
    return GaussianData(b, 0.5 * (cov + cov.T))


ORACLE_CASES = [
    ("DDIMScheduler", dict(), 10, dict(eta=0.0), True),
    ("DDIMScheduler", dict(), 10, dict(eta=1.0), True),
    ("DDIMScheduler", dict(steps_offset=1), 10, dict(eta=0.0), True),
    ("DDIMScheduler", dict(timestep_spacing="trailing"), 10, dict(eta=0.0), True),
    ("DDPMScheduler", dict(), 10, {}, True),
    ("DDPMScheduler", dict(variance_type="fixed_large"), 10, {}, True),
    ("DDPMScheduler", dict(variance_type="fixed_large", timestep_spacing="trailing"), 7, {}, True),
    ("DDPMScheduler", dict(timestep_spacing="linspace"), 9, {}, True),
    # diffusers' misstep (t - T // S) on these grids leaves residual noise at the end, which
    # happens to offset few-step DDIM's under-dispersion on this oracle: not compared (docs/diffusers.md)
    ("DDIMScheduler", dict(timestep_spacing="linspace"), 10, dict(eta=0.0), False),
    ("DDIMScheduler", dict(timestep_spacing="trailing"), 7, dict(eta=0.0), False),
]


@pytest.mark.parametrize("kind,config,steps,step_kwargs,compare", ORACLE_CASES)
def test_oracle_kl_of_the_full_loop(kind, config, steps, step_kwargs, compare, monkeypatch):
    config = dict(config, clip_sample=False)  # clipping is not affine
    ours, theirs = getattr(dm, kind)(**config), getattr(diffusers, kind)(**config)
    compat = getattr(dm, kind)(**config, diffusers_compat=True)
    for sch in (ours, theirs, compat):
        sch.set_timesteps(steps)
    s = ours.schedule
    kl = oracle_output(ours, s, torch.float64, monkeypatch, **step_kwargs).kl(DATA)
    kl_d = oracle_output(theirs, s, torch.float32, monkeypatch, **step_kwargs).kl(DATA)
    kl_c = oracle_output(compat, s, torch.float32, monkeypatch, **step_kwargs).kl(DATA)
    # the adapter's loop is diffmath's own sampler, whose exact output the oracle knows
    spacing = config.get("timestep_spacing", "leading")
    if kind == "DDIMScheduler" and "steps_offset" not in config:
        core = DATA.exact_output(s, "ddim", steps, eta=step_kwargs["eta"], spacing=spacing)
        assert kl == pytest.approx(core.kl(DATA), rel=1e-9)
    elif kind == "DDPMScheduler":
        var = "large" if config.get("variance_type") == "fixed_large" else "small"
        core = DATA.exact_output(s, "ddpm", steps, spacing=spacing, variance=var)
        assert kl == pytest.approx(core.kl(DATA), rel=1e-9)
    # diffusers_compat reproduces diffusers up to its float32 error
    assert kl_c == pytest.approx(kl_d, rel=1e-4)
    if compare:
        # never worse than diffusers beyond float32 noise in diffusers' own tables
        assert kl <= kl_d * (1 + 1e-4), (kl, kl_d)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_steps_match_cpu(kind):
    cpu, gpu = getattr(dm, kind)(clip_sample=False), getattr(dm, kind)(clip_sample=False)
    theirs = getattr(diffusers, kind)(clip_sample=False)
    cpu.set_timesteps(10)
    gpu.set_timesteps(10, device="cuda")
    theirs.set_timesteps(10, device="cuda")
    assert gpu.timesteps.device.type == "cuda"
    x, m = make_inputs(cpu, 900, torch.Generator().manual_seed(0), torch.float32)
    for t in cpu.timesteps.tolist():
        # a CPU generator: randn_tensor draws on the CPU and moves the noise, the same numbers everywhere
        kw = dict(eta=1.0) if kind == "DDIMScheduler" else {}
        a = cpu.step(m, t, x, generator=torch.Generator().manual_seed(t), **kw).prev_sample
        b = gpu.step(
            m.cuda(), gpu.timesteps[0].new_tensor(t), x.cuda(), generator=torch.Generator().manual_seed(t), **kw
        )
        d = theirs.step(m.cuda(), t, x.cuda(), generator=torch.Generator().manual_seed(t), **kw).prev_sample
        assert b.prev_sample.device.type == "cuda" and b.prev_sample.dtype == torch.float32
        assert ref.rel_error(b.prev_sample, a) < 2 * TOL_FP32
        assert ref.rel_error(b.prev_sample, d) < 1e-5
