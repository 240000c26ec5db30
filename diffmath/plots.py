"""The figures of a training run: loss.png (``plot_loss``) and schedule.png (``plot_schedule``),
PNG bytes written atomically (``diffmath._io.atomic_write_bytes``). Importable from
``diffmath.train`` too.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ._io import atomic_write_bytes
from .schedules import Schedule

__all__ = ["plot_loss", "plot_schedule"]


def plot_loss(path: Path, loss_history, title: str = "training loss"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.asarray(loss_history, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if y.size:
        x = np.arange(1, y.size + 1)
        ax.plot(x, y, lw=0.6, alpha=0.35, label="per step")
        k = max(1, min(100, y.size // 20))
        if y.size >= k and k > 1:
            sm = np.convolve(y, np.ones(k) / k, mode="valid")
            ax.plot(x[k - 1 :], sm, lw=1.5, label=f"moving mean ({k})")
        if np.all(y > 0):
            ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    save_fig(fig, path)
    plt.close(fig)


def plot_schedule(path: Path, s: Schedule, name: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.arange(s.num_timesteps)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), dpi=100)
    axes[0].plot(t, s.betas)
    axes[0].set_title("beta_t")
    axes[1].plot(t, s.alphas_cumprod)
    axes[1].set_title("alpha_bar_t")
    axes[2].plot(t, s.log_snr)
    axes[2].set_title("log SNR_t")
    for ax in axes:
        ax.set_xlabel("t")
    fig.suptitle(f"schedule {name!r}, T = {s.num_timesteps}")
    fig.tight_layout()
    save_fig(fig, path)
    plt.close(fig)


def save_fig(fig, path: Path):
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())

