import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import diffmath.train as tr
from diffmath import losses
from diffmath.pipeline import loop
from diffmath.pipeline.checkpoint import CHECKPOINT_FORMAT, RUN_FORMAT
from diffmath.pipeline.config import DEMO_CONFIG, TrainConfig
from diffmath.pipeline.loop import train
from diffmath.pipeline.objective import training_loss
from diffmath.pipeline.rundir import RunError
from diffmath.schedules import named_schedule

torch.set_num_threads(1)

TINY = dict(
    data="digits",
    steps=6,
    batch_size=16,
    channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    save_every=3,
    timesteps=50,
    warmup=2,
    lr=1e-3,
    progress=False,
)


def _tensors(path):
    return load_file(str(path))


def _assert_same_tensors(a, b, prefixes=("model.", "ema.", "optim.")):
    keys = [k for k in a if k.startswith(prefixes)]
    assert keys and sorted(keys) == sorted(k for k in b if k.startswith(prefixes))
    for k in keys:
        assert torch.equal(a[k], b[k]), k


def test_train_writes_the_run_files(tmp_path):
    out = tmp_path / "run"
    res = train(TrainConfig(**TINY), out)
    assert res.step == 6 and not res.interrupted and len(res.losses) == 6
    assert all(math.isfinite(v) for v in res.losses)
    names = sorted(p.name for p in out.iterdir())
    written = sorted(
        ["config.json", "loss.png", "schedule.png"]
        + [f"step-00000{k}.{e}" for k in (3, 6) for e in ("json", "safetensors")]
    )
    assert names == sorted(written + [".diffmath-run", ".diffmath.lock"])
    marker = json.loads((out / ".diffmath-run").read_text())  # lists exactly what the run wrote
    assert marker["format"] == "diffmath.folder/1" and marker["command"] == "train" and len(marker["run_id"]) == 32
    assert marker["files"] == written and marker["runs"] == []
    meta = json.loads((out / "step-000006.json").read_text())  # plain JSON, nothing pickled
    assert meta["format"] == CHECKPOINT_FORMAT and meta["step"] == 6
    assert meta["weights_sha256"] == hashlib.sha256((out / "step-000006.safetensors").read_bytes()).hexdigest()
    assert meta["config"] == TrainConfig(**TINY).to_dict()
    assert meta["optimizer"]["param_groups"][0]["lr"] > 0 and len(meta["rng"]["torch_cpu"]) == 1
    with safe_open(str(out / "step-000006.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == CHECKPOINT_FORMAT
        keys = list(f.keys())
    assert any(k.startswith("model.") for k in keys) and any(k.startswith("ema.") for k in keys)
    assert any(k.startswith("optim.") and k.endswith("exp_avg_sq") for k in keys) and "loss_history" in keys
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == RUN_FORMAT and cfg["data"]["shape"] == [1, 8, 8] and cfg["data"]["bins"] == 17
    assert not list(out.glob(".*.tmp"))  # no temp files left behind


def _interrupt_at_forward(monkeypatch, k):
    """Send SIGTERM to ourselves from inside the k-th network forward (the handler only sets a flag)."""
    real = loop.build_model

    def build(config, shape):
        m = real(config, shape)
        calls = [0]

        def hook(mod, inp, out):
            calls[0] += 1
            if calls[0] == k:
                signal.raise_signal(signal.SIGTERM)

        m.register_forward_hook(hook)
        return m

    monkeypatch.setattr(loop, "build_model", build)  # where the loop looks it up


@pytest.mark.parametrize(
    "extra",
    [dict(dropout=0.2), dict(prediction="v", learn_sigma=True, dropout=0.2)],
    ids=["eps-fused", "v-learned-sigma"],
)
def test_resume_gives_the_same_weights_as_never_stopping(tmp_path, monkeypatch, extra):
    cfg = TrainConfig(**{**TINY, **extra})
    a = train(cfg, tmp_path / "a")
    # b: SIGTERM during step 2 -> checkpoint at step 2, then --resume to the end
    with monkeypatch.context() as mp:
        _interrupt_at_forward(mp, 2)
        b1 = train(cfg, tmp_path / "b")
    assert b1.interrupted and b1.step == 2 and (tmp_path / "b" / "step-000002.json").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is restored
    b2 = train(cfg, tmp_path / "b", resume=True)
    assert b2.step == 6 and b2.trained_steps == 4
    _assert_same_tensors(
        _tensors(tmp_path / "a" / "step-000006.safetensors"), _tensors(tmp_path / "b" / "step-000006.safetensors")
    )
    assert a.losses == b2.losses
    # c: a planned N-step run extended with --resume --steps 2N
    c1 = train(TrainConfig(**{**TINY, **extra, "steps": 3}), tmp_path / "c")
    assert c1.step == 3
    train(cfg, tmp_path / "c", resume=True)
    _assert_same_tensors(
        _tensors(tmp_path / "a" / "step-000006.safetensors"), _tensors(tmp_path / "c" / "step-000006.safetensors")
    )


def test_out_dir_rules_and_config_mismatch(tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(**{**TINY, "steps": 3})
    train(cfg, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RunError, match="already exists.*--resume.*--overwrite"):
        train(cfg, out)
    with pytest.raises(RunError, match=r"different configuration \(lr: checkpoint 0.001 vs now 0.002"):
        train(TrainConfig(**{**TINY, "lr": 2e-3}), out, resume=True)
    with pytest.raises(RunError, match="contradict"):
        train(cfg, out, resume=True, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # earlier checkpoints intact
    # a checkpoint that is not ours
    (out / "step-000009.json").write_text('{"hello": 1}')
    (out / "step-000009.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(RunError, match="not a diffmath checkpoint|not a readable safetensors"):
        train(TrainConfig(**{**TINY, "steps": 12}), out, resume=True)
    for k, v in before.items():
        assert (out / k).read_bytes() == v
    # a directory that is not a run
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="not a diffmath run"):
        train(cfg, other, resume=True)
    # --overwrite removes our files only
    (out / "notes.txt").write_text("mine")
    (out / "step-000009.json").unlink()
    (out / "step-000009.safetensors").unlink()
    train(TrainConfig(**{**TINY, "steps": 2, "save_every": 2}), out, overwrite=True)
    assert (
        (out / "notes.txt").exists() and not (out / "step-000003.json").exists() and (out / "step-000002.json").exists()
    )


def test_damaged_checkpoint_is_detected(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**{**TINY, "steps": 3}), out)
    st = out / "step-000003.safetensors"
    b = bytearray(st.read_bytes())
    b[-1] ^= 0xFF
    st.write_bytes(bytes(b))
    with pytest.raises(RunError, match="SHA-256 differs"):
        train(TrainConfig(**{**TINY, "steps": 6}), out, resume=True)


def test_no_pickle_is_ever_loaded(tmp_path, monkeypatch):
    import pickle

    out = tmp_path / "run"
    train(TrainConfig(**{**TINY, "steps": 3}), out)

    def boom(*a, **k):
        raise AssertionError("unpickling is not allowed")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)
    train(TrainConfig(**{**TINY, "steps": 4}), out, resume=True)
    from diffmath.pipeline.loaded import load_model

    assert load_model(run=out).step == 4


def test_hybrid_loss_stops_the_gradient_of_the_mean():
    # Improved DDPM: L_vlb trains only the variance channels; L_simple only the mean channels.
    cfg = TrainConfig(**{**TINY, "learn_sigma": True, "prediction": "x0"})
    s = named_schedule("linear", 50)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    t = torch.tensor([0, 1, 20, 49])
    noise = torch.randn(x0.shape, generator=g)
    out = (0.1 * torch.randn(4, 2, 8, 8, generator=g)).requires_grad_(True)
    loss, parts = training_loss(cfg, lambda x, tt: out, s, x0, t, noise=noise)
    assert torch.allclose(loss, parts["mse"] + cfg.hybrid_lambda * 50 * parts["vb"])
    (grad,) = torch.autograd.grad(loss, out)
    (grad_mse,) = torch.autograd.grad(((out[:, :1] - x0) ** 2).mean(), out)  # x0-prediction target
    torch.testing.assert_close(grad[:, :1], grad_mse[:, :1], rtol=1e-6, atol=0)  # L_vlb adds nothing to the mean
    assert torch.all(grad_mse[:, 1:] == 0) and torch.any(grad[:, 1:] != 0)  # ... and all of the variance's


def test_decoder_term_on_17_levels_matches_scipy():
    # L_0 = -log P(x0 | x_1) with bins of half-width 1/16 on the 17-level grid, edge bins open
    s = named_schedule("linear", 50)
    x0 = torch.tensor([[-1.0, -0.875, 0.0, 0.5, 1.0]], dtype=torch.float64)
    mean = torch.tensor([[-0.9, -0.8, 0.05, 0.45, 0.7]], dtype=torch.float64)
    log_var = torch.full_like(mean, math.log(0.01))
    got = losses.vb_terms_bpd(s, mean, log_var, x0, x0.clone(), torch.tensor([0]), bins=17)
    d, sd = 1 / 16, 0.1
    lo = np.where(x0.numpy() <= -1, -np.inf, x0.numpy() - d)
    hi = np.where(x0.numpy() >= 1, np.inf, x0.numpy() + d)
    p = scipy.stats.norm.cdf(hi, mean.numpy(), sd) - scipy.stats.norm.cdf(lo, mean.numpy(), sd)
    ref = -np.log(p).mean() / math.log(2)
    assert float(got[0]) == pytest.approx(ref, rel=1e-10)


def test_hybrid_loss_uses_the_data_grid_for_the_decoder_term():
    # training_loss hands `bins` to losses.vb_terms_bpd: at t = 0 the posterior mean is the predicted x0
    # (coef1 = 1, coef2 = 0) and v = 1 gives log Sigma = log beta_0, so L_0 is scipy's discretised normal
    s = named_schedule("linear", 50)
    cfg = TrainConfig(**{**TINY, "learn_sigma": True, "prediction": "x0"})
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, 17, (3, 1, 4, 4), generator=g).float() / 8 - 1  # the 17-level grid
    pred = (x0 + 0.05 * torch.randn(x0.shape, generator=g)).clamp(-1.2, 1.2)
    out = torch.cat([pred, torch.ones_like(pred)], dim=1)
    t = torch.zeros(3, dtype=torch.long)
    noise = torch.randn(x0.shape, generator=g)
    refs = {}
    for bins in (17, 256):
        d, sd = 1 / (bins - 1), math.sqrt(s.betas[0])
        xn, mn = x0.double().numpy(), pred.double().numpy()
        lo = np.where(xn <= -1, -np.inf, xn - d)
        hi = np.where(xn >= 1, np.inf, xn + d)
        p = scipy.stats.norm.cdf(hi, mn, sd) - scipy.stats.norm.cdf(lo, mn, sd)
        refs[bins] = -np.log(p).reshape(3, -1).mean(1).mean() / math.log(2)
        _, parts = training_loss(cfg, lambda x, tt: out, s, x0, t, noise=noise, bins=bins)
        assert float(parts["vb"]) == pytest.approx(refs[bins], rel=1e-5)
    assert refs[17] < refs[256]  # wider bins: a likelier x0


def test_demo_config_lives_in_the_config_module():
    import diffmath.cli as cli
    from diffmath.latent.compare import _pixel_demo_config

    cfg = TrainConfig(**DEMO_CONFIG)
    assert cfg.data == "digits" and cfg.channel_mult == (1, 2) and cfg.steps == 1500
    assert cli.DEMO_CONFIG is DEMO_CONFIG and tr.DEMO_CONFIG is DEMO_CONFIG  # the old names still read it
    assert _pixel_demo_config() == DEMO_CONFIG


def test_public_names_of_train_after_the_split():
    # checkpoint / run-directory I/O moved to diffmath.pipeline.checkpoint; train's public names are the same objects
    from diffmath.pipeline import checkpoint

    for name in (
        "RunError",
        "RUN_FORMAT",
        "CHECKPOINT_FORMAT",
        "latest_checkpoint",
        "load_checkpoint",
        "read_run_config",
    ):
        assert name in tr.__all__ and getattr(tr, name) is getattr(checkpoint, name)
    assert all(hasattr(tr, n) for n in tr.__all__)


def test_toy_data_and_x0_prediction_train(tmp_path):
    res = train(
        TrainConfig(
            data="gmm", steps=4, batch_size=64, channels=8, prediction="x0", timesteps=50, save_every=4, progress=False
        ),
        tmp_path / "gmm",
    )
    assert res.step == 4 and all(math.isfinite(v) for v in res.losses)
    cfg = json.loads((tmp_path / "gmm" / "config.json").read_text())
    assert cfg["model"]["class"] == "MLPDenoiser" and cfg["data"]["shape"] == [2]


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="prediction must be one of eps, x0, v; got 'score'"):
        TrainConfig(prediction="score")
    with pytest.raises(ValueError, match="schedule must be one of"):
        TrainConfig(schedule="quadratic")
    with pytest.raises(ValueError, match="steps must be an integer >= 1; got steps = 0"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr must be"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="linear schedule needs timesteps >= 20"):
        TrainConfig(timesteps=10)
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"stepz": 3})
    for n in ("weight_decay", "hybrid_lambda"):  # NaN passed a `< 0` check before
        with pytest.raises(ValueError, match=f"{n} must be a finite number >= 0; got {n} = nan"):
            TrainConfig(**{n: float("nan")})
    with pytest.raises(RunError, match="exceeds the"):
        train(TrainConfig(**{**TINY, "batch_size": 4096}), tmp_path / "run")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_match_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m diffmath train` (gloo on 127.0.0.1): both ranks hold the
    same weights (checked at every checkpoint), and the loss of each step equals the
    single-process run with the same global batch."""
    args = [
        "train",
        "--data",
        "digits",
        "--steps",
        "3",
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
        "3",
        "--dropout",
        "0",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
    one = subprocess.run(
        [sys.executable, "-m", "diffmath", *args, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            "-m",
            "diffmath",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    m1 = json.loads((tmp_path / "one" / "step-000003.json").read_text())
    m2 = json.loads((tmp_path / "two" / "step-000003.json").read_text())
    assert (
        m1["world_size"] == 1 and m2["world_size"] == 2 and m2["ranks_identical"] and len(m2["rng"]["torch_cpu"]) == 2
    )
    l1 = _tensors(tmp_path / "one" / "step-000003.safetensors")
    l2 = _tensors(tmp_path / "two" / "step-000003.safetensors")
    np.testing.assert_allclose(l2["loss_history"].numpy(), l1["loss_history"].numpy(), rtol=1e-5)
    for k in l1:
        if k.startswith("model."):
            torch.testing.assert_close(l2[k], l1[k], rtol=1e-4, atol=1e-5)
    # sampling under torchrun splits the samples over the ranks; rank 0 gathers and writes
    smp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            "-m",
            "diffmath",
            "sample",
            "--run-dir",
            str(tmp_path / "two"),
            "--out",
            str(tmp_path / "smp"),
            "--num-samples",
            "7",
            "--steps",
            "4",
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert smp.returncode == 0, smp.stderr[-3000:]
    with np.load(tmp_path / "smp" / "samples.npz", allow_pickle=False) as z:
        assert z["samples"].shape == (7, 1, 8, 8) and json.loads(str(z["info"]))["world_size"] == 2


@pytest.mark.parametrize(
    "old, home, names",
    [
        (
            "train",
            "config",
            ["TrainConfig", "DEMO_CONFIG", "DEMO_CLASSES", "MAX_SEED", "check_int_fields", "derive_seed"],
        ),
        ("train", "model", ["build_model", "make_schedule", "resolve_classes", "check_model_config"]),
        ("train", "objective", ["training_loss", "kernels_module", "philox_path"]),
        ("train", "optim", ["lr_schedule", "learning_rate"]),
        ("train", "loop", ["train", "TrainResult"]),
        ("sample", "loaded", ["LoadedModel", "load_model", "NET_DTYPES"]),
        ("sample", "sampler_loops", ["SOLVER_SAMPLERS", "matched_vpsde", "sde_score", "solver_ladder"]),
        (
            "sample",
            "generate",
            ["generate", "check_sampling", "check_conditioning", "parse_classes", "class_labels", "default_clip"],
        ),
        (
            "sample",
            "sample_run",
            ["sample_run", "save_grid", "save_class_grid", "claim_samples_folder", "sampling_info", "SAMPLE_FILES"],
        ),
        ("evaluate", "metrics", ["frechet_distance", "gaussian_stats", "wasserstein_1d", "sliced_wasserstein"]),
        ("evaluate", "classifier", ["DigitClassifier", "digit_classifier", "cache_dir"]),
        ("evaluate", "evaluate", ["evaluate_run", "vlb_bpd", "per_class_metrics", "guidance_sweep"]),
        ("evaluate", "report", ["write_report", "metrics_table", "format_metrics", "guidance_table"]),
        ("checkpoint", "checkpoint", ["load_checkpoint", "save_checkpoint", "read_run_config"]),
        ("data", "data", ["Data", "load_data", "load_digits"]),
        ("rundir", "rundir", ["RunError", "open_run", "claim_output"]),
        ("_io", "io", ["atomic_write_json", "read_sidecar"]),
        ("plots", "plots", ["plot_loss", "save_fig"]),
        ("distributed", "distributed", ["Dist", "resolve_device"]),
    ],
)
def test_old_module_paths_reexport_the_pipeline(old, home, names):
    # diffmath.train, .sample, .evaluate, ... keep working: each old public name is the object of its new home
    import importlib

    o, h = importlib.import_module(f"diffmath.{old}"), importlib.import_module(f"diffmath.pipeline.{home}")
    for n in names:
        assert getattr(o, n) is getattr(h, n), n
    assert all(hasattr(o, n) for n in getattr(o, "__all__", ()))


def test_prediction_conversions_live_in_parameterization():
    from diffmath import parameterization as P

    s = named_schedule("cosine", 50)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 30, 45])
    from diffmath.forward import q_sample

    x_t = q_sample(s, x0, t, eps)
    v = P.v_from_x0_eps(s, t, x0, eps)
    for kind, pred in (("eps", eps), ("x0", x0), ("v", v)):
        torch.testing.assert_close(P.x0_from_prediction(kind, s, x_t, t, pred), x0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(P.eps_from_prediction(kind, s, x_t, t, pred), eps, rtol=1e-9, atol=1e-9)
    assert tr.x0_from_prediction is P.x0_from_prediction and tr.eps_from_prediction is P.eps_from_prediction
