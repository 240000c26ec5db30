"""`diffmath verify`: the table is recomputed and its orderings asserted (those of DDIM's
Table 1 and of the solvers' orders), and the JSON/PNG outputs are checked."""

from __future__ import annotations

import json

import pytest

from diffmath import verify


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    d = tmp_path_factory.mktemp("verify")
    out = verify.run(json_path=str(d / "v.json"), plot_path=str(d / "v.png"))
    return out, d


def test_layout_and_files(result, capsys):
    out, d = result
    tabs = out["tables"]
    assert set(tabs["leading"]) == {"eta=0.0", "eta=0.2", "eta=0.5", "eta=1.0", "ddpm_large"}
    assert set(tabs["sde"]) == {"euler_maruyama", "predictor_corrector", "probability_flow_heun"}
    for table in tabs.values():
        for row in table.values():
            assert list(row) == ["10", "20", "50", "100", "1000"]
            assert all(v > 0 and v < float("inf") for v in row.values())
    on_disk = json.loads((d / "v.json").read_text())
    assert on_disk["tables"] == tabs
    assert (d / "v.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_orderings(result):
    lead, sde = result[0]["tables"]["leading"], result[0]["tables"]["sde"]
    etas = ["eta=0.0", "eta=0.2", "eta=0.5", "eta=1.0"]
    # DDIM Table 1: at few steps, more stochasticity is worse and DDPM's large variance worst ...
    for n in ("10", "20", "50", "100"):
        vals = [lead[e][n] for e in etas]
        assert vals == sorted(vals), (n, vals)
    for n in ("10", "20"):
        assert lead["ddpm_large"][n] > lead["eta=1.0"][n]
    # ... while with all 1000 steps DDPM with the large variance is best.
    assert lead["ddpm_large"]["1000"] < min(lead[e]["1000"] for e in etas)
    # every discrete row improves with steps
    for row in lead.values():
        vals = [row[n] for n in ("10", "20", "50", "100", "1000")]
        assert all(a > b for a, b in zip(vals, vals[1:])), vals
    # the second-order deterministic Heun beats first-order Euler-Maruyama at 10 and 100 steps
    for n in ("10", "100"):
        assert sde["probability_flow_heun"][n] < sde["euler_maruyama"][n]
    for row in sde.values():
        assert row["1000"] < row["10"] / 100


def test_main_parses_arguments(tmp_path, monkeypatch):
    calls = {}
    monkeypatch.setattr(verify, "run", lambda **kw: calls.update(kw) or {})
    assert verify.main(["--json", str(tmp_path / "a.json"), "--plot", str(tmp_path / "b.png")]) == 0
    assert calls == {"json_path": str(tmp_path / "a.json"), "plot_path": str(tmp_path / "b.png"), "progress": False}


def test_ddim_eta0_10_steps_cell_against_monte_carlo_of_sample_ddim(result):
    # An independent check of one cell: run the real sample_ddim loop (eta = 0, 10 leading
    # steps, linear_schedule(1000), x_T ~ N(0, 1)) with the exact eps of the data N(0.5, 0.1^2),
    # written here from the joint Gaussian (x0, z) given x_t = sqrt(abar) x0 + sqrt(1 - abar) z:
    #   E[z | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu0) / (abar s0^2 + 1 - abar).
    # Fit a Gaussian to n samples and compare its KL to the data with the table's value. By the
    # delta method the KL estimate has standard error
    #   se = sqrt((dKL/dm)^2 s^2 / n + (dKL/ds)^2 s^2 / (2n)),
    #   dKL/dm = (m - mu0) / s0^2,  dKL/ds = s / s0^2 - 1 / s;
    # we allow 5 se (a false failure has probability < 1e-6 for a correct table).
    import numpy as np

    from diffmath.samplers import sample_ddim
    from diffmath.schedules import linear_schedule

    mu0, s0 = verify.DATA_MEAN, verify.DATA_STD
    s = linear_schedule(1000)
    abar_all = s.alphas_cumprod

    def eps_model(x, t):
        ab = abar_all[t][:, None]
        return np.sqrt(1 - ab) * (x - np.sqrt(ab) * mu0) / (ab * s0**2 + 1 - ab)

    n = 400_000
    x = sample_ddim(eps_model, s, (n, 1), steps=10, eta=0.0, spacing="leading", generator=np.random.default_rng(1234))
    m, sd = float(x.mean()), float(x.std(ddof=1))
    kl_mc = np.log(s0 / sd) + (sd**2 + (m - mu0) ** 2) / (2 * s0**2) - 0.5
    se = np.sqrt(((m - mu0) / s0**2) ** 2 * sd**2 / n + (sd / s0**2 - 1 / sd) ** 2 * sd**2 / (2 * n))
    kl_table = result[0]["tables"]["leading"]["eta=0.0"]["10"]
    assert abs(kl_mc - kl_table) < 5 * se, (kl_mc, kl_table, se)


# ----------------------------------------------------------------------------- --nfe
@pytest.fixture(scope="module")
def nfe_result(result, tmp_path_factory):
    # the other tables are those of the `result` fixture (not recomputed: the suite stays fast)
    d = tmp_path_factory.mktemp("verify_nfe")
    out0 = result[0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(verify, "compute_tables", lambda *a, **k: {"tables": out0["tables"], "sde_floor": out0["sde_floor"]})
        mp.setattr(verify, "compute_precision", lambda *a, **k: {n: out0[n] for n in out0 if n.startswith("precision")})
        out = verify.run(json_path=str(d / "n.json"), plot_path=str(d / "n.png"), nfe=(5, 10, 20))
    return out, d


def test_nfe_layout_and_files(nfe_result, capsys):
    out, d = nfe_result
    rows = [r for r, _, _ in verify.NFE_ROWS]
    assert list(out["nfe"]) == rows
    assert set(out["nfe_mixture"]) == set(rows) - set(verify.STOCHASTIC_ROWS)
    for key in ("nfe", "nfe_mixture"):
        for row in out[key].values():
            assert list(row) == ["5", "10", "20"]
            assert all(v is None or 0 < v < float("inf") for v in row.values())
    assert set(out["nfe_ladders"].values()) <= {"karras", "exponential"}
    # Heun: 2n - 1 evaluations with n = (NFE + 1) // 2, the nearest count at or below the column
    assert out["nfe_evaluations"]["heun"] == {"5": 5, "10": 9, "20": 19}
    assert out["nfe_evaluations"]["dpmpp_2m"] == {"5": 5, "10": 10, "20": 20}
    errs = [e for r in out["nfe_mixture_err"].values() for e in r.values() if e is not None]
    kls = [k for r in out["nfe_mixture"].values() for k in r.values() if k is not None]
    assert max(e / max(1.0, k / 10) for e, k in zip(errs, kls)) <= 1e-6
    on_disk = json.loads((d / "n.json").read_text())
    assert on_disk["nfe"] == out["nfe"] and on_disk["tables"] == out["tables"]
    assert (d / "n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nfe_cells_are_the_oracle_on_the_named_ladder(nfe_result):
    # each printed cell is the exact KL of the solver on the ladder the table names, and the
    # row's ladder is the better of the two by mean log KL
    import math

    from diffmath.oracle import GaussianData
    from diffmath.samplers import sigmas_exponential, sigmas_karras
    from diffmath.schedules import linear_schedule

    out = nfe_result[0]
    s = linear_schedule(1000)
    lo, hi = float(s.sqrt_recipm1_alphas_cumprod[0]), float(s.sqrt_recipm1_alphas_cumprod[-1])
    data = GaussianData([verify.DATA_MEAN], [[verify.DATA_STD**2]])
    for row, solver, opts in verify.NFE_ROWS:
        if row not in ("dpmpp_2m", "heun", "unipc_order3"):
            continue
        score = {}
        for lad, make in (("karras", sigmas_karras), ("exponential", sigmas_exponential)):
            n_levels = {"5": 3, "10": 5, "20": 10} if row == "heun" else {"5": 5, "10": 10, "20": 20}
            kls = {c: data.exact_solver_output(solver, make(n, lo, hi), **opts).kl(data) for c, n in n_levels.items()}
            score[lad] = sum(math.log(v) for v in kls.values())
            if lad == out["nfe_ladders"][row]:
                assert kls == pytest.approx(out["nfe"][row], rel=1e-12)
        assert out["nfe_ladders"][row] == min(score, key=score.get)


def test_nfe_orderings(nfe_result):
    g, m = nfe_result[0]["nfe"], nfe_result[0]["nfe_mixture"]
    # first-order Euler improves with every column; at 20 evaluations the second-order
    # multistep solvers beat it by orders of magnitude on both data sets
    assert g["euler"]["5"] > g["euler"]["10"] > g["euler"]["20"]
    for row in ("dpmpp_2m", "unipc"):
        assert g[row]["20"] < g["euler"]["20"] / 100
        assert m[row]["20"] < m["euler"]["20"] / 5


def test_main_parses_nfe(monkeypatch):
    calls = {}
    monkeypatch.setattr(verify, "run", lambda **kw: calls.update(kw) or {})
    assert verify.main(["--nfe", "5,10"]) == 0 and calls["nfe"] == (5, 10)
    assert verify.main(["--nfe"]) == 0 and calls["nfe"] == verify.NFES
    with pytest.raises(SystemExit):
        verify.main(["--nfe", "5,x"])
    with pytest.raises(SystemExit):
        verify.main(["--nfe", "1"])


def test_precision_table_layout_and_target(result):
    # Issue 16: with a bfloat16 (or float16) model and x_T, every deterministic loop's KL at 1000
    # steps is within 10% (+1e-4 nats) of the float32 loop's; the float32 loop is the float64
    # loop (the exact KL of the oracle) up to float32 rounding. Each cell's standard error is
    # stated and small against that margin.
    out = result[0]
    p, se, ex = out["precision"], out["precision_se"], out["precision_float64"]
    assert set(p) == {"ddim", "probability_flow_heun"} and set(ex) == set(p)
    for loop in p:
        assert set(p[loop]) == {"float32", "bfloat16", "float16"}
        for dt in p[loop]:
            assert list(p[loop][dt]) == ["50", "1000"]
            assert all(0 < v < 5e-5 for v in se[loop][dt].values())
        for n in ("50", "1000"):
            # float32 model and state: rounding ~1e-7 relative per step, far below the KL
            assert abs(p[loop]["float32"][n] - ex[loop][n]) < 1e-4 * ex[loop][n] + 1e-9, (loop, n)
        f32 = p[loop]["float32"]["1000"]
        for dt in ("bfloat16", "float16"):
            assert abs(p[loop][dt]["1000"] - f32) <= 0.1 * f32 + 1e-4, (loop, dt, p[loop][dt]["1000"], f32)
    assert json.loads((result[1] / "v.json").read_text())["precision"] == p


def test_precision_estimator_against_a_plain_monte_carlo_fit():
    # The table's estimator (moments of the float64 loop's exact output law plus the mean
    # differences on the same draws) against a plain Gaussian fit of the same low-precision
    # samples, which shares nothing with it but the samples: 200,000 draws, DDIM 50 steps with
    # the exact eps written here from the joint Gaussian and rounded to bfloat16. The plain fit's
    # standard error (delta method, as in the test above) is ~4e-4; we allow 5 of them.
    import numpy as np
    import torch

    from diffmath.oracle import GaussianData
    from diffmath.samplers import sample_ddim
    from diffmath.schedules import linear_schedule

    mu0, s0 = verify.DATA_MEAN, verify.DATA_STD
    s = linear_schedule(1000)
    abar_all = torch.tensor(s.alphas_cumprod)

    def eps64(x, t):
        ab = abar_all[t][:, None]
        x = x.double()
        return torch.sqrt(1 - ab) * (x - torch.sqrt(ab) * mu0) / (ab * s0**2 + 1 - ab)

    n = 200_000
    x_T = torch.randn((n, 1), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y64 = sample_ddim(eps64, s, steps=50, x_T=x_T)
    y = sample_ddim(lambda x, t: eps64(x, t).to(torch.bfloat16), s, steps=50, x_T=x_T.to(torch.bfloat16))
    assert y.dtype == torch.float32
    data = GaussianData([mu0], [[s0**2]])
    kl, se_cv = verify._kl_same_draws(y, y64, data.exact_output(s, "ddim", 50), data)
    yy = y.double().numpy()[:, 0]
    m, sd = yy.mean(), yy.std(ddof=1)
    kl_mc = np.log(s0 / sd) + (sd**2 + (m - mu0) ** 2) / (2 * s0**2) - 0.5
    se = np.sqrt(((m - mu0) / s0**2) ** 2 * sd**2 / n + (sd / s0**2 - 1 / sd) ** 2 * sd**2 / (2 * n))
    assert abs(kl - kl_mc) < 5 * se, (kl, kl_mc, se)
    assert se_cv < se / 10, (se_cv, se)
