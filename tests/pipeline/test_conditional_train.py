"""diffmath train --conditional: class labels from the data, label dropout (Ho & Salimans 2022)
with its generator state in every checkpoint, --resume bit for bit, DDP, the latent U-Net, and
unconditional runs unchanged byte for byte."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from PIL import Image
from safetensors.torch import load_file

from diffmath.pipeline import loop
from diffmath.pipeline.checkpoint import rng_state_from_b64
from diffmath.pipeline.config import TrainConfig, keyed_generator
from diffmath.pipeline.data import gaussian_mixture, gmm_means, load_data, load_image_folder
from diffmath.pipeline.loop import train
from diffmath.pipeline.model import resolve_classes
from diffmath.pipeline.rundir import RunError

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
COND = dict(TINY, conditional=True, uncond_prob=0.25)
REPO = Path(__file__).resolve().parents[2]
# The last commit of the pipeline before classes existed: an unconditional run of today's code
# must write the same checkpoint bytes and the same samples as that commit's code.
BEFORE_CLASSES = "117802eb0504da72e16e73a4a0c272db4eb32ab1"


def _same_tensors(a, b, prefixes=("model.", "ema.", "optim.")):
    ta, tb = load_file(str(a)), load_file(str(b))
    keys = [k for k in ta if k.startswith(prefixes)]
    assert keys and sorted(keys) == sorted(k for k in tb if k.startswith(prefixes))
    for k in keys:
        assert torch.equal(ta[k], tb[k]), k


def _record_batches(monkeypatch):
    """Record (x0, y) of every call of training_loss."""
    seen = []
    real = loop.training_loss

    def spy(config, model, s, x0, t, **kw):
        seen.append((x0.detach().clone(), None if kw.get("y") is None else kw["y"].detach().clone()))
        return real(config, model, s, x0, t, **kw)

    monkeypatch.setattr(loop, "training_loss", spy)  # where the loop looks it up
    return seen


# ----------------------------------------------------------------------------- the run files
def test_conditional_run_records_its_classes_and_the_dropout_state(tmp_path):
    res = train(TrainConfig(**COND), tmp_path / "run")
    assert res.step == 6 and all(np.isfinite(res.losses))
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert cfg["conditional"] is True and cfg["uncond_prob"] == 0.25
    assert cfg["num_classes"] == 10 and cfg["class_names"] == [str(d) for d in range(10)]
    meta = json.loads((tmp_path / "run" / "step-000006.json").read_text())
    assert meta["config"]["num_classes"] == 10 and isinstance(meta["rng"]["label_dropout"], str)
    t = load_file(str(tmp_path / "run" / "step-000006.safetensors"))
    assert t["model.class_emb.weight"].shape == (11, 32) and t["ema.class_emb.weight"].shape == (11, 32)
    # the saved state is the generator's after 6 global batches of 16 uniforms each
    g = keyed_generator(0, "label-dropout")
    torch.rand(6 * 16, generator=g, dtype=torch.float64)
    saved = rng_state_from_b64(meta["rng"]["label_dropout"])
    assert torch.equal(saved, g.get_state())


def test_labels_follow_their_images_and_drop_at_the_rate_asked(tmp_path, monkeypatch):
    seen = _record_batches(monkeypatch)
    cfg = TrainConfig(**{**COND, "steps": 12, "uncond_prob": 0.3})
    train(cfg, tmp_path / "run")
    d = load_data("digits")
    flat = {d.train[i].tobytes(): int(d.labels_train[i]) for i in range(len(d.train))}
    kept, dropped = 0, 0
    for x0, y in seen:
        for xi, yi in zip(x0.numpy(), y.numpy()):
            true = flat[xi.tobytes()]
            if yi == 10:
                dropped += 1
            else:
                assert yi == true  # a label that is not dropped is the image's own
                kept += 1
    n = kept + dropped
    assert n == 12 * 16
    # the null label appears with probability 0.3 independently: a two-sided binomial test at 1e-3
    assert scipy.stats.binomtest(dropped, n, 0.3).pvalue > 1e-3


@pytest.mark.parametrize("extra", [dict(dropout=0.2), dict(prediction="v", learn_sigma=True)], ids=["eps", "v-learned"])
def test_conditional_resume_is_bit_exact(tmp_path, monkeypatch, extra):
    cfg = TrainConfig(**{**COND, **extra})
    train(cfg, tmp_path / "a")
    # b: stopped after 2 steps (with a checkpoint), then resumed to the end
    train(cfg, tmp_path / "b", stop_after=2)
    b = train(cfg, tmp_path / "b", resume=True)
    assert b.trained_steps == 4
    _same_tensors(tmp_path / "a" / "step-000006.safetensors", tmp_path / "b" / "step-000006.safetensors")
    # c: a planned 3-step run extended to 6
    train(TrainConfig(**{**COND, **extra, "steps": 3}), tmp_path / "c")
    train(cfg, tmp_path / "c", resume=True)
    _same_tensors(tmp_path / "a" / "step-000006.safetensors", tmp_path / "c" / "step-000006.safetensors")
    la = load_file(str(tmp_path / "a" / "step-000006.safetensors"))["loss_history"]
    assert torch.equal(la, load_file(str(tmp_path / "c" / "step-000006.safetensors"))["loss_history"])


def test_resume_refuses_a_damaged_dropout_state_and_a_changed_conditioning(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**{**COND, "steps": 3}), out)
    with pytest.raises(RunError, match="conditional: checkpoint True vs now False"):
        train(TrainConfig(**{**TINY, "steps": 6}), out, resume=True)
    with pytest.raises(RunError, match="uncond_prob: checkpoint 0.25 vs now 0.5"):
        train(TrainConfig(**{**COND, "steps": 6, "uncond_prob": 0.5}), out, resume=True)
    meta_path = out / "step-000003.json"
    meta = json.loads(meta_path.read_text())
    del meta["rng"]["label_dropout"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(RunError, match="rng.label_dropout"):
        train(TrainConfig(**{**COND, "steps": 6}), out, resume=True)


def test_a_checkpoint_whose_class_count_disagrees_with_its_config_is_refused(tmp_path):
    from diffmath.pipeline.loaded import load_model

    out = tmp_path / "run"
    train(TrainConfig(**{**COND, "steps": 3}), out)
    meta_path = out / "step-000003.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["num_classes"], meta["config"]["class_names"] = 4, list("abcd")
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(RunError, match=r"num_classes = 4 .* weights hold a class embedding of 11 rows \(10 classes\)"):
        load_model(run=out, device="cpu")
    meta["config"] = {
        k: v for k, v in meta["config"].items() if k not in ("conditional", "uncond_prob", "num_classes", "class_names")
    }
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(RunError, match=r"class embedding of 11 rows .* config is unconditional"):
        load_model(run=out, device="cpu")


# ----------------------------------------------------------------------------- the data's classes
def test_gmm_labels_are_the_components_of_the_same_points():
    x0 = gaussian_mixture(500, 3)
    x, k = gaussian_mixture(500, 3, return_labels=True)
    assert np.array_equal(x, x0) and k.dtype == np.int64
    d = load_data("gmm")
    assert d.class_names == tuple(str(i) for i in range(8)) and d.labels_train.shape == (len(d.train),)
    # each point lies within 5 std (0.08) of its component's mean
    dist = np.linalg.norm(d.train - gmm_means()[d.labels_train], axis=1)
    assert dist.max() < 5 * 0.08 * np.sqrt(2)


def test_gmm_trains_a_conditional_mlp(tmp_path):
    cfg = TrainConfig(**{**COND, "data": "gmm", "channels": 4})
    train(cfg, tmp_path / "run")
    t = load_file(str(tmp_path / "run" / "step-000006.safetensors"))
    assert t["model.class_emb.weight"].shape == (9, 16)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["num_classes"] == 8


def _folder(root: Path, layout: dict):
    """Write a tiny grey PNG at each relative path of ``layout`` (value: its grey level)."""
    for rel, v in layout.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), v, np.uint8)).save(p)
    return root


def test_image_folder_classes_follow_imagefolder(tmp_path):
    # class index = the sorted sub-folder names; nested files belong to their top-level folder
    root = _folder(
        tmp_path / "imgs",
        {f"b/{i}.png": 200 for i in range(6)}
        | {f"a/x/{i}.png": 20 for i in range(6)}
        | {"c/0.png": 120, "c/1.png": 120},
    )
    d = load_image_folder(root, image_size=8)
    assert d.class_names == ("a", "b", "c")
    grey = np.concatenate([d.train, d.held_out])[:, 0, 0, 0]
    labels = np.concatenate([d.labels_train, d.labels_held_out])
    expect = {0: 20 / 127.5 - 1, 1: 200 / 127.5 - 1, 2: 120 / 127.5 - 1}
    assert np.allclose(grey, [expect[int(c)] for c in labels], atol=1e-6)
    assert np.bincount(labels).tolist() == [6, 6, 2]
    res = train(
        TrainConfig(**{**COND, "data": str(root), "image_size": 8, "batch_size": 4, "steps": 2}), tmp_path / "r"
    )
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())["config"]
    assert res.step == 2 and cfg["num_classes"] == 3 and cfg["class_names"] == ["a", "b", "c"]


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"only/0.png": 10, "only/1.png": 20, "only/2.png": 30}, "needs at least 2 classes"),
        ({"a/0.png": 10, "b/0.png": 20, "loose.png": 30}, "outside the class sub-folders"),
        ({"0.png": 10, "1.png": 20}, "has no sub-folders"),
    ],
    ids=["one-class", "loose-image", "flat"],
)
def test_folder_without_classes_is_refused_before_anything_is_written(tmp_path, layout, message):
    root = _folder(tmp_path / "imgs", layout)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        train(TrainConfig(**{**COND, "data": str(root), "image_size": 8, "batch_size": 2}), out)
    assert not out.exists()


def test_empty_class_folder_and_swiss_roll_are_refused(tmp_path):
    root = _folder(tmp_path / "imgs", {"a/0.png": 10, "a/1.png": 10, "b/0.png": 20, "b/1.png": 20})
    (root / "c").mkdir()
    with pytest.raises(ValueError, match=r"sub-folder\(s\) \['c'\] .* hold no readable image"):
        train(TrainConfig(**{**COND, "data": str(root), "image_size": 8, "batch_size": 2}), tmp_path / "run")
    with pytest.raises(ValueError, match="the data 'swissroll' have none"):
        train(TrainConfig(**{**COND, "data": "swissroll"}), tmp_path / "run2")
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


def test_config_checks_the_class_fields():
    with pytest.raises(ValueError, match="uncond_prob is for class-conditional runs"):
        TrainConfig(**TINY, uncond_prob=0.2)
    with pytest.raises(ValueError, match="num_classes is for class-conditional runs"):
        TrainConfig(**TINY, num_classes=3)
    with pytest.raises(ValueError, match=r"uncond_prob .* must be a number in \[0, 1\); got uncond_prob = 1.0"):
        TrainConfig(**{**COND, "uncond_prob": 1.0})
    with pytest.raises(ValueError, match="class_names has 2 names but num_classes = 3"):
        TrainConfig(**COND, num_classes=3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="the config names 3 classes"):
        resolve_classes(TrainConfig(**COND, num_classes=3), load_data("digits"))
    assert "conditional" not in TrainConfig(**TINY).to_dict()  # unconditional files keep their old keys


# ----------------------------------------------------------------------------- unconditional runs unchanged
def _source_at(commit: str, dest: Path) -> Path:
    """diffmath/ and kernels/ of ``commit`` unpacked into dest, importable as diffmath (kernels/
    linked in as diffmath.kernels, as the install maps it)."""
    try:
        arch = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", commit, "diffmath", "kernels"],
            capture_output=True,
            check=True,
            timeout=120,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip("needs the git history (the commit before classes) to compare against")
    dest.mkdir()
    tar = dest / "src.tar"
    tar.write_bytes(arch)
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    (dest / "diffmath" / "kernels").symlink_to(dest / "kernels", target_is_directory=True)
    return dest


_RUN = """
import sys, numpy as np, torch
torch.set_num_threads(1)
from diffmath.train import TrainConfig, train  # the old paths: this script also runs against the commit before classes
from diffmath.sample import load_model, generate
cfg = TrainConfig(data="digits", steps=3, batch_size=16, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(4,), save_every=3, timesteps=50, warmup=2, lr=1e-3, progress=False,
                  device="cpu")
