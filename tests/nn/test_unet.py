import numpy as np
import pytest
import torch

from diffmath.nn import MLPDenoiser, UNet, timestep_embedding


def test_timestep_embedding_matches_the_transformer_formula():
    # independent reference: numpy float64 evaluation of cos/sin(t * 10000^(-i/half))
    t = np.array([0, 1, 17, 999])
    dim = 10
    half = dim // 2
    f = 10000.0 ** (-np.arange(half) / half)
    ref = np.concatenate([np.cos(t[:, None] * f), np.sin(t[:, None] * f)], axis=1)
    got = timestep_embedding(torch.tensor(t), dim).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-4)  # float32 arguments up to ~1e3
    odd = timestep_embedding(torch.tensor(t), 7)
    assert odd.shape == (4, 7) and torch.all(odd[:, -1] == 0)


@pytest.mark.parametrize(
    "kw,shape",
    [
        (dict(channels=8, channel_mult=(1, 2), attention_resolutions=(4,), image_size=8), (3, 1, 8, 8)),
        (
            dict(channels=8, channel_mult=(1, 2, 2), attention_resolutions=(8, 2), image_size=16, num_res_blocks=1),
            (2, 1, 16, 16),
        ),
        (
            dict(
                in_channels=3, channels=6, channel_mult=(1,), attention_resolutions=(), image_size=5, num_res_blocks=1
            ),
            (1, 3, 5, 5),
        ),
    ],
)
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_unet_shapes_and_zero_init(kw, shape, learn_sigma):
    torch.manual_seed(0)
    m = UNet(learn_sigma=learn_sigma, dropout=0.0, **kw)
    x = torch.randn(shape)
    t = torch.arange(shape[0])
    y = m(x, t)
    C = shape[1]
    assert y.shape == (shape[0], 2 * C if learn_sigma else C) + shape[2:]
    assert torch.all(y == 0)  # the output conv starts at zero
    # float timesteps (continuous-time queries) work too
    assert m(x, t.float() + 0.5).shape == y.shape


def test_unet_trains_every_parameter_and_depends_on_t():
    torch.manual_seed(0)
    m = UNet(channels=8, channel_mult=(1, 2), attention_resolutions=(4,), image_size=8, dropout=0.0)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    for _ in range(3):
        loss = (m(x, t) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss = (m(x, t) - x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not dead, dead
    with torch.no_grad():  # away from the zero init, the output depends on t
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
        a = m(x[:1].repeat(2, 1, 1, 1), torch.tensor([0, 999]))
    assert (a[0] - a[1]).abs().max() > 1e-3


def test_unet_bad_input():
    with pytest.raises(ValueError, match="image_size must be divisible"):
        UNet(image_size=6, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="dropout"):
        UNet(dropout=1.0)
    m = UNet(channels=8, image_size=8, channel_mult=(1, 2))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, H, W\)"):
        m(torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="t must have shape"):
        m(torch.randn(2, 1, 8, 8), torch.zeros(3, dtype=torch.long))


def test_mlp_denoiser():
    torch.manual_seed(0)
    m = MLPDenoiser(dim=2, hidden=16, depth=2)
    x = torch.randn(5, 2)
    assert m(x, torch.arange(5)).shape == (5, 2)
    assert MLPDenoiser(dim=2, hidden=16, learn_sigma=True)(x, torch.arange(5)).shape == (5, 4)
    with pytest.raises(ValueError, match="x must have shape"):
        m(torch.randn(5, 3), torch.arange(5))


def test_nn_imports_only_torch():
    import subprocess
    import sys

    code = (
        "import sys; import diffmath.nn; "
        "bad = [m for m in ('numpy.random', 'scipy', 'sklearn', 'diffmath.train', 'diffmath.schedules') if m "
        "in sys.modules]; "
        "print(bad)"
    )
    # diffmath/__init__ itself imports the math core (numpy, scipy); nn must add nothing beyond torch
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "sklearn" not in out and "diffmath.train" not in out
