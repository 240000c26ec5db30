"""Class-conditional denoisers: num_classes = 0 is exactly the unconditional network of
before; num_classes = K adds a class embedding (row K the null class) to the time embedding."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffmath.nn import MLPDenoiser, UNet

# The last commit before conditioning existed: its nn/unet.py and nn/mlp.py are the reference
# that num_classes = 0 must reproduce bit for bit (parameters, init RNG draws, outputs).
UNCONDITIONAL_COMMIT = "94d27b31fb248c42819dd888a85d9f25ef06eea3"
REPO = Path(__file__).resolve().parents[2]

UNET_KW = dict(channels=8, channel_mult=(1, 2), attention_resolutions=(4,), image_size=8, dropout=0.0)
MLP_KW = dict(dim=2, hidden=16, depth=2, time_dim=8)


def _old_nn(tmp_path):
    """nn/unet.py and nn/mlp.py as they were at UNCONDITIONAL_COMMIT, imported as a package."""
    pkg = tmp_path / "oldnn"
    pkg.mkdir()
    for name in ("unet.py", "mlp.py"):
        try:
            src = subprocess.run(
                ["git", "-C", str(REPO), "show", f"{UNCONDITIONAL_COMMIT}:diffmath/nn/{name}"],
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            pytest.skip("needs the git history (the unconditional networks' commit) to compare against")
        (pkg / name).write_text(src)
    (pkg / "__init__.py").write_text("")
    spec = importlib.util.spec_from_file_location("oldnn", pkg / "__init__.py", submodule_search_locations=[str(pkg)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["oldnn"] = mod
    try:
        spec.loader.exec_module(mod)
        unet = importlib.import_module("oldnn.unet")
        mlp = importlib.import_module("oldnn.mlp")
    finally:
        for k in [k for k in sys.modules if k == "oldnn" or k.startswith("oldnn.")]:
            del sys.modules[k]
    return unet.UNet, mlp.MLPDenoiser


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_num_classes_zero_is_the_unconditional_network_of_before(kind, tmp_path):
    OldUNet, OldMLP = _old_nn(tmp_path)
    Old, New, kw = (OldUNet, UNet, UNET_KW) if kind == "unet" else (OldMLP, MLPDenoiser, MLP_KW)
    torch.manual_seed(123)
    old = Old(**kw)
    after_old = torch.rand(3)  # the init consumed exactly as many RNG draws
    torch.manual_seed(123)
    new = New(**kw)
    after_new = torch.rand(3)
    assert torch.equal(after_old, after_new)
    _same_state(old, new)
    assert not any("class" in k for k in new.state_dict())
    # away from the zero init, the same outputs bit for bit
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in old.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    new.load_state_dict(old.state_dict())  # a checkpoint of before loads (strict)
    x = torch.randn((4, 1, 8, 8) if kind == "unet" else (4, 2), generator=g)
    t = torch.tensor([0, 3, 500, 999])
    with torch.no_grad():
        assert torch.equal(old(x, t), new(x, t))


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_conditional_network_adds_a_class_embedding_last(kind):
    New, kw = (UNet, UNET_KW) if kind == "unet" else (MLPDenoiser, MLP_KW)
    torch.manual_seed(7)
    unc = New(**kw)
    torch.manual_seed(7)
    cond = New(num_classes=10, **kw)
    su, sc = unc.state_dict(), cond.state_dict()
    # the class embedding is the only addition, built after everything else: the other
    # parameters draw exactly the unconditional network's initial values
    assert list(sc) == list(su) + ["class_emb.weight"]
    for k in su:
        assert torch.equal(su[k], sc[k]), k
    width = 4 * kw["channels"] if kind == "unet" else kw["hidden"]
    assert sc["class_emb.weight"].shape == (11, width)  # 10 classes + the null class
    assert cond.num_classes == 10 and unc.num_classes == 0
    # with a zero class embedding the conditional network is the unconditional one, exactly
    # (the embedding is added to temb and nothing else changes)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in unc.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        cond.load_state_dict({**unc.state_dict(), "class_emb.weight": torch.zeros(11, width)})
        x = torch.randn((5, 1, 8, 8) if kind == "unet" else (5, 2), generator=g)
        t = torch.tensor([1, 2, 3, 400, 999])
        assert torch.equal(cond(x, t, torch.tensor([0, 3, 9, 10, 4])), unc(x, t))


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_conditional_output_depends_on_the_label(kind):
    New, kw = (UNet, UNET_KW) if kind == "unet" else (MLPDenoiser, MLP_KW)
    torch.manual_seed(0)
    m = New(num_classes=3, **kw)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        x1 = torch.randn((1, 1, 8, 8) if kind == "unet" else (1, 2), generator=g)
        x = x1.repeat(4, *([1] * (x1.ndim - 1)))
        t = torch.full((4,), 250)
        out = m(x, t, torch.tensor([0, 1, 2, 3]))
        # every class, and the null class, gives a different prediction
        d = torch.cdist(out.reshape(4, -1), out.reshape(4, -1))
        assert d[~torch.eye(4, dtype=torch.bool)].min() > 1e-4
        # y=None is the null class; an int label broadcasts; numpy labels work
        assert torch.equal(m(x, t), m(x, t, torch.full((4,), 3)))
        assert torch.equal(m(x, t, 1), m(x, t, torch.ones(4, dtype=torch.long)))
        assert torch.equal(m(x, t, np.array([0, 1, 2, 3])), out)
        # each sample sees its own label only (no mixing across the batch; float32 kernels may
        # round differently for another batch size, hence a tolerance far below the label effect)
        torch.testing.assert_close(m(x[:1], t[:1], torch.tensor([2])), out[2:3], rtol=1e-5, atol=1e-6)


def test_conditional_unet_trains_the_class_embedding():
    torch.manual_seed(0)
    m = UNet(num_classes=4, **UNET_KW)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    y = torch.tensor([0, 1, 4, 2])
    for _ in range(3):
        loss = (m(x, t, y) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    g = m.class_emb.weight.grad
    # rows of the labels used get gradients, the unused class 3 none
    assert torch.all(g[[0, 1, 2, 4]].abs().sum(1) > 0) and torch.all(g[3] == 0)


@pytest.mark.parametrize(
    "num_classes,y,exc,match",
    [
        (0, torch.tensor([0, 1]), ValueError, r"unconditional network \(num_classes = 0\)"),
        (0, 0, ValueError, r"unconditional network"),
        (3, torch.tensor([0, 4]), ValueError, r"y must lie in \[0, 3\].*got y = 4"),
        (3, torch.tensor([-1, 2]), ValueError, r"y must lie in \[0, 3\].*got y = -1"),
        (3, 5, ValueError, r"got y = 5"),
        (3, torch.tensor([0, 1, 2]), ValueError, r"shape \(B,\) = \(2,\); got shape \(3,\)"),
        (3, torch.zeros(2, 1, dtype=torch.long), ValueError, r"got shape \(2, 1\)"),
        (3, torch.tensor([0.0, 1.0]), TypeError, "integer class labels; got dtype torch.float32"),
        (3, torch.tensor([True, False]), TypeError, "got dtype torch.bool"),
        (3, 1.0, TypeError, "integer class label"),
        (3, True, TypeError, "integer class label"),
    ],
)
@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_label_validation(kind, num_classes, y, exc, match):
    New, kw = (UNet, UNET_KW) if kind == "unet" else (MLPDenoiser, MLP_KW)
    m = New(num_classes=num_classes, **kw)
    x = torch.zeros((2, 1, 8, 8) if kind == "unet" else (2, 2))
    with pytest.raises(exc, match=match):
        m(x, torch.zeros(2, dtype=torch.long), y)


def test_label_bounds_are_inclusive_of_the_null_class():
    m = MLPDenoiser(num_classes=3, **MLP_KW)
    x = torch.zeros(2, 2)
    assert m(x, torch.zeros(2, dtype=torch.long), torch.tensor([0, 3])).shape == (2, 2)


@pytest.mark.parametrize("bad,exc", [(-1, ValueError), (2.0, TypeError), (True, TypeError), ("3", TypeError)])
def test_num_classes_validation(bad, exc):
    with pytest.raises(exc, match="num_classes must be an integer >= 0|num_classes must be >= 0"):
        UNet(num_classes=bad, **UNET_KW)
    with pytest.raises(exc, match="num_classes"):
        MLPDenoiser(num_classes=bad, **MLP_KW)