train(cfg, sys.argv[1])
lm = load_model(run=sys.argv[1], device="cpu")
np.save(sys.argv[1] + ".npy", np.concatenate([generate(lm, 6, sampler=s, steps=4) for s in ("ddim", "ddpm", "em")]))
"""


def test_unconditional_runs_are_byte_identical_to_before_classes(tmp_path):
    old = _source_at(BEFORE_CLASSES, tmp_path / "old")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, path in (("old", str(old)), ("new", str(REPO))):
        out = tmp_path / f"run-{name}"
        r = subprocess.run(
            [sys.executable, "-c", _RUN, str(out)],
            env={**env, "PYTHONPATH": path},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = out
    a, b = runs["old"], runs["new"]
    assert (a / "step-000003.safetensors").read_bytes() == (b / "step-000003.safetensors").read_bytes()
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (a, b))
    assert ca == cb
    ma, mb = (json.loads((p / "step-000003.json").read_text()) for p in (a, b))
    assert {k: v for k, v in ma.items() if k != "written"} == {k: v for k, v in mb.items() if k != "written"}
    xa, xb = np.load(str(a) + ".npy"), np.load(str(b) + ".npy")
    assert np.array_equal(xa[:12], xb[:12])  # ddim, ddpm
    # em: since em/pc/ode take their score from the one Denoiser (model time interpolated in log
    # sigma, no longer in -log abar; docs/samplers.md) its samples moved by design, by the model
    # time only: bit-identical no longer, close still (measured: 2.3e-5 where |x| reaches 123)
    assert np.abs(xa[12:] - xb[12:]).max() < 1e-5 * np.abs(xa[12:]).max()


# ----------------------------------------------------------------------------- latent and DDP
def test_latent_conditional_unet_samples_and_evaluates_per_class(tmp_path):
    from diffmath.latent import VAEConfig, evaluate_latent, sample_latent, train_latent

    unet = dict(
        data="digits",
        image_size=8,
        steps=4,
        batch_size=32,
        channels=8,
        channel_mult=(1,),
        num_res_blocks=1,
        attention_resolutions=(4,),
        dropout=0.0,
        schedule="cosine",
        timesteps=50,
        warmup=2,
        lr=1e-3,
        save_every=4,
        progress=False,
        device="cpu",
        conditional=True,
    )
    vae = dict(channels=8, steps=5, batch_size=64, lr=3e-3, warmup=2, progress=False, device="cpu", elbo_samples=1)
    res = train_latent(tmp_path / "lat", TrainConfig(**unet), vae_config=VAEConfig(**vae))
    cfg = json.loads((tmp_path / "lat" / "unet" / "config.json").read_text())["config"]
    assert cfg["num_classes"] == 10 and cfg["class_names"] == [str(d) for d in range(10)] and res.unet.step == 4
    x, info = sample_latent(
        tmp_path / "lat", tmp_path / "lat", steps=3, num_samples=20, classes="all", guidance=2.0, device="cpu"
    )
    assert x.shape == (20, 1, 8, 8) and info["guidance"] == 2.0 and info["classes"] == list(range(10))
    with np.load(tmp_path / "lat" / "samples.npz", allow_pickle=False) as z:
        assert z["labels"].tolist() == list(np.repeat(np.arange(10), 2)) and z["latents"].shape == (20, 2, 4, 4)
    m = evaluate_latent(tmp_path / "lat", device="cpu")
    assert set(m["per_class"]["classes"]) == {str(d) for d in range(10)}
    from diffmath.cli import main

    assert (
        main(
            [
                "evaluate",
                "--run",
                str(tmp_path / "lat"),
                "--guidance-sweep",
                "1.5",
                "--per-class",
                "2",
                "--out",
                str(tmp_path / "sweep"),
                "--no-progress",
            ]
        )
        == 0
    )
    g = json.loads((tmp_path / "sweep" / "guidance.json").read_text())
    assert g["scales"][0]["per_class"] == 2 and set(g["scales"][0]["classes"]) == {str(d) for d in range(10)}
    # a folder with one class is refused before the VAE trains
    root = _folder(tmp_path / "one", {f"a/{i}.png": 10 * i for i in range(4)})
    with pytest.raises(ValueError, match="needs at least 2 classes"):
        train_latent(
            tmp_path / "lat2", TrainConfig(**{**unet, "data": str(root), "batch_size": 2}), vae_config=VAEConfig(**vae)
        )
    assert not (tmp_path / "lat2").exists()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_conditional_matches_one_process(tmp_path):
    """Under torchrun with 2 processes the labels are sharded with their images and dropped by one
    generator drawing the global batch: the same losses as one process, the same dropout state."""
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
        "--conditional",
        "--uncond-prob",
        "0.3",
        "--lr",
        "0.01",
        "--warmup",
        "0",
    ]
    # lr 0.01 from the first step: Adam moves each class-embedding row that got a gradient by ~0.01,
    # so a label given to the wrong image on either rank would show in model.class_emb.weight
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
    m1, m2 = (json.loads((tmp_path / d / "step-000003.json").read_text()) for d in ("one", "two"))
    assert m2["world_size"] == 2 and m2["config"]["num_classes"] == 10
    assert m1["rng"]["label_dropout"] == m2["rng"]["label_dropout"]
    l1 = load_file(str(tmp_path / "one" / "step-000003.safetensors"))
    l2 = load_file(str(tmp_path / "two" / "step-000003.safetensors"))
    np.testing.assert_allclose(l2["loss_history"].numpy(), l1["loss_history"].numpy(), rtol=1e-5)
    assert "model.class_emb.weight" in l1
    for k in l1:
        if k.startswith("model."):
            torch.testing.assert_close(l2[k], l1[k], rtol=1e-4, atol=1e-5)
