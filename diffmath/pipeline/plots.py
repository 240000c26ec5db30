"""The figures of a training run: loss.png (``plot_loss``), schedule.png (``plot_schedule``) and,
for a class-conditional run, guidance.png (``plot_guidance``), PNG bytes written atomically
(``diffmath.pipeline.io.atomic_write_bytes``). Importable from ``diffmath.train`` too.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..schedules import Schedule
from .io import atomic_write_bytes

__all__ = ["plot_loss", "plot_schedule", "plot_guidance"]


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


def plot_guidance(path: Path, rows, title: str = "classifier-free guidance"):
    """Agreement with the requested class, per-class distance and feature spread against the
    guidance scale s: ``rows`` as ``diffmath.pipeline.evaluate.guidance_sweep`` returns them (the mean
    over classes, the lowest class's agreement, the floor of the distance dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["guidance"])
    s = [r["guidance"] for r in rows]
    mean = [r["mean"] for r in rows]
    fd_key = "fd" if all("fd" in m for m in mean) else "sliced_wasserstein"
    panels = [("agreement", "agreement with the requested class")]
    if all(fd_key in m for m in mean):
        panels.append((fd_key, "per-class Fréchet distance" if fd_key == "fd" else "per-class sliced W1"))
    if all("spread" in m for m in mean):
        panels.append(("spread", "feature spread (real class = 1)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.3), dpi=100, squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        ax.plot(s, [m[key] for m in mean], "o-", label="mean over classes")
        if key == "agreement":
            ax.plot(s, [r["min_agreement"]["agreement"] for r in rows], "s--", ms=4, label="lowest class")
            ax.set_ylim(-0.02, 1.02)
        elif key in ("fd", "sliced_wasserstein"):
            ax.plot(s, [m[f"{key}_floor"] for m in mean], "k--", lw=1, label="floor (real held-out)")
            if all(m[key] > 0 for m in mean):
                ax.set_yscale("log")  # s = 0 (the unconditional model) is far off every class
        elif key == "spread":
            ax.axhline(1.0, color="k", ls="--", lw=1, label="real")
        ax.set_xlabel("guidance scale s")
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    save_fig(fig, path)
    plt.close(fig)


def save_fig(fig, path: Path):
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
