import json
import re
import types

import numpy as np
import pytest
import torch

from diffmath.cli import build_parser, main, run_demo, train_config_from_args

torch.set_num_threads(1)

TINY_FLAGS = [
    "--steps",
    "4",
    "--batch-size",
    "16",
    "--channels",
    "8",
    "--channel-mult",
    "1,2",
    "--num-res-blocks",
    "1",
    "--timesteps",
    "50",
    "--save-every",
    "2",
    "--no-progress",
]


@pytest.fixture
def cache(tmp_path_factory, monkeypatch):
    # one classifier cache for the session's test files (keyed by version inside the folder)
    d = tmp_path_factory.getbasetemp().parent / "diffmath-cache"
    monkeypatch.setenv("DIFFMATH_CACHE", str(d))
    return d


def _err(capsys):
    return capsys.readouterr().err


# ----------------------------------------------------------------------------- help and flags
DESIGN_FLAGS = {
    "train": [
        "--data",
        "--out",
        "--steps",
        "--batch-size",
        "--lr",
        "--channels",
        "--image-size",
        "--prediction",
        "--schedule",
        "--save-every",
        "--seed",
        "--device",
        "--config",
        "--resume",
        "--overwrite",
    ],
    "sample": [
        "--run",
        "--checkpoint",
        "--out",
        "--sampler",
        "--steps",
        "--eta",
        "--num-samples",
        "--seed",
        "--device",
    ],
    "evaluate": ["--run", "--samples", "--out"],
    "demo": ["--out"],
    "bench": ["--quick"],
}


