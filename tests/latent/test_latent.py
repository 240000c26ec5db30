"""Latent diffusion (diffmath.latent): the latent cache and its scaling factor, the hash checks,
the end-to-end latent run (train VAE -> encode -> train U-Net -> sample -> decode), bad input,
and the comparison table."""

import json
import math
import pickle

import numpy as np
import pytest
import torch

from diffmath.latent import (
    LatentCacheError,
    VAEConfig,
    check_unet_fits,
    check_vae_fits,
    compare_pixel_latent,
    comparison_table,
    decode_latents,
    encode_dataset,
    load_latents,
    load_vae,
    read_latent_run,
    sample_latent,
    save_vae,
    scale_factor,
    train_latent,
    train_vae,
)
from diffmath.nn.vae import VAE
from diffmath.pipeline.config import TrainConfig
from diffmath.pipeline.data import Data, load_digits
from diffmath.pipeline.rundir import RunError

torch.set_num_threads(1)

TINY_VAE = dict(channels=8, steps=25, batch_size=64, lr=3e-3, warmup=5, progress=False, device="cpu", elbo_samples=1)
TINY_UNET = dict(
    data="digits",
    image_size=8,
    steps=6,
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
    save_every=3,
    progress=False,
    device="cpu",
)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def vae_a(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("vae_a")
    return train_vae(VAEConfig(**TINY_VAE, seed=0), out, data=digits).loaded


@pytest.fixture(scope="module")
def vae_b(tmp_path_factory):
    """Same architecture, other weights (another init): another hash."""
    torch.manual_seed(123)
    return load_vae(save_vae(tmp_path_factory.mktemp("vae_b"), VAE(channels=8), bins=17))


# ----------------------------------------------------------------------------- the cache and the scale
def test_encode_decode_roundtrip_shapes_and_scale(tmp_path, digits, vae_a):
    path = tmp_path / "latents.safetensors"
    cache = encode_dataset(vae_a, digits, path)
    loaded = load_latents(path, vae=vae_a, data=digits)
    assert loaded.latent_shape == vae_a.latent_shape == (2, 4, 4)
    assert loaded.train.shape == (len(digits.train), 2, 4, 4) and loaded.held_out.shape == (
        len(digits.held_out),
        2,
        4,
        4,
    )
    np.testing.assert_array_equal(loaded.train, cache.train)
    np.testing.assert_array_equal(loaded.labels_train, digits.labels_train)
    # the cached latents are the posterior means of the VAE, computed here independently
    with torch.no_grad():
        mean, logvar = vae_a.vae.encode(torch.from_numpy(digits.held_out))
    np.testing.assert_allclose(loaded.held_out, mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loaded.held_out_logvar, logvar.numpy(), rtol=1e-5, atol=1e-6)
    # Rombach's scale: 1 / std of every element of the training latents (float64 numpy reference)
    z = loaded.train.astype(np.float64)
    ref = 1.0 / math.sqrt(np.mean((z - z.mean()) ** 2))
    assert math.isclose(loaded.scale, ref, rel_tol=1e-12)
    assert loaded.meta["scale_factor"] == loaded.scale
    d = loaded.data()
    assert d.bins is None and d.kind == "image" and d.shape == (2, 4, 4)
    assert abs(float(np.var(d.train.astype(np.float64))) - 1.0) < 1e-5  # unit variance by construction
    assert 0.7 < float(np.var(d.held_out.astype(np.float64))) < 1.3  # and about 1 on held-out digits
    # decode(scaled latents) undoes the scale: the decoder mean of the unscaled posterior mean
    imgs = decode_latents(vae_a, d.held_out, loaded.scale)
    with torch.no_grad():
        direct = vae_a.vae.decode(mean)[0].clamp(-1, 1).numpy()
    assert imgs.shape == digits.held_out.shape == (300, 1, 8, 8)
    np.testing.assert_allclose(imgs, direct, rtol=1e-5, atol=1e-5)
    assert imgs.min() >= -1 and imgs.max() <= 1


def test_sample_mode_and_scale_factor_errors(digits, vae_a):
    c1 = encode_dataset(vae_a, digits, mode="sample", seed=5)
    c2 = encode_dataset(vae_a, digits, mode="sample", seed=5)
    c3 = encode_dataset(vae_a, digits, mode="mean")
    np.testing.assert_array_equal(c1.train, c2.train)  # seeded
    # sampled latents spread more than the means: Var[z] = Var[mean] + E[exp(logvar)]
    assert c1.scale < c3.scale
    expected_var = np.var(c3.train.astype(np.float64)) + np.mean(np.exp(c3.train_logvar.astype(np.float64)))
    assert abs(1.0 / c1.scale**2 / expected_var - 1) < 0.05
    with pytest.raises(ValueError, match="mode must be 'mean' or 'sample'"):
        encode_dataset(vae_a, digits, mode="mode")
    with pytest.raises(ValueError, match="constant"):
        scale_factor(np.ones((4, 2)))
    with pytest.raises(ValueError, match="finite"):
        scale_factor(np.array([0.0, np.nan]))


def test_cache_from_another_vae_is_refused(tmp_path, digits, vae_a, vae_b):
    path = tmp_path / "latents.safetensors"
    encode_dataset(vae_a, digits, path)
    assert vae_a.hash != vae_b.hash and vae_a.latent_shape == vae_b.latent_shape
    with pytest.raises(LatentCacheError, match=r"encoded by the VAE with hash .* but the VAE given has hash"):
        load_latents(path, vae=vae_b)
    with pytest.raises(LatentCacheError, match="another VAE"):
        load_latents(path, vae=vae_b.path)  # a checkpoint path works too
    other = Data("digits", "image", digits.train[::-1].copy(), digits.held_out, 17)
    with pytest.raises(LatentCacheError, match="encoded from other images"):
        load_latents(path, vae=vae_a, data=other)
    load_latents(path, vae=vae_a, data=digits)  # the right pair is accepted
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(LatentCacheError, match="not a readable safetensors"):
        load_latents(tmp_path / "junk.safetensors")


def test_no_pickle_is_loaded(tmp_path, digits, vae_a, monkeypatch):
    path = tmp_path / "latents.safetensors"
    encode_dataset(vae_a, digits, path)

    def boom(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)
    load_latents(path, vae=load_vae(vae_a.path))


# ----------------------------------------------------------------------------- bad input
def test_image_sizes_the_vae_cannot_handle(digits, vae_a):
    d16 = Data("digits16", "image", np.zeros((4, 1, 16, 16), np.float32), np.zeros((2, 1, 16, 16), np.float32), 256)
    with pytest.raises(
        ValueError, match=r"the VAE takes images of shape \(1, 8, 8\); the 'digits16' images have shape \(1, 16, 16\)"
    ):
        encode_dataset(vae_a, d16)
    with pytest.raises(ValueError, match=r"down-samples by f = 4 .* divisible by 4; the data are 10x10"):
        check_vae_fits(VAEConfig(image_size=8, channel_mult=(1, 2, 2)), (1, 10, 10))
    with pytest.raises(ValueError, match="square"):
        check_vae_fits(VAEConfig(), (1, 8, 4))
    toy = Data("gmm", "toy", np.zeros((4, 2), np.float32), np.zeros((2, 2), np.float32), None)
    with pytest.raises(ValueError, match=r"needs image data of shape \(C, H, W\)"):
        train_vae(VAEConfig(**TINY_VAE), "/nonexistent", data=toy)


def test_unet_config_that_cannot_take_the_latents():
    with pytest.raises(ValueError, match=r"down-samples by 8 .* the latents are 4x4"):
        check_unet_fits(TrainConfig(**{**TINY_UNET, "channel_mult": (1, 2, 2, 2)}), (2, 4, 4))
    with pytest.raises(ValueError, match="learn_sigma is not supported"):
        check_unet_fits(TrainConfig(**{**TINY_UNET, "learn_sigma": True}), (2, 4, 4))
    check_unet_fits(TrainConfig(**{**TINY_UNET, "channel_mult": (1, 2)}), (2, 4, 4))


def test_unet_misfit_is_refused_before_the_vae_is_trained(tmp_path, digits, monkeypatch):
    import diffmath.latent.diffusion as latent_diffusion  # train_latent's module (diffmath.latent re-exports it)

    def no_training(*a, **k):
        raise AssertionError("the VAE was trained before the U-Net config was checked")

    monkeypatch.setattr(latent_diffusion, "train_vae", no_training)
    with pytest.raises(ValueError, match=r"down-samples by 8 .* the latents are 4x4"):
        train_latent(
            tmp_path / "a",
            TrainConfig(**{**TINY_UNET, "channel_mult": (1, 2, 2, 2)}),
            vae_config=VAEConfig(**TINY_VAE),
            data=digits,
        )
    with pytest.raises(ValueError, match="learn_sigma is not supported"):
        train_latent(tmp_path / "b", TrainConfig(**{**TINY_UNET, "learn_sigma": True}), data=digits)
    assert not (tmp_path / "b").exists()  # nothing written


def test_nn_exports_the_vae():
    import diffmath.nn

    assert diffmath.nn.VAE is VAE and "VAE" in diffmath.nn.__all__


# ----------------------------------------------------------------------------- end to end
def test_latent_run_end_to_end(tmp_path, digits, vae_a, vae_b, tmp_path_factory):
    # train the VAE (no checkpoint given) -> encode -> train the U-Net -> sample -> decode
    out = tmp_path / "run"
    res = train_latent(out, TrainConfig(**TINY_UNET), vae_config=VAEConfig(**TINY_VAE), data=digits)
    assert res.unet.step == 6 and all(math.isfinite(v) for v in res.unet.losses)
    assert res.latent_shape == (2, 4, 4)
    info = read_latent_run(out)
    assert info["vae_checkpoint"] == "vae/vae.json" and info["latent_shape"] == [2, 4, 4]
    assert math.isclose(info["scale_factor"], res.scale) and (out / "vae" / "recon.png").exists()
    cfg = json.loads((out / "unet" / "config.json").read_text())
    assert cfg["data"]["shape"] == [2, 4, 4] and cfg["config"]["channel_mult"] == [1]
    x, si = sample_latent(out, out, num_samples=12, sampler="ddim", steps=5, device="cpu")
    assert x.shape == (12, 1, 8, 8) and x.dtype == np.float32 and np.all(np.isfinite(x))
    assert x.min() >= -1 and x.max() <= 1
    with np.load(out / "samples.npz", allow_pickle=False) as z:
        assert z["samples"].shape == (12, 1, 8, 8) and z["latents"].shape == (12, 2, 4, 4)
        assert np.all(np.isfinite(z["latents"]))
        # the predicted x0 is never clipped to the pixel range [-1, 1]: with an (almost) untrained
        # eps-model, DDIM's x0 = x_T / sqrt(abar_T) lands far outside it
        assert np.abs(z["latents"]).max() > 2
    assert json.loads(str(np.load(out / "samples.npz")["info"]))["latent"] is True
    # the samples decode through the run's VAE: decoding the stored latents gives them back
    lv = load_vae(out / "vae")
    with np.load(out / "samples.npz") as z:
        np.testing.assert_allclose(decode_latents(lv, z["latents"], res.scale), x, atol=1e-6)
    # the sigma-space solvers: the latents are those of sample.generate on the U-Net alone (never
    # clipped) with the same ladder, decoded by the same path
    from diffmath.sample import generate, load_model

    lm = load_model(run=out / "unet", device="cpu")
    for ladder in ("karras", "schedule"):
        xs, si = sample_latent(out, None, num_samples=6, sampler="dpmpp-2m", sigmas=ladder, steps=4, device="cpu")
        z = generate(lm, 6, sampler="dpmpp-2m", sigmas=ladder, steps=4, clip_x0=None)
        np.testing.assert_array_equal(xs, decode_latents(lv, z, res.scale))
        assert si["sigmas"] == ladder and si["nfe"] == 4 and si["sampler"] == "dpmpp-2m"
    with pytest.raises(ValueError, match="sigmas must be one of"):
        sample_latent(out, None, num_samples=2, sampler="dpmpp-2m", sigmas="linear", device="cpu")
    # resume continues the same run (the VAE and cache are reused, not retrained)
    vae_bytes = (out / "vae" / "vae.safetensors").read_bytes()
    res2 = train_latent(out, TrainConfig(**{**TINY_UNET, "steps": 9}), resume=True, data=digits)
    assert res2.unet.step == 9 and (out / "vae" / "vae.safetensors").read_bytes() == vae_bytes
    # the out-dir rules
    with pytest.raises(RunError, match="already exists and is not empty"):
        train_latent(out, TrainConfig(**TINY_UNET), vae=vae_a, data=digits)
    # a VAE whose latents do not fit the U-Net
    torch.manual_seed(0)
    wide = load_vae(save_vae(tmp_path_factory.mktemp("wide"), VAE(channels=8, latent_channels=4), bins=17))
    with pytest.raises(ValueError, match=r"latents of shape \(4, 4, 4\) but the U-Net .* latents of shape \(2, 4, 4\)"):
        sample_latent(out, num_samples=2, steps=2, device="cpu", vae=wide)
    # a VAE of the right shape that is not the run's
    with pytest.raises(LatentCacheError, match="is not the one whose latents"):
        sample_latent(out, num_samples=2, steps=2, device="cpu", vae=vae_b)
    with pytest.raises(LatentCacheError, match="a resumed run keeps its VAE"):
        train_latent(out, TrainConfig(**{**TINY_UNET, "steps": 12}), vae=vae_b, resume=True, data=digits)
    # a stale cache (another VAE) with the U-Net trained on the old latents
    encode_dataset(vae_b, digits, out / "latents.safetensors")
    with pytest.raises(LatentCacheError):
        train_latent(out, TrainConfig(**{**TINY_UNET, "steps": 12}), resume=True, data=digits)


def test_overwrite_with_a_given_vae(tmp_path, digits, vae_a):
    out = tmp_path / "run"
    train_latent(out, TrainConfig(**TINY_UNET), vae=vae_a, data=digits)
    res = train_latent(out, TrainConfig(**{**TINY_UNET, "steps": 3}), vae=vae_a.path, data=digits, overwrite=True)
    assert res.unet.step == 3 and not (out / "vae").exists()
    assert read_latent_run(out)["vae_hash"] == vae_a.hash


# ----------------------------------------------------------------------------- the comparison
def test_compare_pixel_latent_writes_a_table(tmp_path, vae_a):
    small = dict(TINY_UNET, channel_mult=(1, 2), timesteps=50)
    r = compare_pixel_latent(
        tmp_path / "cmp",
        budget_s=1.0,
        vae_config=VAEConfig(**{**TINY_VAE, "steps": 5}),
        pixel_config=TrainConfig(**small),
        latent_config=TrainConfig(**{**small, "channel_mult": (1,)}),
        num_samples=30,
        steps=4,
        device="cpu",
    )
    for k in ("pixel", "latent"):
        assert r[k]["steps"] >= 10 and r[k]["train_s"] > 0 and r[k]["sample_s"] > 0
        assert 0 <= r[k]["metrics"]["mean_confidence"] <= 1 and r[k]["metrics"]["frechet_distance"] >= 0
    assert r["latent"]["data_shape"] == [2, 4, 4] and r["pixel"]["data_shape"] == [1, 8, 8]
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert md.strip() == comparison_table(r)
    assert "| pixel U-Net | 1x8x8 |" in md and "| latent U-Net + VAE decoder | 2x4x4 |" in md
    assert "VAE reconstructions" in md and "real held-out digits" in md
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["budget_s"] == 1.0
    with pytest.raises(RunError, match="not empty"):
        compare_pixel_latent(tmp_path / "cmp", budget_s=1.0)


def test_demo_latent_writes_a_report_and_reuses_its_run(tmp_path):
    from diffmath.latent import demo_latent

    out = tmp_path / "demo"
    over = {k: v for k, v in TINY_UNET.items() if k not in ("progress", "device")}
    vae_over = {k: v for k, v in TINY_VAE.items() if k not in ("progress", "device")}
    m = demo_latent(
        out, device="cpu", progress=False, config_overrides=over, vae_overrides=vae_over, num_samples=20, steps=3
    )
    assert m["num_samples"] == 20 and 0 <= m["mean_confidence"] <= 1 and m["latent"]["shape"] == [2, 4, 4]
    assert math.isfinite(m["vae"]["held_out_elbo_bpd"]) and m["vae"]["held_out_elbo_bpd"] > 0
    for name in ("report.md", "metrics.json", "samples.npz", "samples.png", "latent.json", "latents.safetensors"):
        assert (out / name).exists(), name
    assert "bits/dim" in (out / "report.md").read_text()
    vae_bytes = (out / "vae" / "vae.safetensors").read_bytes()
    m2 = demo_latent(
        out, device="cpu", progress=False, config_overrides=over, vae_overrides=vae_over, num_samples=20, steps=3
    )  # reuses the finished run: nothing is retrained
    assert (out / "vae" / "vae.safetensors").read_bytes() == vae_bytes and "vae_train_s" not in m2["timings"]
    with pytest.raises(RunError, match="holds something other than this latent demo run"):
        demo_latent(
            out, device="cpu", progress=False, config_overrides={**over, "channels": 16}, vae_overrides=vae_over
        )


# ----------------------------------------------------------------------------- issue 11: the cache's SHA-256
def _flip_a_latent_bit(path):
    """Flip one exponent bit of the last float32 of the cache (the data sit after the JSON header)."""
    b = bytearray(path.read_bytes())
    b[-1] ^= 0x40
    path.write_bytes(bytes(b))


def test_a_damaged_latent_cache_is_refused(tmp_path, digits, vae_a):
    # issue 11, 6.6: one flipped bit gave a latent of -9.1e37 and --resume trained on it
    path = tmp_path / "latents.safetensors"
    encode_dataset(vae_a, digits, path)
    side = json.loads((tmp_path / "latents.json").read_text())
    import hashlib

    assert side["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    _flip_a_latent_bit(path)
    with pytest.raises(LatentCacheError, match="SHA-256 differs") as e:
        load_latents(path, vae=vae_a, data=digits)
    assert e.value.damaged
    (tmp_path / "latents.json").unlink()
    with pytest.raises(LatentCacheError, match="no latents.json beside it") as e:
        load_latents(path)
    assert e.value.damaged


def test_resume_re_encodes_a_damaged_cache_with_a_warning(tmp_path, digits, vae_a):
    out = tmp_path / "run"
    train_latent(out, TrainConfig(**{**TINY_UNET, "steps": 3}), vae=vae_a, data=digits)
    cache = out / "latents.safetensors"
    good = cache.read_bytes()
    _flip_a_latent_bit(cache)
    with pytest.warns(UserWarning, match="SHA-256 differs.*encoding the data again"):
        res = train_latent(out, TrainConfig(**{**TINY_UNET, "steps": 4}), resume=True, data=digits)
    assert res.unet.step == 4 and cache.read_bytes() == good  # the same latents, bit for bit
    # a cache that re-encodes to other latents cannot carry the U-Net on: refused
    info = json.loads((out / "latent.json").read_text())
    info["scale_factor"] *= 1.5
    (out / "latent.json").write_text(json.dumps(info))
    _flip_a_latent_bit(cache)
    with (
        pytest.warns(UserWarning, match="encoding the data again"),
        pytest.raises(LatentCacheError, match="cannot be resumed"),
    ):
        train_latent(out, TrainConfig(**{**TINY_UNET, "steps": 5}), resume=True, data=digits)


@pytest.mark.parametrize(
    "key,value,msg",
    [
        ("vae_hash", None, "lacks the key 'vae_hash'"),
        ("scale_factor", "1.3", "the key 'scale_factor' must be"),
        ("unet_run", "../elsewhere", "must name a folder inside the run"),
    ],
)
def test_a_tampered_latent_json_names_the_key(tmp_path, digits, vae_a, key, value, msg):
    out = tmp_path / "run"
    train_latent(out, TrainConfig(**{**TINY_UNET, "steps": 3}), vae=vae_a, data=digits)
    info = json.loads((out / "latent.json").read_text())
    if value is None:
        del info[key]
    else:
        info[key] = value
    (out / "latent.json").write_text(json.dumps(info))
    with pytest.raises(RunError, match=msg):
        sample_latent(out, num_samples=2, steps=2, device="cpu")
    with pytest.raises(RunError, match=msg):
        train_latent(out, TrainConfig(**{**TINY_UNET, "steps": 4}), resume=True, data=digits)


def test_a_latent_run_from_before_markers_is_adopted_then_overwritten_by_its_markers(tmp_path, digits):
    out = tmp_path / "run"
    train_latent(
        out, TrainConfig(**{**TINY_UNET, "steps": 3}), vae_config=VAEConfig(**{**TINY_VAE, "steps": 3}), data=digits
    )
    for p in list(out.rglob(".diffmath-run")) + list(out.rglob(".diffmath.lock")):
        p.unlink()  # as an older diffmath left the run
    (out / "notes.txt").write_text("mine\n")
    (out / "vae" / "notes.txt").write_text("mine too\n")
    train_latent(out, TrainConfig(**{**TINY_UNET, "steps": 4}), resume=True, data=digits)
    m = json.loads((out / ".diffmath-run").read_text())
    assert m["runs"] == ["unet", "vae"] and "latent.json" in m["files"] and "notes.txt" not in m["files"]
    assert "vae.json" in json.loads((out / "vae" / ".diffmath-run").read_text())["files"]
    train_latent(
        out,
        TrainConfig(**{**TINY_UNET, "steps": 3}),
        vae_config=VAEConfig(**{**TINY_VAE, "steps": 3}),
        data=digits,
        overwrite=True,
    )
    assert (out / "notes.txt").read_text() == "mine\n" and (out / "vae" / "notes.txt").read_text() == "mine too\n"
    assert (out / "unet" / "step-000003.json").exists() and not (out / "unet" / "step-000004.json").exists()
