"""diffmath sample --class / --guidance: classifier-free guidance in every sampler, judged by an
exact conditional model (a Gaussian mixture whose label k gives the exact eps of component k and
whose null label gives the mixture's), the batching against separate network calls, the files,
and the bad input that must be refused before any work."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffmath.guidance import classifier_free_guidance
from diffmath.oracle import GaussianData
from diffmath.parameterization import eps_from_prediction
from diffmath.pipeline.config import TrainConfig
from diffmath.pipeline.generate import class_labels, generate, parse_classes
from diffmath.pipeline.loaded import LoadedModel
from diffmath.pipeline.sample_run import sample_run
from diffmath.pipeline.sampler_loops import matched_vpsde, sde_score
from diffmath.schedules import named_schedule

torch.set_num_threads(1)

T = 200
MEANS = np.array([[-1.0, 0.3], [1.0, -0.2]])
VARS = np.array([[0.05, 0.1], [0.08, 0.04]])


def _abar(s, t):
    """abar at a (fractional) index t: log sigma = log sqrt((1 - abar)/abar) interpolated
    linearly (the model time convention of diffmath.denoiser)."""
    tt = t.detach().double().cpu().numpy()
    log_sig = 0.5 * np.log(np.expm1(-s.log_alphas_cumprod))
    return 1.0 / (1.0 + np.exp(2.0 * np.interp(tt, np.arange(s.num_timesteps), log_sig)))


class MixtureNet(torch.nn.Module):
    """The exact prediction (eps, x0 or v) of class y at a (fractional) index t: y = k is the
    Gaussian component N(MEANS[k], diag(VARS[k])), y = 2 (the null label) the equal-weight
    mixture of both. forward(x, t, y=None) as the conditional networks; counts its calls."""

    num_classes = 2

    def __init__(self, s, prediction="eps", learn_sigma=False, means=MEANS, variances=VARS):
        super().__init__()
        self.s, self.prediction, self.learn_sigma, self.calls = s, prediction, learn_sigma, []
        self.means, self.variances = means, variances

    def forward(self, x, t, y=None):
        self.calls.append(x.shape[0])
        y = torch.full((x.shape[0],), 2) if y is None else torch.as_tensor(y).reshape(-1).expand(x.shape[0])
        a = torch.as_tensor(_abar(self.s, torch.as_tensor(t).reshape(-1).expand(x.shape[0])))[:, None]
        s2 = 1 - a
        xd = x.double()
        scores, logp = [], []
        for m, v in zip(torch.as_tensor(self.means), torch.as_tensor(self.variances)):
            var = a * v + s2
            scores.append(-(xd - a.sqrt() * m) / var)
            logp.append((-0.5 * (xd - a.sqrt() * m) ** 2 / var - 0.5 * torch.log(var)).sum(1))
        r = torch.softmax(torch.stack(logp, 1), dim=1)  # the components' responsibilities
        mix = r[:, :1] * scores[0] + r[:, 1:] * scores[1]
        score = torch.where((y == 0)[:, None], scores[0], torch.where((y == 1)[:, None], scores[1], mix))
        eps = -s2.sqrt() * score
        x0 = (xd - s2.sqrt() * eps) / a.sqrt()
        out = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - s2.sqrt() * x0}[self.prediction]
        if self.learn_sigma:
            out = torch.cat([out, torch.where((y < 2)[:, None], -1.0, 1.0).double().expand_as(out)], dim=1)
        return out.to(x.dtype)


def _loaded(prediction="eps", learn_sigma=False, uncond_prob=0.1, **mixture):
    cfg = TrainConfig(
        data="gmm",
        prediction=prediction,
        learn_sigma=learn_sigma,
        timesteps=T,
        progress=False,
        conditional=True,
        uncond_prob=uncond_prob,
        num_classes=2,
        class_names=["left", "right"],
    )
    s = named_schedule("linear", T)
    return LoadedModel(
        MixtureNet(s, prediction, learn_sigma, **mixture), cfg, s, (2,), None, 0, torch.device("cpu"), Path("mixture")
    )


def _check_moments(x, mean, cov, n_se=5.0, bias=0.03):
    """Mean within n_se standard errors; variance within n_se of its standard error
    sqrt(2 / (n - 1)) (relative, Gaussian data) plus ``bias`` for the samplers' discretisation
    (em, pc and ode are judged against the data distribution itself)."""
    x = np.asarray(x, np.float64)
    n = len(x)
    se = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(x.mean(0) - mean) < n_se * se + 2e-3), (x.mean(0), mean)
    np.testing.assert_allclose(x.var(0, ddof=1), np.diag(cov), rtol=n_se * np.sqrt(2 / (n - 1)) + bias)


# ----------------------------------------------------------------------------- exact targets
# every sampler with an eps network; x0 and v through both conversions (the discrete tables of
# ddim/ddpm, the VP-SDE's m(t), s(t) of em/pc/ode)
CASES = [
    ("ddim", 50, "eps"),
    ("ddpm", 50, "eps"),
    ("em", 300, "eps"),
    ("pc", 200, "eps"),
    ("ode", None, "eps"),
    ("ddim", 50, "x0"),
    ("em", 300, "x0"),
    ("ddpm", 50, "v"),
    ("ode", None, "v"),
    ("heun", 30, "eps"),
    ("dpmpp-2m", 30, "v"),
    ("unipc", 30, "x0"),
    ("dpmpp-2m-sde", 40, "eps"),
]
DISCRETE = ("ddim", "ddpm")


@pytest.mark.parametrize("sampler,steps,prediction", CASES)
def test_each_class_lands_on_its_component_and_the_null_label_on_the_mixture(sampler, steps, prediction):
    lm = _loaded(prediction)
    n = 1200
    y = class_labels([1, 0], 2 * n)
    x = generate(lm, 2 * n, sampler=sampler, steps=steps, seed=3, labels=y, guidance=1.0)
    for k in (0, 1):
        target = GaussianData(MEANS[k], np.diag(VARS[k]))
        if sampler in DISCRETE:  # the exact output of the discrete chain
            target = target.exact_output(lm.schedule, sampler, steps=steps, variance="small")
        _check_moments(x[y == k], target.mean, target.cov)
    # s = 0 asks the unconditional model whatever the labels: the same samples as no labels at all
    x0 = generate(lm, 2 * n, sampler=sampler, steps=steps, seed=3, labels=y, guidance=0.0)
    np.testing.assert_array_equal(x0, generate(lm, 2 * n, sampler=sampler, steps=steps, seed=3))
    left = (x0[:, 0] < 0).mean()  # the mixture: half the mass on each side (binomial, 5 sigma)
    assert abs(left - 0.5) < 5 * np.sqrt(0.25 / len(x0))


def test_ddim_at_s1_matches_the_exact_output_distribution_of_the_component():
    s = named_schedule("linear", T)
    x = generate(_loaded(), 3000, sampler="ddim", steps=25, seed=1, labels=1, guidance=1.0)
    ex = GaussianData(MEANS[1], np.diag(VARS[1])).exact_output(s, "ddim", steps=25)
    _check_moments(x, ex.mean, ex.cov, bias=0.0)


@pytest.mark.parametrize(
    "sampler,steps",
    [
        ("ddim", 50),
        ("ddpm", 50),
        ("em", 300),
        ("pc", 200),
        ("ode", None),
        ("dpmpp-2m", 20),
        ("euler-a", 40),
        ("unipc", 20),
        ("lms", 20),
        ("edm", 20),
    ],
)
def test_guidance_trades_diversity_for_agreement_in_every_sampler(sampler, steps):
    # overlapping classes (as docs/guidance.md's example): at s = 1 about 92% of class 1 lies right of 0
    lm = _loaded("v", means=np.array([[-1.0, 0.0], [1.0, 0.0]]), variances=np.full((2, 2), 0.5))
    n = 1000
    right, spread = [], []
    for scale in (1.0, 3.0):
        x = generate(lm, n, sampler=sampler, steps=steps, seed=2, labels=1, guidance=scale)
        right.append((x[:, 0] > 0).mean())
        spread.append(x[:, 0].std())
    # the same start and noise at both scales (common random numbers): a smaller spread is guidance's doing
    assert right[0] < 0.96 and right[1] > right[0] + 0.03 and spread[1] < 0.9 * spread[0]


# ----------------------------------------------------------------------------- one batched call
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_guided_eps_is_the_combination_of_two_separate_calls(prediction):
    lm = _loaded(prediction)
    net, s = lm.model, lm.schedule
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, generator=g)
    t = torch.tensor([0, 3, 50, 120, 199, 77])
    y = torch.tensor([0, 1, 1, 0, 0, 1])
    eps_c = eps_from_prediction(prediction, s, x, t, net(x, t, y))
    eps_u = eps_from_prediction(prediction, s, x, t, net(x, t, None))
    for scale, phi in ((3.0, 0.0), (2.5, 0.7), (1.0, 0.0), (0.0, 0.0)):
        net.calls.clear()
        got = lm.conditioned(y.numpy(), scale, phi).eps_model(x, t)
        # one network call per step: on the doubled batch, or on the batch itself at s = 0, 1
        assert net.calls == ([12] if (phi or scale not in (0, 1)) else [6])
        ref = classifier_free_guidance(eps_c, eps_u, scale, phi)
        torch.testing.assert_close(got, ref.to(got.dtype), rtol=1e-5, atol=1e-6)
    # the score samplers' score (Tweedie on the guided denoiser at sigma = s(t)/m(t)) is the
    # score of the guided eps: -eps_s / s(t), each half converted with the VP-SDE's m(t), s(t)
    from diffmath.denoiser import sigma_to_t_schedule

    lmc = lm.conditioned(y.numpy(), 2.0)
    sde = matched_vpsde(lmc)
    sc = sde_score(lmc, sde)
    tc = torch.full((6,), 0.4, dtype=torch.float64)
    mm, ss = sde.marginal_coefs(tc.numpy())
    idx = torch.as_tensor(sigma_to_t_schedule(s, ss / mm), dtype=torch.float32)  # the model time at sigma
    m, std = (torch.as_tensor(v, dtype=torch.float32)[:, None] for v in (mm, ss))

    def to_eps(p):
        return {"eps": p, "x0": (x - m * p) / std, "v": m * p + std * x}[prediction]

    for scale, phi in ((2.0, 0.0), (2.5, 0.7)):
        net.calls.clear()
        got = sde_score(lm.conditioned(y.numpy(), scale, phi), sde)(x, tc)
        assert net.calls == [12]  # one call on the doubled batch
        ref = classifier_free_guidance(to_eps(net(x, idx, y)), to_eps(net(x, idx, None)), scale, phi)
        torch.testing.assert_close(got, -ref / std, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sc(x, tc), sde_score(lm.conditioned(y.numpy(), 2.0), sde)(x, tc))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_the_solvers_guided_denoiser_is_the_combination_of_two_separate_denoisers(prediction):
    from diffmath.denoiser import Denoiser
    from diffmath.pipeline.sampler_loops import guided_solver_denoiser

    lm = _loaded(prediction)
    net = lm.model
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.05, 0.3, 1.0, 4.0, 20.0])
    y = np.array([1, 0, 1, 1, 0])
    d_c = Denoiser.from_schedule(lambda xt, t: net(xt, t, torch.as_tensor(y)), lm.schedule, prediction)(x, sigma)
    d_u = Denoiser.from_schedule(lambda xt, t: net(xt, t, None), lm.schedule, prediction)(x, sigma)
    for scale, phi in ((4.0, 0.0), (2.0, 0.6), (1.0, 0.0), (0.0, 0.0)):
        net.calls.clear()
        got = guided_solver_denoiser(lm.conditioned(y, scale, phi))(x, sigma)
        assert net.calls == ([10] if (phi or scale not in (0, 1)) else [5])
        # D = x - sigma eps: the rescale acts on eps = (x - D) / sigma
        e_c, e_u = (x - d_c) / sigma[:, None], (x - d_u) / sigma[:, None]
        ref = x - sigma[:, None] * classifier_free_guidance(e_c, e_u, scale, phi)
        torch.testing.assert_close(got, ref.to(got.dtype), rtol=1e-5, atol=1e-5)


def test_learned_variance_is_the_conditional_halfs():
    # MixtureNet's variance channel is v = -1 (beta_tilde) for a class and +1 (beta) for the null label:
    # DDPM must use the conditional half's, which at s = 3 gives a different chain than the null's
    lm = _loaded(learn_sigma=True)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    t = torch.full((4,), 60)
    eps, v = lm.conditioned(np.ones(4, np.int64), 3.0).guided_eps(x, t, lambda xx, tt, p: p)
    assert torch.equal(v, torch.full((4, 2), -1.0)) and eps.shape == (4, 2)
    out = generate(lm, 500, sampler="ddpm", steps=40, seed=0, labels=1, guidance=1.0)
    ex = GaussianData(MEANS[1], np.diag(VARS[1])).exact_output(
        named_schedule("linear", T), "ddpm", steps=40, variance="small"
    )
    _check_moments(out, ex.mean, ex.cov)


# ----------------------------------------------------------------------------- requests
def test_parse_classes():
    assert parse_classes(4, 10) == [4]
    assert parse_classes("0-9", 10) == list(range(10))
    assert parse_classes("all", 3) == [0, 1, 2]
    assert parse_classes("1,3, 5", 10) == [1, 3, 5]
    assert parse_classes("0-2,7", 10) == [0, 1, 2, 7]
    assert parse_classes("cat,dog", 2, ("cat", "dog")) == [0, 1]
    assert parse_classes([2, 0], 3) == [2, 0]
    for bad, msg in (
        ("10", r"class 10 is outside \[0, 10\)"),
        ("-1", r"class -1 is outside \[0, 10\)"),
        (12, r"class 12 is outside \[0, 10\)"),
        ("5-2", "runs backwards"),
        ("x", "is not a class index"),
        ("1,,2", "an empty entry"),
        ([], "is empty"),
        ("0-10", r"class 10 is outside"),
    ):
        with pytest.raises(ValueError, match=msg):
            parse_classes(bad, 10)
    with pytest.raises(TypeError):
        parse_classes(True, 10)
    with pytest.raises(ValueError, match=r"valid: \[0, 2\) \(the run's classes: 0 = cat, 1 = dog\)"):
        parse_classes("bird", 2, ("cat", "dog"))


def test_class_labels_are_equal_blocks():
    assert class_labels([3, 1], 6).tolist() == [3, 3, 3, 1, 1, 1]
    with pytest.raises(ValueError, match=r"num_samples = 500 is not a multiple of the 3 classes asked .* 498 or 501"):
        class_labels([0, 1, 2], 500)


def test_generate_refuses_bad_conditioning():
    lm = _loaded()
    for kw, err, msg in (
        (dict(labels=2), ValueError, r"class must lie in \[0, 2\)"),
        (dict(labels=[0, 1, 0]), ValueError, "one class per sample: 3 labels for num_samples = 4"),
        (dict(labels=0, guidance=-1.0), ValueError, r"guidance must be finite and >= 0 .* got guidance = -1.0"),
        (dict(labels=0, guidance=float("nan")), ValueError, "guidance must be finite and >= 0"),
        (dict(labels=0, guidance=float("inf")), ValueError, "guidance must be finite and >= 0"),
        (dict(labels=0, guidance_rescale=1.5), ValueError, r"guidance_rescale must be in \[0, 1\]"),
        (dict(guidance=2.0), ValueError, "--guidance needs --class"),
        (dict(labels=0, guidance="3"), TypeError, "guidance must be a real number"),
    ):
        with pytest.raises(err, match=msg):
            generate(lm, 4, steps=2, **kw)
    with pytest.raises(ValueError, match=r"trained without label dropout \(uncond_prob = 0\)"):
        generate(_loaded(uncond_prob=0.0), 4, steps=2, labels=0, guidance=3.0)
    generate(_loaded(uncond_prob=0.0), 4, steps=2, labels=0, guidance=1.0)  # the plain conditional model is fine


# ----------------------------------------------------------------------------- a trained run, end to end
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
    from diffmath.pipeline.loop import train

    root = tmp_path_factory.mktemp("runs")
    train(TrainConfig(**TINY, conditional=True), root / "cond")
    train(TrainConfig(**TINY), root / "uncond")
    return root


def test_sample_run_writes_labels_and_a_row_per_class(runs, tmp_path):
    from PIL import Image

    info = sample_run(
        tmp_path / "s",
        run=runs / "cond",
        num_samples=12,
        steps=3,
        classes="2,7,4",
        guidance=2.0,
        guidance_rescale=0.5,
        progress=False,
        device="cpu",
    )
    with np.load(tmp_path / "s" / "samples.npz", allow_pickle=False) as z:
        assert z["labels"].tolist() == [2] * 4 + [7] * 4 + [4] * 4 and z["samples"].shape == (12, 1, 8, 8)
        stored = json.loads(str(z["info"]))
    assert stored["classes"] == [2, 7, 4] and stored["guidance"] == 2.0 and stored["guidance_rescale"] == 0.5
    assert info["per_class"] == 4 and info["class_names"][7] == "7"
    im = Image.open(tmp_path / "s" / "samples.png")  # 3 rows of 10 tiles (8 px + 1 px padding, x4)
    assert im.size == ((10 * 9 + 1) * 4, (3 * 9 + 1) * 4)
    # without --class a conditional run samples the null label; no labels are stored
    info = sample_run(tmp_path / "u", run=runs / "cond", num_samples=5, steps=3, progress=False, device="cpu")
    assert info["conditioning"].startswith("null")
    with np.load(tmp_path / "u" / "samples.npz", allow_pickle=False) as z:
        assert "labels" not in z.files


@pytest.mark.parametrize(
    "run,kw,msg",
    [
        ("uncond", dict(classes="4"), r"--class needs a class-conditional run .* unconditional \(num_classes = 0\)"),
        ("uncond", dict(guidance=3.0), r"--guidance needs a class-conditional run"),
        ("uncond", dict(guidance_rescale=0.5), r"--guidance-rescale needs a class-conditional run"),
        ("cond", dict(classes="10"), r"class 10 is outside \[0, 10\)"),
        ("cond", dict(classes="3", guidance=-0.5), "guidance must be finite and >= 0"),
        ("cond", dict(guidance=2.0), "--guidance needs --class"),
        ("cond", dict(classes="0-2"), "not a multiple of the 3 classes"),
    ],
)
def test_bad_requests_are_refused_before_anything_is_written(runs, tmp_path, run, kw, msg):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=msg):
        sample_run(out, run=runs / run, num_samples=10, steps=2, progress=False, device="cpu", **kw)
    assert not out.exists()


def test_cli_flags(runs, tmp_path, capsys):
    from diffmath.cli import main

    out = tmp_path / "c"
    assert (
        main(
            [
                "sample",
                "--run",
                str(runs / "cond"),
                "--out",
                str(out),
                "--class",
                "all",
                "--num-samples",
                "10",
                "--steps",
                "2",
                "--guidance",
                "1.5",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "classes 0,1,2,3,4,5,6,7,8,9, 1 each, guidance 1.5" in capsys.readouterr().out
    for argv, msg in (
        (["--class", "3", "--guidance", "-1"], "argument --guidance: expected a finite number >= 0"),
        (["--class", "3", "--guidance", "nan"], "argument --guidance: expected a finite number >= 0"),
        (["--class", "3", "--guidance-rescale", "2"], "expected a number in [0, 1]; got 2.0"),
    ):
        with pytest.raises(SystemExit):
            main(["sample", "--run", str(runs / "cond"), "--out", str(tmp_path / "x"), *argv])
        assert msg in capsys.readouterr().err
    assert main(["sample", "--run", str(runs / "uncond"), "--out", str(tmp_path / "y"), "--class", "3"]) == 2
    assert "--class needs a class-conditional run" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