@pytest.mark.parametrize("cmd", sorted(DESIGN_FLAGS))
def test_help_explains_every_design_flag(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in DESIGN_FLAGS[cmd]:
        m = re.search(rf"^\s+{re.escape(flag)}\b.*$", out, re.M)
        assert m, f"{cmd} --help does not list {flag}"
    # every option has a help text
    p = build_parser()
    sub = p._subparsers._group_actions[0].choices[cmd]
    for a in sub._actions:
        assert a.help, f"{cmd} {a.option_strings} has no help"


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for c in ("train", "sample", "evaluate", "demo", "compare-latent", "verify", "bench"):
        assert c in out


LATENT_FLAGS = {
    "train": ["--latent", "--vae", "--vae-steps", "--vae-channels", "--latent-channels", "--beta", "--encode-mode"],
    "sample": ["--latent"],
    "demo": ["--latent", "--out"],
    "compare-latent": ["--out", "--budget", "--num-samples", "--device", "--overwrite"],
}


@pytest.mark.parametrize("cmd", sorted(LATENT_FLAGS))
def test_help_explains_the_latent_flags(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    p = build_parser()
    sub = p._subparsers._group_actions[0].choices[cmd]
    helps = {o: a.help for a in sub._actions for o in a.option_strings}
    for flag in LATENT_FLAGS[cmd]:
        assert re.search(rf"^\s+{re.escape(flag)}\b.*$", out, re.M), f"{cmd} --help does not list {flag}"
        assert helps[flag] and len(helps[flag]) > 10, f"{cmd} {flag} has no real help"
    for a in sub._actions:
        assert a.help, f"{cmd} {a.option_strings} has no help"


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["train", "--out", "X", "--steps", "0"], "expected a positive integer"),
        (["train", "--out", "X", "--prediction", "score"], "invalid choice"),
        (["train", "--out", "X", "--schedule", "quadratic"], "invalid choice"),
        (["train", "--out", "X", "--lr", "-1"], "expected a positive"),
        (["train", "--out", "X", "--device", "tpu"], "expected cpu, cuda"),
        (["train", "--out", "X", "--channel-mult", "1,a"], "comma-separated integers"),
        (["sample", "--out", "X"], "one of the arguments --run/--run-dir --checkpoint is required"),
        (["sample", "--run", "A", "--checkpoint", "B"], "not allowed with argument"),
        (["sample", "--run", "A", "--sampler", "rk4"], "invalid choice"),
        (["sample", "--run", "A", "--dtype", "fp8"], "invalid choice"),
        (["evaluate"], "the following arguments are required: --run"),
    ],
)
def test_argument_errors(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert msg in _err(capsys)


def test_train_input_errors(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r")]) == 2
    assert "train needs --data" in _err(capsys)
    assert main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")] + TINY_FLAGS) == 2
    assert "no such file or folder" in _err(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r")] + TINY_FLAGS) == 2
    assert "holds no image files" in _err(capsys)
    assert main(["train", "--data", "digits", "--image-size", "32", "--out", str(tmp_path / "r")] + TINY_FLAGS) == 2
    assert "must be 8 or 16; got 32" in _err(capsys)
    assert main(["train", "--data", "digits", "--out", str(tmp_path / "r2"), "--resume"] + TINY_FLAGS) == 2
    assert "holds no run to resume" in _err(capsys)
    bad = tmp_path / "bad.toml"
    bad.write_text("stepz = 3\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "r3")]) == 2
    assert "unknown keys ['stepz']" in _err(capsys)
    bad.write_text("steps = [\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "r3")]) == 2
    assert "not valid TOML" in _err(capsys)
    # TOML values of the wrong type are named (a string "no" used to switch learn_sigma on)
    for line, msg in (
        ('channel_mult = "1,2"', "channel_mult must be a list of integers"),
        ("channel_mult = [1.7, 2]", "channel_mult must be a list of integers"),
        ('learn_sigma = "no"', "learn_sigma must be true or false"),
    ):
        bad.write_text(f'data = "gmm"\n{line}\n')
        assert main(["train", "--config", str(bad), "--out", str(tmp_path / "r3")]) == 2
        assert msg in _err(capsys)
    # linear at T = 20 ends at abar = 0: an eps model could be trained but never sampled
    assert main(["train", "--data", "gmm", "--out", str(tmp_path / "r4")] + TINY_FLAGS + ["--timesteps", "20"]) == 2
    assert "ends at alphas_cumprod = 0" in _err(capsys)


def test_a_nan_loss_is_an_error_not_a_traceback(tmp_path, capsys, monkeypatch):
    from diffmath.pipeline import loop as tr

    monkeypatch.setattr(tr, "training_loss", lambda *a, **k: (torch.tensor(float("nan"), requires_grad=True), {}))
    assert main(["train", "--data", "gmm", "--out", str(tmp_path / "r")] + TINY_FLAGS) == 2
    assert "diffmath train: error: the loss became nan at step 1" in _err(capsys)


def test_toml_config_and_flag_precedence(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[train]\ndata = "gmm"\nsteps = 3\nchannels = 4\ntimesteps = 40\nsave-every = 3\nprogress = false\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--steps", "2", "--save-every", "2"]) == 0
    c = json.loads((out / "config.json").read_text())["config"]
    assert c["data"] == "gmm" and c["channels"] == 4 and c["timesteps"] == 40 and c["steps"] == 2
    # an existing --out is refused; --resume continues it (only --steps changes)
    assert main(["train", "--config", str(cfg), "--out", str(out)]) == 2
    assert "already exists" in _err(capsys)
    assert main(["train", "--out", str(out), "--resume", "--steps", "3", "--channels", "5"]) == 2
    assert "channels: checkpoint 4 vs now 5" in _err(capsys)
    assert main(["train", "--out", str(out), "--resume", "--steps", "3"]) == 0
    assert "trained to step 3" in capsys.readouterr().out


# ----------------------------------------------------------------------------- end to end
def test_toy_train_sample_evaluate(tmp_path, capsys):
    run = tmp_path / "gmm"
    assert (
        main(
            [
                "train",
                "--data",
                "gmm",
                "--out",
                str(run),
                "--steps",
                "200",
                "--batch-size",
                "128",
                "--channels",
                "16",
                "--timesteps",
                "50",
                "--lr",
                "2e-3",
                "--ema-decay",
                "0.99",
                "--save-every",
                "200",
                "--no-progress",
            ]
        )
        == 0
    )
    for sampler, steps in (("em", "200"), ("ddim", "20")):
        assert (
            main(
                [
                    "sample",
                    "--run",
                    str(run),
                    "--sampler",
                    sampler,
                    "--steps",
                    steps,
                    "--num-samples",
                    "300",
                    "--no-progress",
                ]
            )
            == 0
        )
        with np.load(run / "samples.npz", allow_pickle=False) as z:
            assert z["samples"].shape == (300, 2) and json.loads(str(z["info"]))["sampler"] == sampler
    assert main(["evaluate", "--run", str(run), "--no-progress"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    sw = m["sliced_wasserstein"]
    assert sw["train_vs_held_out (floor)"] < sw["gaussian_noise (ceiling)"]
    assert 0 < sw["samples"] < sw["gaussian_noise (ceiling)"]
    assert "sliced Wasserstein" in capsys.readouterr().out


def test_digits_train_sample_evaluate_and_errors(tmp_path, cache, capsys):
    run = tmp_path / "digits"
    assert main(["train", "--data", "digits", "--out", str(run)] + TINY_FLAGS) == 0
    out = tmp_path / "samples"
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(run / "step-000004.safetensors"),
                "--out",
                str(out),
                "--steps",
                "5",
                "--num-samples",
                "40",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (out / "samples.png").exists()
    assert (
        main(
            [
                "evaluate",
                "--run",
                str(run),
                "--samples",
                str(out / "samples.npz"),
                "--out",
                str(out),
                "--vlb-images",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["class_histogram"]) == 10 and sum(m["class_histogram"]) == 40
    fd = m["frechet_distance"]
    assert fd["n"] == 40 and fd["held_out_real (floor)"] < fd["gaussian_noise (ceiling)"]
    v = m["test_vlb"]
    assert v["bins"] == 17 and v["images"] == 3 and set(v) >= {"small", "large", "test_vlb_bpd"}
    assert 0 < v["test_vlb_bpd"] < 50
    # errors
    assert main(["evaluate", "--run", str(run), "--no-progress"]) == 2
    assert "no samples at" in _err(capsys)
    np.savez(tmp_path / "wrong.npz", samples=np.zeros((5, 2), np.float32))
    assert main(["evaluate", "--run", str(run), "--samples", str(tmp_path / "wrong.npz")]) == 2
    assert "per item but the run's data have (1, 8, 8)" in _err(capsys)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp_path / "alien.safetensors"))
    assert main(["sample", "--checkpoint", str(tmp_path / "alien.safetensors"), "--out", str(out)]) == 2
    assert "not a diffmath checkpoint" in _err(capsys)
    assert main(["sample", "--run", str(tmp_path / "none")]) == 2
    assert "is not a directory" in _err(capsys)
    assert main(["sample", "--run", str(out)]) == 2
    assert "holds no checkpoint" in _err(capsys)


def test_demo_writes_the_report_and_reuses_its_training(tmp_path, cache):
    tiny = dict(steps=4, batch_size=16, channels=8, timesteps=50, save_every=4)
    sweep = dict(guidance_scales=(0.0, 1.0), per_class=2, per_class_other=1)
    out = tmp_path / "demo"
    m = run_demo(out, progress=False, config_overrides=tiny, num_samples=30, vlb_images=2, **sweep)
    for f in (
        "samples.png",
        "loss.png",
        "schedule.png",
        "metrics.json",
        "report.md",
        "config.json",
        "classes.png",
        "classes.npz",
        "guidance.png",
    ):
        assert (out / f).exists(), f
    report = (out / "report.md").read_text()
    for link in ("(samples.png)", "(loss.png)", "(schedule.png)", "(metrics.json)", "(classes.png)", "(guidance.png)"):
        assert link in report
    assert "mean classifier confidence" in report and "floor (real held-out)" in report
    assert "| guidance s |" in report and "Per digit at s = 1.5" in report and "Per digit at s = 1 " in report
    assert set(m["timings"]) == {
        "train_s",
        "sample_s",
        "evaluate_s",
        "guidance_s",
        "total_s",
        "cpu_s",
        "device",
        "threads",
        "load_avg_1min",
    }
    assert [r["guidance"] for r in m["guidance"]["scales"]] == [0.0, 1.0, 1.5]
    assert [r["per_class"] for r in m["guidance"]["scales"]] == [1, 2, 2]
    before = (out / "step-000004.safetensors").read_bytes()
    run_demo(out, progress=False, config_overrides=tiny, num_samples=30, vlb_images=0, **sweep)
    assert (out / "step-000004.safetensors").read_bytes() == before  # training reused
    assert "0 steps trained in this call" in (out / "report.md").read_text()
    from diffmath.pipeline.rundir import RunError

    with pytest.raises(RunError, match="holds something other than this demo run"):
        run_demo(out, progress=False, config_overrides={**tiny, "channels": 4}, num_samples=30, vlb_images=0)


# ----------------------------------------------------------------------------- verify and bench
def test_verify_forwards_its_arguments(monkeypatch):
    import diffmath.verify as verify

    seen = []
    monkeypatch.setattr(verify, "main", lambda argv=None: seen.append(argv) or 0)
    assert main(["verify", "--json", "t.json", "--plot", "p.png"]) == 0
    assert seen == [["--json", "t.json", "--plot", "p.png"]]


def test_bench_runs_the_checkouts_side_by_side_script(monkeypatch, capsys, tmp_path):
    import diffmath.cli as cli

    # this checkout's benchmarks/side_by_side.py is found and loads (main is the table)
    bench = cli._load_bench()
    assert callable(bench.main) and "q_sample" in bench.OPS
    # `diffmath bench --quick` calls its main(quick=True)
    seen = []
    fake = types.SimpleNamespace(main=lambda quick=False: seen.append(quick) or 0)
    monkeypatch.setattr(cli, "_load_bench", lambda: fake)
    assert main(["bench", "--quick"]) == 0 and seen == [True]
    monkeypatch.undo()
    # an install without the checkout: a clear error, exit status 2
    monkeypatch.setattr(cli, "_bench_script", lambda: tmp_path / "benchmarks" / "side_by_side.py")
    assert main(["bench"]) == 2
    err = _err(capsys)
    assert "benchmarks/side_by_side.py" in err and "pip install -e ." in err


@pytest.mark.slow
def test_bench_quick_runs_end_to_end():
    # the real table, in a child process (it pins torch threads and tunes malloc for itself);
    # a few seconds on a CPU. Only that it runs and lists every op is checked, no timing.
    import os
    import subprocess
    import sys

    env = {**os.environ, "DIFFMATH_KERNELS": "auto"}
    cmd = [sys.executable, "-m", "diffmath", "bench", "--quick"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    for op in ("q_sample", "ddpm_step", "ddim_step", "euler_maruyama_step", "langevin_step", "simple_loss"):
        assert re.search(rf"^{op}\s", r.stdout, re.M), (op, r.stdout[-2000:])


# ----------------------------------------------------------------------------- latent diffusion
LATENT_TINY = [
    "--latent",
    "--vae-steps",
    "5",
    "--vae-channels",
    "8",
    "--steps",
    "4",
    "--batch-size",
    "16",
    "--channels",
    "8",
    "--num-res-blocks",
    "1",
    "--timesteps",
    "50",
    "--save-every",
    "2",
    "--no-progress",
]


def test_latent_channel_mult_defaults_to_1_unless_given(tmp_path):
    def cfg(*argv):
        return train_config_from_args(build_parser().parse_args(["train", "--out", str(tmp_path / "r"), *argv]))

    assert cfg("--data", "digits").channel_mult == (1, 2)  # pixel space: the usual default
    assert cfg("--data", "digits", "--latent").channel_mult == (1,)
    assert cfg("--data", "digits", "--latent", "--channel-mult", "1,2").channel_mult == (1, 2)
    toml = tmp_path / "c.toml"
    toml.write_text('data = "digits"\nchannel-mult = [1, 2]\n')
    assert cfg("--config", str(toml), "--latent").channel_mult == (1, 2)  # the file sets it: kept


def test_latent_train_sample_evaluate(tmp_path, cache, capsys):
    from diffmath.latent import read_latent_run

    run = tmp_path / "ld"
    assert main(["train", "--data", "digits", "--out", str(run), *LATENT_TINY]) == 0
    assert "latent run" in capsys.readouterr().out
    info = read_latent_run(run)
    assert info["latent_shape"] == [2, 4, 4] and info["encode_mode"] == "mean"
    unet = json.loads((run / "unet" / "config.json").read_text())
    assert unet["config"]["channel_mult"] == [1] and unet["data"]["shape"] == [2, 4, 4]
    vae = json.loads((run / "vae" / "vae.json").read_text())
    assert vae["train"]["steps"] == 5 and vae["train"]["channels"] == 8 and vae["train"]["latent_channels"] == 2
    # sample --latent: decoded digits, the scaled latents beside them
    assert main(["sample", "--latent", "--run", str(run), "--steps", "3", "--num-samples", "20", "--no-progress"]) == 0
    with np.load(run / "samples.npz", allow_pickle=False) as z:
        assert z["samples"].shape == (20, 1, 8, 8) and z["latents"].shape == (20, 2, 4, 4)
        assert json.loads(str(z["info"]))["latent"] is True
        first = z["samples"].copy()
    # a latent run is recognised without --latent too (the same seed gives the same samples)
    assert main(["sample", "--run", str(run), "--steps", "3", "--num-samples", "20", "--no-progress"]) == 0
    with np.load(run / "samples.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(z["samples"], first)
    # the sigma-space solvers on a latent run, as on a pixel run: the ladder is honoured and recorded
    lat = {}
    for ladder in ("schedule", "exponential"):
        so = tmp_path / f"solver-{ladder}"
        assert (
            main(
                [
                    "sample",
                    "--latent",
                    "--run",
                    str(run),
                    "--out",
                    str(so),
                    "--sampler",
                    "dpmpp-2m",
                    "--sigmas",
                    ladder,
                    "--steps",
                    "3",
                    "--num-samples",
                    "8",
                    "--no-progress",
                ]
            )
            == 0
        )
        with np.load(so / "samples.npz", allow_pickle=False) as z:
            info = json.loads(str(z["info"]))
            assert info["sampler"] == "dpmpp-2m" and info["sigmas"] == ladder and info["nfe"] == 3
            assert z["samples"].shape == (8, 1, 8, 8) and np.all(np.isfinite(z["latents"]))
            lat[ladder] = z["latents"].copy()
    assert not np.allclose(lat["schedule"], lat["exponential"])
    # evaluate on the latent run: the pixel metrics of the decoded samples, the VAE's ELBO, no VLB
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--no-progress"]) == 0
    assert "VAE held-out ELBO" in capsys.readouterr().out
    m = json.loads((run / "metrics.json").read_text())
    assert m["num_samples"] == 20 and len(m["class_histogram"]) == 10 and m["latent"]["shape"] == [2, 4, 4]
    assert m["vae"]["held_out_elbo_bpd"] > 0 and isinstance(m["test_vlb"], str)
    # plain sampling of the latent U-Net: no x0 clipping (latents are not in [-1, 1]), a picture of the latents
    out = tmp_path / "raw"
    assert (
        main(
            [
                "sample",
                "--run",
                str(run / "unet"),
                "--out",
                str(out),
                "--steps",
                "3",
                "--num-samples",
                "12",
                "--no-progress",
            ]
        )
        == 0
    )
    with np.load(out / "samples.npz", allow_pickle=False) as z:
        assert z["samples"].shape == (12, 2, 4, 4) and json.loads(str(z["info"]))["clip_x0"] is None
        assert np.abs(z["samples"]).max() > 1  # an untrained eps-model's x0 lands far outside [-1, 1]
    assert (out / "samples.png").exists()
    # --resume (recognised as latent by latent.json): the VAE flags may only repeat the run's
    assert main(["train", "--out", str(run), "--resume", "--steps", "6", "--vae-steps", "7"]) == 2
    assert "trained with --vae-steps 5, not 7" in _err(capsys)
    vae_bytes = (run / "vae" / "vae.safetensors").read_bytes()
    assert main(["train", "--out", str(run), "--resume", "--steps", "6", "--vae-steps", "5", "--no-progress"]) == 0
    assert "trained to step 6" in capsys.readouterr().out
    assert (run / "unet" / "step-000006.json").exists() and (run / "vae" / "vae.safetensors").read_bytes() == vae_bytes
    # --vae reuses that VAE in a new run: no VAE is trained, the hash is the run's
    run2 = tmp_path / "ld2"
    assert (
        main(
            [
                "train",
                "--data",
                "digits",
                "--out",
                str(run2),
                "--vae",
                str(run / "vae"),
                *LATENT_TINY[5:],
                "--latent",
                "--encode-mode",
                "sample",
            ]
        )
        == 0
    )
    info2 = read_latent_run(run2)
    assert info2["vae_hash"] == info["vae_hash"] and info2["encode_mode"] == "sample" and not (run2 / "vae").exists()
    # bad combinations
    assert main(["train", "--data", "digits", "--out", str(tmp_path / "p"), "--vae-steps", "5"] + TINY_FLAGS) == 2
    assert "--vae-steps is for latent diffusion: add --latent" in _err(capsys)
    assert (
        main(["train", "--data", "digits", "--out", str(tmp_path / "q"), "--vae", str(run / "vae"), *LATENT_TINY]) == 2
    )
    assert "give one or the other" in _err(capsys)
    assert main(["train", "--data", "digits", "--out", str(tmp_path / "q"), "--latent", "--learn-sigma"]) == 2
    assert "learn_sigma is not supported in latent space" in _err(capsys)
    assert (
        main(
            ["sample", "--latent", "--checkpoint", str(run / "unet" / "step-000004.json"), "--out", str(tmp_path / "s")]
        )
        == 2
    )
    assert "needs --run DIR" in _err(capsys)
    assert main(["sample", "--latent", "--run", str(run / "unet")]) == 2
    assert "is not a latent diffusion run" in _err(capsys)


def test_latent_train_refuses_torchrun(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--data", "digits", "--out", str(tmp_path / "r"), *LATENT_TINY]) == 2
    assert "run it without torchrun" in _err(capsys) and not (tmp_path / "r").exists()


def test_latent_sample_refuses_torchrun(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    (tmp_path / "run").mkdir()
    assert main(["sample", "--latent", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "s")]) == 2
    assert "run it without torchrun" in _err(capsys) and not (tmp_path / "s").exists()


def test_demo_latent_and_compare_latent_call_diffmath_latent(monkeypatch, capsys):
    import diffmath.cli as cli
    import diffmath.latent as latent

    calls = []
    metrics = {
        "num_samples": 3,
        "data": "digits",
        "timings": {"total_s": 1.0},
        "vae": {"held_out_elbo_bpd": 2.0},
        "latent": {"shape": [2, 4, 4], "scale_factor": 1.5},
    }
    monkeypatch.setattr(latent, "demo_latent", lambda out, **kw: calls.append(("latent", out, kw)) or metrics)
    monkeypatch.setattr(cli, "run_demo", lambda out, **kw: calls.append(("pixel", out, kw)) or metrics)
    assert main(["demo", "--latent", "--device", "cpu", "--no-progress"]) == 0
    assert main(["demo", "--latent", "--out", "elsewhere", "--overwrite", "--no-progress"]) == 0
    assert main(["demo", "--no-progress"]) == 0
    assert [(c[0], str(c[1])) for c in calls] == [
        ("latent", "runs/demo-latent"),
        ("latent", "elsewhere"),
        ("pixel", "runs/demo"),
    ]
    assert calls[0][2] == {"overwrite": False, "device": "cpu", "progress": False}
    assert calls[1][2]["overwrite"] is True
    assert "scaling factor 1.5000" in capsys.readouterr().out

    seen = []
    monkeypatch.setattr(latent, "compare_pixel_latent", lambda out, **kw: seen.append((out, kw)) or {"r": 1})
    monkeypatch.setattr(latent, "comparison_table", lambda r: "| the table |")
    assert main(["compare-latent", "--out", "cmp", "--budget", "3", "--num-samples", "40", "--no-progress"]) == 0
    assert str(seen[0][0]) == "cmp"
    assert seen[0][1] == {"budget_s": 3.0, "num_samples": 40, "device": "cpu", "progress": False, "overwrite": False}
    assert "| the table |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["compare-latent", "--out", "cmp", "--budget", "0"])
    assert "expected a positive" in _err(capsys)


# ----------------------------------------------------------------------------- issue 11: hostile input
GMM_TINY = [
    "--data",
    "gmm",
    "--steps",
    "2",
    "--batch-size",
    "16",
    "--channels",
    "4",
    "--timesteps",
    "50",
    "--save-every",
    "2",
    "--no-progress",
]


def _rewrite_weights(js, change):
    """Replace the tensors of the checkpoint ``js`` by ``change(tensors)``, with a correct new SHA-256."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from diffmath.pipeline.checkpoint import CHECKPOINT_FORMAT
    from diffmath.pipeline.io import save_safetensors

    st = js.with_suffix(".safetensors")
    with safe_open(str(st), framework="pt") as f:
        small = json.loads(f.metadata()["meta"])
    meta = json.loads(js.read_text())
    meta["weights_sha256"] = save_safetensors(st, change(load_file(str(st))), CHECKPOINT_FORMAT, small)
    js.write_text(json.dumps(meta))


def test_checkpoint_sha256_is_mandatory(tmp_path, capsys):
    # issue 11, 6.5: a .safetensors without its JSON loaded bit-flipped weights and exited 0
    run = tmp_path / "run"
    assert main(["train", "--out", str(run)] + GMM_TINY) == 0
    lone = tmp_path / "lone"
    lone.mkdir()
    st = lone / "step-000002.safetensors"
    st.write_bytes((run / "step-000002.safetensors").read_bytes())
    smp = ["--num-samples", "5", "--steps", "2", "--no-progress"]
    assert main(["sample", "--checkpoint", str(st), "--out", str(tmp_path / "s")] + smp) == 2
    err = _err(capsys)
    assert "has no step-000002.json beside it" in err and "--trust-unverified" in err
    assert not (tmp_path / "s" / "samples.npz").exists()
    assert main(["sample", "--checkpoint", str(st), "--out", str(tmp_path / "s"), "--trust-unverified"] + smp) == 0
    # a sidecar without weights_sha256 vouches for nothing: refused for sample and for resume
    js = run / "step-000002.json"
    meta = json.loads(js.read_text())
    del meta["weights_sha256"]
    js.write_text(json.dumps(meta))
    assert main(["sample", "--run", str(run)] + smp) == 2
    assert "has no 'weights_sha256'" in _err(capsys)
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", "--no-progress"]) == 2
    assert "has no 'weights_sha256'" in _err(capsys)
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", "--no-progress", "--trust-unverified"]) == 0
    # bit-flipped weights are refused, --trust-unverified or not
    b = bytearray((run / "step-000003.safetensors").read_bytes())
    b[-5] ^= 0x10
    (run / "step-000003.safetensors").write_bytes(bytes(b))
    for extra in ([], ["--trust-unverified"]):
        assert main(["sample", "--run", str(run)] + smp + extra) == 2
        assert "SHA-256 differs" in _err(capsys)
    # documented in --help
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "--trust-unverified" in capsys.readouterr().out


@pytest.mark.parametrize(
    "key,value,msg",
    [
        ("rng", None, "lacks the key 'rng'"),
        ("step", "2", "the key 'step' must be an integer >= 0"),
        ("optimizer", {"param_groups": "x"}, "the key 'optimizer' must be"),
        ("rng", {"torch_cpu": ["!!"], "torch_cuda": [""], "world_size": 1}, "the key 'rng' must be"),
        ("config", [1, 2], "the key 'config' must be a JSON object"),
    ],
)
def test_tampered_sidecars_name_the_key(tmp_path, capsys, key, value, msg):
    # issue 11: a missing `rng` silently made resume non-bit-exact; other keys gave KeyError tracebacks
    run = tmp_path / "run"
    assert main(["train", "--out", str(run)] + GMM_TINY) == 0
    js = run / "step-000002.json"
    meta = json.loads(js.read_text())
    if value is None:
        del meta[key]
    else:
        meta[key] = value
    js.write_text(json.dumps(meta))
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", "--no-progress"]) == 2
    err = _err(capsys)
    assert msg in err and "Traceback" not in err, err
    if key in ("step", "config"):  # what sampling reads too
        assert main(["sample", "--run", str(run), "--num-samples", "3", "--steps", "2", "--no-progress"]) == 2
        assert msg in _err(capsys)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "em", "pc", "ode"])
def test_nan_weights_give_an_error_not_nan_samples(tmp_path, capsys, sampler):
    # issue 11, 6.8: `diffmath sample` on NaN weights wrote a NaN samples.npz and exited 0
    run = tmp_path / "run"
    assert main(["train", "--out", str(run)] + GMM_TINY) == 0
    _rewrite_weights(
        run / "step-000002.json",
        lambda t: {
            k: (v.fill_(float("nan")) if k.startswith("ema.") and v.is_floating_point() else v) for k, v in t.items()
        },
    )
    rc = main(
        [
            "sample",
            "--run",
            str(run),
            "--sampler",
            sampler,
            "--steps",
            "20" if sampler == "pc" else "3",
            "--num-samples",
            "4",
            "--no-progress",
        ]
    )
    err = _err(capsys)
    assert rc == 2 and "Traceback" not in err, err
    assert re.search(r"non-finite|not finite|nan|inf", err, re.I), err
    assert not (run / "samples.npz").exists() and not (run / "samples.png").exists()


def test_threads_and_seed_are_bounded(capsys):
    import os

    # issue 11: --threads 100000 segfaulted (exit 139); --seed 2**64 gave "Overflow when unpacking long long"
    for argv, msg in (
        (["train", "--out", "X", "--threads", "100000"], f"an integer in [0, {os.cpu_count()}]"),
        (["sample", "--run", "X", "--threads", "-1"], "an integer in [0,"),
        (["train", "--out", "X", "--seed", str(2**64)], "an integer in [0, 2**63 - 1]"),
        (["sample", "--run", "X", "--seed", str(2**63)], "an integer in [0, 2**63 - 1]"),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert msg in _err(capsys), argv
    from diffmath.pipeline.config import TrainConfig

    with pytest.raises(ValueError, match=r"seed must lie in \[0, 2\*\*63 - 1\]"):
        TrainConfig(seed=2**64)  # a TOML config reaches the same check


def test_out_of_memory_is_a_message_not_a_traceback(tmp_path, capsys, monkeypatch):
    from diffmath.pipeline import loop as tr

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(tr, "training_loss", oom)
    assert main(["train", "--out", str(tmp_path / "r")] + GMM_TINY) == 2
    err = _err(capsys)
    assert "out of memory" in err and "lower --batch-size (now 16)" in err and "Traceback" not in err
    monkeypatch.undo()
    assert main(["train", "--out", str(tmp_path / "ok")] + GMM_TINY) == 0
    import diffmath.pipeline.sample_run as sm  # where _sample_run looks up generate

    monkeypatch.setattr(sm, "generate", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
    assert main(["sample", "--run", str(tmp_path / "ok"), "--batch-size", "7", "--no-progress"]) == 2
    assert (
        "out of memory (MemoryError" in (err := _err(capsys))
        and "lower --batch-size (samples per network call, now 7)" in err
    )


def test_attention_resolutions_the_unet_never_has_are_an_error(tmp_path, capsys):
    # issue 11: --attention-resolutions 3 on 8x8 data was silently ignored
    out = tmp_path / "r"
    argv = ["train", "--data", "digits", "--out", str(out)] + TINY_FLAGS
    assert main(argv + ["--attention-resolutions", "3"]) == 2
    err = _err(capsys)
    assert "has the resolutions [8, 4] only" in err and "[3]" in err
    assert not out.exists()  # refused before the folder was made
    assert main(argv + ["--attention-resolutions", "4,2"]) == 2
    assert "[2] would never get attention" in _err(capsys)
    # the default (4) on a U-Net without a 4x4 level is dropped with a warning, as before
    with pytest.warns(UserWarning, match="would never get attention"):
        assert (
            main(
                [
                    "train",
                    "--data",
                    "digits",
                    "--image-size",
                    "16",
                    "--out",
                    str(tmp_path / "s"),
                    "--steps",
                    "1",
                    "--batch-size",
                    "8",
                    "--channels",
                    "8",
                    "--num-res-blocks",
                    "1",
                    "--timesteps",
                    "50",
                    "--no-progress",
                ]
            )
            == 0
        )


def test_sigma_space_solvers_from_the_cli(tmp_path, capsys):
    # a tiny toy run; every --sampler of diffmath.samplers' solvers samples from it through the
    # model's denoiser, and Euler on the schedule's own sigmas is DDIM (Song et al. 2021, eq. 14)
    run = tmp_path / "gmm"
    assert (
        main(
            [
                "train",
                "--data",
                "gmm",
                "--out",
                str(run),
                "--steps",
                "30",
                "--batch-size",
                "64",
                "--channels",
                "8",
                "--timesteps",
                "50",
                "--save-every",
                "30",
                "--no-progress",
            ]
        )
        == 0
    )
    for sampler in ("euler", "heun", "edm", "euler-a", "dpmpp-2m", "dpmpp-2m-sde", "dpmpp-3m-sde", "unipc", "lms"):
        for ladder in ("karras", "exponential"):
            out = tmp_path / f"{sampler}-{ladder}"
            assert (
                main(
                    [
                        "sample",
                        "--run",
                        str(run),
                        "--out",
                        str(out),
                        "--sampler",
                        sampler,
                        "--steps",
                        "6",
                        "--sigmas",
                        ladder,
                        "--num-samples",
                        "40",
                        "--no-progress",
                    ]
                )
                == 0
            )
            with np.load(out / "samples.npz", allow_pickle=False) as z:
                info = json.loads(str(z["info"]))
                assert z["samples"].shape == (40, 2) and np.all(np.isfinite(z["samples"]))
            assert info["sampler"] == sampler and info["sigmas"] == ladder
            assert info["nfe"] == (11 if sampler in ("heun", "edm") else 6)
    for args in (["--sampler", "euler", "--sigmas", "schedule"], ["--sampler", "ddim"]):
        out = tmp_path / args[1]
        assert (
            main(
                [
                    "sample",
                    "--run",
                    str(run),
                    "--out",
                    str(out),
                    "--steps",
                    "10",
                    "--num-samples",
                    "64",
                    "--no-progress",
                    *args,
                ]
            )
            == 0
        )
    with np.load(tmp_path / "euler" / "samples.npz") as a, np.load(tmp_path / "ddim" / "samples.npz") as b:
        np.testing.assert_allclose(a["samples"], b["samples"], rtol=1e-4, atol=1e-4)  # float32 loops, two routes
    assert (
        main(
            [
                "sample",
                "--run",
                str(run),
                "--out",
                str(tmp_path / "bad"),
                "--sampler",
                "euler",
                "--sigmas",
                "schedule",
                "--steps",
                "51",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "--sigmas schedule" in capsys.readouterr().err


def test_sigma_space_solvers_clip_the_denoiser_on_images_as_ddim_clips_x0(tmp_path):
    # on bounded images the ddim loop clips its predicted x0 to [-1, 1] and takes the next state
    # from the clipped x0 (Song et al. 2021, eq. 12); the solvers clip D = their predicted x0 the
    # same way, so Euler on the schedule's own sigmas is still DDIM, and --no-clip turns both off
    run = tmp_path / "digits"
    assert main(["train", "--data", "digits", "--out", str(run)] + TINY_FLAGS) == 0
    for clip in ([], ["--no-clip"]):
        for args in (["--sampler", "euler", "--sigmas", "schedule"], ["--sampler", "ddim"]):
            out = tmp_path / f"{args[1]}{'-'.join(clip)}"
            assert (
                main(
                    [
                        "sample",
                        "--run",
                        str(run),
                        "--out",
                        str(out),
                        "--steps",
                        "5",
                        "--num-samples",
                        "16",
                        "--no-progress",
                        *args,
                        *clip,
                    ]
                )
                == 0
            )
        name = "-".join(clip)
        with (
            np.load(tmp_path / f"euler{name}" / "samples.npz") as a,
            np.load(tmp_path / f"ddim{name}" / "samples.npz") as b,
        ):
            np.testing.assert_allclose(a["samples"], b["samples"], rtol=1e-4, atol=1e-4)  # float32 loops, two routes
