"""Training a denoiser with the verified core and the fused kernels (``diffmath train``).

The loss (DDPM eq. 14, Improved DDPM eq. 16):

- eps-prediction with fixed variance: x_t = ``kernels.q_sample(s, x0, t, seed=, offset=)``
  with the noise drawn inside the kernel from a Philox stream, and
  L_simple = ``kernels.simple_loss(eps_pred, seed, offset)``, which regenerates the same eps
  from (seed, offset): the noise tensor never touches memory (on CUDA; the torch fallback
  of ``diffmath.kernels`` runs the same math on CPU).
- x0- or v-prediction, or a learned variance: the noise is drawn explicitly (a seeded
  ``torch.Generator``) and the core's DDPM Alg. 1, ``losses.ddpm_training_loss``, builds x_t,
  the target (eps, x0 or v) and L_simple = MSE(target, prediction).
- learned variance (Improved DDPM's learned range, ``learn_sigma``): the model outputs 2C
  channels; the second half v in [-1, 1] gives log Sigma = ``losses.learned_range_log_variance``.
  The hybrid loss is L_simple + lambda * T * L_t (guided-diffusion's convention: L_vlb = sum_t L_t
  is estimated by T * L_t for uniform t, in bits/dim, lambda = 0.001), where L_t =
  ``losses.vb_terms_bpd`` evaluated with the model's mean under a stop-gradient, so the VLB
  term trains only the variance (Improved DDPM, Sec. 3.1).

Optimisation: AdamW, linear warm-up then a constant learning rate (optionally a cosine decay
over ``lr_decay_steps``; neither depends on ``steps``, so extending a run with ``--resume``
gives the same trajectory as planning the longer run), gradient-norm clipping, EMA weights
(decay min(ema_decay, (1 + step)/(10 + step))), bf16 autocast on CUDA.

Determinism: everything random is keyed by (seed, step): the epoch permutation of the data,
the timesteps t, the explicit noise and the Philox (seed, offset) of the fused kernels; the
only stateful RNG is torch's global one, used by dropout, and it is saved in every checkpoint.
On CPU, training 2N steps and training N steps, then resuming for N more, give bit-identical
weights (asserted in tests/pipeline/test_train.py).

Distributed: under ``torchrun --nproc_per_node=K`` (WORLD_SIZE > 1) the model is wrapped in
DistributedDataParallel (gloo on CPU, NCCL on CUDA). ``batch_size`` is the global batch: each
epoch's seeded permutation is cut into global batches, each global batch into K contiguous
shards, and a ``DistributedSampler`` over the shard indices hands shard r of every batch to
rank r. The Philox offsets, timesteps and noise of each sample depend only on its position in
the global batch, so K processes see exactly the samples, noise and timesteps of one process
with the same global batch (only the float summation order of the gradient all-reduce
differs; ``training_loss`` explains how the CPU fallback's per-call noise streams are handled).
At every checkpoint the ranks compare a SHA-256 of their weights and stop if they differ.
Dropout masks come from each rank's own generator, so with dropout > 0 the runs agree in
distribution, not bit for bit.

Files in ``out``: config.json, step-NNNNNN.safetensors (weights ``model.*``, EMA ``ema.*``,
optimizer tensors ``optim.<i>.<name>``, ``loss_history``) + step-NNNNNN.json (step, config,
RNG states, optimizer hyper-parameters, SHA-256 of the .safetensors), loss.png and
schedule.png, all written atomically (temp file + os.replace) and listed in the folder's
``.diffmath-run`` marker; the folder is locked while the run writes (``diffmath.rundir``). No
file is ever unpickled (under torchrun the ranks exchange small objects through torch's object
collectives, which pickle them: ``diffmath.distributed``). Ctrl-C / SIGTERM finish the current
step, write a checkpoint and return.

This module holds the config, the building blocks and the loop; the file formats and the run
directory live in ``diffmath.checkpoint``, the figures in ``diffmath.plots``, devices and the
process group in ``diffmath.distributed``. Their names stay importable from here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import losses, parameterization, posterior
from .checkpoint import (  # RunError .. CHECKPOINT_FORMAT also make train's public names (__all__)
    CHECKPOINT_FORMAT,
    RESUMABLE_FIELDS,
    RESUME_KEYS,
    RUN_FORMAT,
    RunError,
    load_optimizer,
    rng_state_b64,
    rng_state_from_b64,
    write_run_config,
    check_class_count,
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    prepare_out,
    read_run_config,
    save_checkpoint,
    weights_digest,
)
from .data import Data, load_data
from .distributed import Dist, resolve_device
from .plots import plot_loss, plot_schedule
from ..schedules import SCHEDULE_NAMES, Schedule, named_schedule

__all__ = [
    "TrainConfig",
    "TrainResult",
    "RunError",
    "train",
    "build_model",
    "make_schedule",
    "training_loss",
    "latest_checkpoint",
    "load_checkpoint",
    "read_run_config",
    "DEMO_CONFIG",
    "DEMO_CLASSES",
    "resolve_classes",
    "RUN_FORMAT",
    "CHECKPOINT_FORMAT",
]

PREDICTIONS = ("eps", "x0", "v")
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a signed 64-bit seed

# The recipe of ``diffmath demo`` (``cli.run_demo``) and of the pixel model in
# ``latent.compare_pixel_latent``: 8x8 digits, a 0.7M-parameter U-Net, tuned to finish well
# inside 10 minutes on 2 CPU cores (README, docs/training.md). Keyword arguments of ``TrainConfig``.
DEMO_CONFIG = dict(
    data="digits",
    image_size=8,
    steps=1500,
    batch_size=128,
    lr=1e-3,
    warmup=100,
    lr_decay_steps=1500,
    channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    dropout=0.0,
    ema_decay=0.995,
    schedule="cosine",
    timesteps=1000,
    prediction="eps",
    save_every=500,
    seed=0,
)
# What ``diffmath demo`` changes in DEMO_CONFIG: a class-conditional model with label dropout
# (Ho & Salimans 2022), sampled with and without classes (README, docs/guidance.md). One label in
# three dropped and 2,000 steps keep the unconditional model (the null label) as good as the
# unconditional demo's was; p = 0.1 at 1,500 steps gave it a Fréchet distance of 2.8 (docs/guidance.md).
DEMO_CLASSES = dict(conditional=True, uncond_prob=0.3, steps=2000, lr_decay_steps=2000)


def config_from_dict(cls, d: dict, what: str):
    """``cls(**d)`` for a config dataclass, refusing keys it does not have (naming them)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what} keys {unknown}; valid keys are {sorted(names)}")
    return cls(**d)


def check_int_fields(config, names, lo: int = 1, what: str | None = None) -> None:
    """``ValueError`` naming the first field of ``names`` that is not an integer >= ``lo`` (bools
    refused), described as ``what`` (default "an integer >= lo")."""
    for name in names:
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name} must be {what or f'an integer >= {lo}'}; got {name} = {v!r}")


def int_tuple_field(config, name: str) -> tuple:
    """The list field ``name`` as a tuple of ints (a TOML/JSON list or tuple of integers); a
    ``ValueError`` naming the field otherwise (a string, a number, floats, bools)."""
    v = getattr(config, name)
    if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)) or any(
        isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in v
    ):
        raise ValueError(f"{name} must be a list of integers, e.g. [1, 2]; got {name} = {v!r}")
    return tuple(int(c) for c in v)


def check_bool_fields(config, names) -> None:
    """``ValueError`` naming the first field of ``names`` that is not a boolean (a TOML string
    "no" would otherwise read as true)."""
    for name in names:
        v = getattr(config, name)
        if not isinstance(v, (bool, np.bool_)):
            raise ValueError(f"{name} must be true or false; got {name} = {v!r}")


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in config.json).

    Model: ``channels`` (U-Net base width / MLP hidden width), ``channel_mult``,
    ``num_res_blocks``, ``attention_resolutions``, ``dropout``, ``num_heads``,
    ``mlp_depth`` (toy data), ``learn_sigma``. Diffusion: ``schedule`` (a
    ``named_schedule`` name), ``timesteps`` (T), ``prediction`` (eps | x0 | v),
    ``hybrid_lambda``. Optimisation: ``lr``, ``weight_decay``, ``warmup``, ``lr_decay_steps``
    (0 = constant after warm-up), ``grad_clip``, ``ema_decay``, ``batch_size`` (global).

    Classes (``conditional = True``; Ho & Salimans 2022): the network takes the data's class
    label through a class embedding, and each training label becomes the null class with
    probability ``uncond_prob`` (``guidance.drop_labels``), so the run learns the conditional
    and the unconditional model at once. ``num_classes`` and ``class_names`` record the data's
    classes; ``train`` fills them in from the data when they are left empty (0 and ()) and
    refuses values that disagree with it. An unconditional run (``conditional = False``) has
    none of the four keys in its config.json and checkpoints, which are therefore byte for
    byte those of a version without classes.
    """

    data: str = "digits"
    image_size: int = 8
    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: int = 100
    lr_decay_steps: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    channels: int = 32
    channel_mult: tuple = (1, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple = (4,)
    dropout: float = 0.1
    num_heads: int = 4
    mlp_depth: int = 3
    learn_sigma: bool = False
    hybrid_lambda: float = 0.001
    prediction: str = "eps"
    schedule: str = "linear"
    timesteps: int = 1000
    save_every: int = 500
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    bf16: bool = True
    progress: bool = True
    conditional: bool = False
    uncond_prob: float = 0.1
    num_classes: int = 0
    class_names: tuple = ()

    def __post_init__(self):
        self.channel_mult = int_tuple_field(self, "channel_mult")
        self.attention_resolutions = int_tuple_field(self, "attention_resolutions")
        check_bool_fields(self, ("learn_sigma", "bf16", "progress", "conditional"))
        v = self.class_names
        if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)) or not all(isinstance(c, str) for c in v):
            raise ValueError(f"class_names must be a list of strings; got class_names = {v!r}")
        self.class_names = tuple(v)
        self.validate()

    def validate(self):
        check_int_fields(self, ("steps", "batch_size", "channels", "num_res_blocks", "num_heads", "mlp_depth",
                                "save_every", "log_every"))
        check_int_fields(self, ("warmup", "lr_decay_steps", "seed"), 0)
        if self.seed > MAX_SEED:
            raise ValueError(f"seed must lie in [0, 2**63 - 1] = [0, {MAX_SEED}] (torch's seed range); got seed = {self.seed}")
        check_int_fields(self, ("timesteps",), 2)
        check_int_fields(self, ("image_size",))
        for n, lo, hi in (("lr", 0.0, math.inf), ("dropout", 0.0, 1.0), ("ema_decay", 0.0, 1.0), ("grad_clip", 0.0, math.inf)):
            v = getattr(self, n)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (lo <= v < hi) or (n == "lr" and v <= 0):
                raise ValueError(f"{n} must be a number in {'(' if n == 'lr' else '['}{lo}, {hi}); got {n} = {v!r}")
        for n in ("weight_decay", "hybrid_lambda"):
            v = getattr(self, n)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0.0 <= v < math.inf):
                raise ValueError(f"{n} must be a finite number >= 0; got {n} = {v!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}; got {self.prediction!r}")
        if self.schedule not in SCHEDULE_NAMES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULE_NAMES)}; got {self.schedule!r}")
        if self.schedule == "linear" and self.timesteps < 20:
            raise ValueError(f"the linear schedule needs timesteps >= 20 (betas scale by 1000/T); got {self.timesteps}")
        if self.prediction == "eps" and named_schedule(self.schedule, self.timesteps).alphas_cumprod[-1] == 0:
            # e.g. linear at T = 20: the last beta is 0.02 * 1000/20 = 1; x0 = (x_t - ...) / sqrt(abar_T) is undefined
            raise ValueError(
                f"the {self.schedule} schedule with timesteps = {self.timesteps} ends at alphas_cumprod = 0 (zero terminal "
                "SNR), where an eps-prediction model cannot be sampled or trained with learn_sigma; use more timesteps or "
                "prediction = v"
            )
        if not self.channel_mult or any(c < 1 for c in self.channel_mult):
            raise ValueError(f"channel_mult must be a non-empty list of positive integers; got {self.channel_mult}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda; got {self.device!r}")
        self._validate_classes()

    def _validate_classes(self):
        check_int_fields(self, ("num_classes",), 0)
        p = self.uncond_prob
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"uncond_prob (the label dropout probability) must be a number in [0, 1); got "
                             f"uncond_prob = {p!r}")
        if not self.conditional:
            given = [n for n in ("num_classes", "class_names") if getattr(self, n)]
            if given or p != CLASS_FIELDS_DEFAULTS["uncond_prob"]:
                raise ValueError(f"{', '.join(given) or 'uncond_prob'} {'is' if len(given) < 2 else 'are'} for class-"
                                 "conditional runs: set conditional = true (--conditional) or leave it out")
            return
        if self.num_classes == 1:
            raise ValueError("num_classes must be >= 2 for a class-conditional run (0: taken from the data); got "
                             "num_classes = 1")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names but num_classes = {self.num_classes}")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names must be distinct; got {list(self.class_names)}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_resolutions"] = list(self.attention_resolutions)
        if self.conditional:
            d["class_names"] = list(self.class_names)
        else:  # an unconditional run's files stay those of a version without classes
            for k in CLASS_FIELDS_DEFAULTS:
                d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return config_from_dict(cls, d, "config")

    def model_fields(self) -> dict:
        """The fields a checkpoint must agree on to be resumed (all but RESUMABLE_FIELDS; the class
        fields too, with their defaults for an unconditional run, except the classes of a
        conditional config that ``train`` has still to take from the data: num_classes = 0)."""
        d = {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in CLASS_FIELDS_DEFAULTS.items()}, **self.to_dict()}
        if self.conditional and self.num_classes == 0:
            del d["num_classes"], d["class_names"]
        return {k: v for k, v in d.items() if k not in RESUMABLE_FIELDS}


CLASS_FIELDS_DEFAULTS = {"conditional": False, "uncond_prob": 0.1, "num_classes": 0, "class_names": ()}


@dataclass
class TrainResult:
    out: Path
    step: int
    losses: list = field(default_factory=list)
    interrupted: bool = False
    checkpoint: Path | None = None
    seconds: float = 0.0
    trained_steps: int = 0


# ----------------------------------------------------------------------------- building blocks
def make_schedule(config: TrainConfig) -> Schedule:
    return named_schedule(config.schedule, config.timesteps)


def build_model(config: TrainConfig, data_shape) -> torch.nn.Module:
    """A U-Net for image data (C, H, W), an MLP for vectors (D,)."""
    from ..nn import MLPDenoiser, UNet

    data_shape = tuple(int(n) for n in data_shape)
    if len(data_shape) == 3:
        C, H, W = data_shape
        if H != W:
            raise ValueError(f"images must be square; got {H}x{W}")
        return UNet(
            in_channels=C, channels=config.channels, channel_mult=config.channel_mult,
            num_res_blocks=config.num_res_blocks, attention_resolutions=config.attention_resolutions,
            dropout=config.dropout, num_heads=config.num_heads, image_size=H, learn_sigma=config.learn_sigma,
            num_classes=config.num_classes,
        )
    if len(data_shape) == 1:
        return MLPDenoiser(
            dim=data_shape[0], hidden=config.channels * 4, depth=config.mlp_depth, learn_sigma=config.learn_sigma,
            num_classes=config.num_classes,
        )
    raise ValueError(f"data samples must have shape (C, H, W) or (D,); got {data_shape}")


def resolve_classes(config: TrainConfig, data: Data) -> TrainConfig:
    """The config of a run on ``data``: unchanged for an unconditional run; for a conditional
    one, ``num_classes`` and ``class_names`` filled in from the data's labels (``Data.class_names``).
    ``ValueError`` before any work if the data have no labels (the swiss roll; a folder that is
    not an ImageFolder layout), fewer than 2 classes, or classes other than the config's."""
    if not config.conditional:
        return config
    if data.labels_train is None or not data.class_names:
        why = data.info.get("no_labels") if isinstance(data.info, dict) else None
        raise ValueError(
            f"--conditional needs class labels, and the data {data.name!r} have none"
            + (f": {why}" if why else " (the digits, gmm and folders of class sub-folders have them)")
        )
    names = tuple(str(c) for c in data.class_names)
    K = len(names)
    if K < 2:
        raise ValueError(f"--conditional needs at least 2 classes; the data {data.name!r} have {K} ({list(names)}): "
                         "add a sub-folder per class (root/<class>/<image>)")
    labels = np.asarray(data.labels_train)
    if labels.shape != (len(data.train),) or (labels.size and (labels.min() < 0 or labels.max() >= K)):
        raise ValueError(f"the labels of {data.name!r} must be (N,) integers in [0, {K}); got shape {labels.shape}")
    if config.num_classes not in (0, K) or (config.class_names and tuple(config.class_names) != names):
        raise ValueError(f"the config names {config.num_classes} classes {list(config.class_names)} but the data "
                         f"{data.name!r} have {K}: {list(names)}")
    return dataclasses.replace(config, num_classes=K, class_names=names)


def unet_resolutions(config: TrainConfig, image_size: int) -> tuple:
    """The spatial sizes of the U-Net's levels: image_size / 2**l for each entry l of channel_mult."""
    return tuple(image_size // 2**level for level in range(len(config.channel_mult)))


def check_model_config(config: TrainConfig, data_shape, *, strict: bool = True) -> None:
    """``ValueError`` before any work if the U-Net of ``config`` cannot be built for images of
    ``data_shape`` (C, H, W) as asked: a side not divisible by its down-sampling, or an attention
    resolution it never has (the message names the ones it has). The default attention
    resolution 4, which a U-Net without a 4x4 level lacks, is dropped with a warning instead;
    ``strict=False`` (a resumed run, whose config is fixed) warns for any resolution. Vectors
    (toy data, an MLP) have no resolutions to check."""
    data_shape = tuple(int(n) for n in data_shape)
    if len(data_shape) != 3:
        return
    C, H, W = data_shape
    if H != W:
        raise ValueError(f"images must be square; got {H}x{W}")
    f = 2 ** (len(config.channel_mult) - 1)
    if H % f:
        raise ValueError(f"the U-Net down-samples by {f} (channel_mult = {list(config.channel_mult)}), so the image side "
                         f"must be divisible by {f}; got {H}x{W}. Use fewer channel_mult entries or another --image-size")
    levels = unet_resolutions(config, H)
    missing = [r for r in config.attention_resolutions if r not in levels]
    if not missing:
        return
    default = TrainConfig.__dataclass_fields__["attention_resolutions"].default
    msg = (f"attention_resolutions {list(config.attention_resolutions)}: the U-Net for {H}x{W} images with channel_mult "
           f"{list(config.channel_mult)} has the resolutions {list(levels)} only, so {missing} would never get "
           f"attention; choose among {list(levels)} (or [] for attention only in the middle block)")
    if strict and tuple(config.attention_resolutions) != tuple(default):
        raise ValueError(msg)
    import warnings

    warnings.warn(msg, UserWarning, stacklevel=3)


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit integer seed from (seed, keys...) (numpy SeedSequence hashing)."""
    ent = [int(seed)] + [k if isinstance(k, int) else int.from_bytes(hashlib.sha256(str(k).encode()).digest()[:4], "little") for k in keys]
    return int(np.random.SeedSequence(ent).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _generator(seed: int, *keys, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, *keys))
    return g


def kernels_module():
    try:
        from .. import kernels  # noqa: F401  (diffmath.kernels, the folder kernels/)
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "diffmath.kernels is not importable (the kernels/ folder is installed as diffmath.kernels); "
            f"reinstall the package: {e}"
        ) from e
    return kernels


def philox_path(x: torch.Tensor) -> bool:
    """Whether kernel calls on tensors like ``x`` take the Triton path, whose noise for element
    i is Philox draw offset + i (a shift of one stream); the torch fallback keys a fresh
    stream by (seed, offset) instead (docs/kernels.md, "Noise streams")."""
    return kernels_module().philox_active(x)


def uses_fused_noise(config: TrainConfig) -> bool:
    """eps-prediction with a fixed variance draws its noise inside the fused kernels."""
    return config.prediction == "eps" and not config.learn_sigma


def model_outputs(config: TrainConfig, out: torch.Tensor, C: int):
    """Split a network output into (prediction, variance value v or None)."""
    if config.learn_sigma:
        return out[:, :C], out[:, C:]
    return out, None


def training_loss(config, model, s, x0, t, *, seed_noise=None, offset=0, noise=None, bins=256, autocast=None,
                  shard=None, y=None):
    """The loss of one (local) batch; returns (loss, parts dict).

    ``y``: the class labels of a conditional run after label dropout (int64 (B,), the null
    class ``num_classes`` where dropped), passed to the network as ``model(x_t, t, y)``; None
    for an unconditional run (``model(x_t, t)``).

    Fused path (``uses_fused_noise``): ``kernels.q_sample`` + ``kernels.simple_loss`` keyed by
    (seed_noise, offset), ``offset`` the stream position of this batch's first element.
    Explicit path: ``noise`` given, the core builds x_t and the target.

    ``shard = (x0_global, t_global, rank, world)`` under DDP, where this rank's rows are
    ``rank*B:(rank+1)*B`` of the global batch and ``offset`` is the global batch's. On the
    Triton path the Philox stream is shifted by the offset, so the rank draws only its rows
    (offset + rank*B*D). The torch fallback keys a whole stream by (seed, offset) instead
    (docs/kernels.md), so there the rank noises the (cheap) global batch with one call and keeps
    its rows, and regenerates the loss's eps at the global shape with zero predictions outside
    its rows: either way every sample gets the noise it gets in a single-process run.
    """
    C = x0.shape[1]
    ctx = autocast if autocast is not None else contextlib.nullcontext()
    cond = () if y is None else (y,)
    if uses_fused_noise(config):
        K = kernels_module()
        if shard is None or shard[3] == 1 or philox_path(x0):
            off = offset if shard is None else offset + shard[2] * x0.numel()
            x_t = K.q_sample(s, x0, t, seed=seed_noise, offset=off)
            with ctx:
                out = model(x_t, t, *cond)
            loss = K.simple_loss(out.float(), seed_noise, off)
            return loss, {"mse": loss.detach()}
        xg, tg, r, world = shard
        B = x0.shape[0]
        x_t = K.q_sample(s, xg, tg, seed=seed_noise, offset=offset)[r * B : (r + 1) * B]
        with ctx:
            out = model(x_t, t, *cond).float()
        full = torch.cat([out.new_zeros((r * B,) + out.shape[1:]), out, out.new_zeros(((world - r - 1) * B,) + out.shape[1:])])
        loss = K.simple_loss(full, seed_noise, offset, reduction="none")[r * B : (r + 1) * B].mean()
        return loss, {"mse": loss.detach()}
    seen = {}

    def predict(x_t, t):  # the network under autocast; a learned variance's channels kept aside
        with ctx:
            out = model(x_t, t, *cond)
        seen["x_t"] = x_t
        seen["pred"], seen["v"] = model_outputs(config, out.float(), C)
        return seen["pred"]

    mse = losses.ddpm_training_loss(s, predict, x0, t, noise, prediction=config.prediction)  # DDPM Alg. 1
    x_t, pred, v = seen["x_t"], seen["pred"], seen["v"]
    if v is None:
        return mse, {"mse": mse.detach()}
    with torch.no_grad():  # stop-gradient on the mean (Improved DDPM, Sec. 3.1)
        x0_pred = x0_from_prediction(config.prediction, s, x_t, t, pred.detach())
        mean = posterior.q_posterior_mean(s, x0_pred, x_t, t)
    log_var = losses.learned_range_log_variance(s, t, v)
    vb = losses.vb_terms_bpd(s, mean, log_var, x0, x_t, t, bins=bins)
    loss = mse + config.hybrid_lambda * s.num_timesteps * vb.mean()
    return loss, {"mse": mse.detach(), "vb": vb.mean().detach()}


def x0_from_prediction(prediction: str, s, x_t, t, pred):
    if prediction == "eps":
        return parameterization.x0_from_eps(s, x_t, t, pred)
    if prediction == "x0":
        return pred
    return parameterization.x0_from_v(s, x_t, t, pred)


def eps_from_prediction(prediction: str, s, x_t, t, pred):
    if prediction == "eps":
        return pred
    if prediction == "x0":
        return parameterization.eps_from_x0(s, x_t, t, pred)
    return parameterization.eps_from_v(s, x_t, t, pred)


def lr_schedule(lr: float, warmup: int, decay_steps: int, step: int) -> float:
    """Linear warm-up over ``warmup`` steps, then constant, or a cosine decay to 0 at
    ``decay_steps`` (if > 0)."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if decay_steps:
        frac = min(1.0, step / decay_steps)
        return lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    return lr


def learning_rate(config: TrainConfig, step: int) -> float:
    """``lr_schedule`` with the run's lr, warmup and lr_decay_steps."""
    return lr_schedule(config.lr, config.warmup, config.lr_decay_steps, step)


# ----------------------------------------------------------------------------- the loop
class _StopFlag:
    def __init__(self):
        self.signum = None
        self._old = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except (ValueError, OSError):  # pragma: no cover
                pass
        return self

    def _handler(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def restore(self):
        for sig, h in self._old.items():
            signal.signal(sig, h)
        self._old = {}


@torch.no_grad()
def _ema_update(ema, model, decay: float):
    ep = list(ema.parameters())
    mp = list(model.parameters())
    torch._foreach_lerp_(ep, mp, 1.0 - decay)


def train(config: TrainConfig, out, *, resume: bool = False, overwrite: bool = False, data: Data | None = None,
          stop_after: int | None = None, trust_unverified: bool = False) -> TrainResult:
    """Train as configured, writing into ``out``; see the module docstring.

    ``resume`` continues from the latest checkpoint in ``out`` (the flags must match its
    config except ``RESUMABLE_FIELDS``); ``overwrite`` replaces a run that diffmath wrote
    (``diffmath.rundir``: only the files its marker lists are deleted). The data and the model
    configuration are checked before ``out`` is touched, and ``out`` stays locked against other
    writers until this returns. ``data`` overrides ``config.data`` (tests). ``stop_after`` stops
    (with a checkpoint) after that many steps of this call, as if interrupted.
    ``trust_unverified`` resumes from a checkpoint whose sidecar has no SHA-256.
    """
    import copy

    t_start = time.time()
    out = Path(out)
    device = resolve_device(config.device)
    dd = Dist(device)
    lock = None
    try:
        if device.type == "cuda" and dd.active:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dd.rank)) % torch.cuda.device_count())
            torch.cuda.set_device(device)
        if config.batch_size % dd.world:
            raise RunError(f"batch_size {config.batch_size} (the global batch) must be divisible by the world size {dd.world}")
        is_main = dd.rank == 0
        # --- every input is checked before the run directory is touched
        if data is None:
            data = load_data(config.data, config.image_size)
        config = resolve_classes(config, data)
        N = int(data.train.shape[0])
        Bg = config.batch_size
        B = Bg // dd.world
        if N < Bg:
            raise RunError(f"batch_size {Bg} exceeds the {N} training samples of {data.name!r}; lower --batch-size")
        check_model_config(config, data.shape, strict=not resume)
        # --- the run directory (rank 0 decides and holds its lock, the others follow)
        err, ckpt = None, None
        if is_main:
            try:
                ckpt, lock = prepare_out(out, config, resume=resume, overwrite=overwrite,
                                         trust_unverified=trust_unverified)
            except (RunError, OSError) as e:
                err = str(e)
        err, ckpt = dd.broadcast_object((err, None if ckpt is None else str(ckpt)))
        if err:
            raise RunError(err)
        # --- schedule, model
        s = make_schedule(config)
        x_all = torch.from_numpy(np.ascontiguousarray(data.train)).to(device)
        torch.manual_seed(config.seed)
        model = build_model(config, data.shape).to(device)
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        # label dropout (conditional runs): one generator, the same on every rank, drawing the
        # global batch's uniforms; its state goes into every checkpoint
        drop_gen = _generator(config.seed, "label-dropout") if config.conditional else None
        y_all = torch.from_numpy(np.asarray(data.labels_train, np.int64)).to(device) if config.conditional else None
        losses_hist: list[float] = []
        step = 0
        if ckpt is not None:
            meta, tensors = load_checkpoint(ckpt, trust_unverified=trust_unverified, keys=RESUME_KEYS)
            check_class_count(config.num_classes, tensors, repr(str(ckpt)))
            try:
                model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
                ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
                losses_hist = tensors["loss_history"].tolist()
            except (RuntimeError, KeyError) as e:
                raise RunError(f"the weights in {str(ckpt)!r} do not fit the model its config describes: {e!r}") from e
            load_optimizer(opt, meta["optimizer"], tensors, where=str(ckpt))
            step = meta["step"]
            rng = meta["rng"]
            if config.conditional:
                try:
                    drop_gen.set_state(rng_state_from_b64(rng["label_dropout"]))
                except (KeyError, TypeError, ValueError, RuntimeError) as e:
                    raise RunError(f"{str(ckpt)!r}: rng.label_dropout (the state of the label-dropout generator) is "
                                   f"missing or not a torch generator state: {e!r}") from e
            cpu_states = rng["torch_cpu"]
            if len(cpu_states) == dd.world:
                try:
                    torch.set_rng_state(rng_state_from_b64(cpu_states[dd.rank]))
                except RuntimeError as e:
                    raise RunError(f"{str(ckpt)!r}: rng.torch_cpu[{dd.rank}] is not a torch RNG state: {e}") from e
            elif is_main:
                import warnings

                warnings.warn(f"{str(ckpt)!r} was written by {len(cpu_states)} process(es) and is resumed by {dd.world}: "
                              "the dropout RNG restarts, so the continuation is not bit-identical to an unbroken run",
                              UserWarning, stacklevel=2)
            cuda_states = rng["torch_cuda"]
            if device.type == "cuda" and len(cuda_states) == dd.world and cuda_states[dd.rank]:
                torch.cuda.set_rng_state(rng_state_from_b64(cuda_states[dd.rank]), device)
            if is_main:  # the resumable fields (--steps, ...) may have changed
                write_run_config(out, config, data, model, dd.world)
        else:
            torch.manual_seed(derive_seed(config.seed, "dropout", dd.rank))
            if is_main:
                write_run_config(out, config, data, model, dd.world)
                plot_schedule(out / "schedule.png", s, config.schedule)
        net = model
        if dd.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        autocast = (
            torch.autocast(device_type="cuda", dtype=torch.bfloat16) if (device.type == "cuda" and config.bf16) else None
        )
        # --- sharding: global batches of a seeded permutation, one contiguous shard per rank
        from torch.utils.data import DistributedSampler

        spe = N // Bg  # global batches per epoch
        shard_sampler = DistributedSampler(range(spe * dd.world), num_replicas=dd.world, rank=dd.rank, shuffle=False, drop_last=True)
        shards = list(iter(shard_sampler))  # shard ids k * world + rank, k = 0 .. spe-1
        D = int(np.prod(data.shape))
        seed_noise = derive_seed(config.seed, "philox") % (2**31 - 1)
        fused = uses_fused_noise(config)
        perm_cache: dict[int, torch.Tensor] = {}

        def batch_for(step_: int):
            epoch, k = divmod(step_, spe)
            if epoch not in perm_cache:
                perm_cache.clear()
                perm_cache[epoch] = torch.randperm(N, generator=_generator(config.seed, "epoch", epoch)).to(device)
            shard = shards[k]
            kk, r = divmod(shard, dd.world)
            idx = perm_cache[epoch][kk * Bg + r * B : kk * Bg + (r + 1) * B]
            return x_all.index_select(0, idx)

        def global_batch_for(step_: int):
            epoch, k = divmod(step_, spe)
            kk = shards[k] // dd.world
            return x_all.index_select(0, perm_cache[epoch][kk * Bg : (kk + 1) * Bg])

        def labels_for(step_: int):
            """This rank's labels after dropout (Ho & Salimans 2022, Alg. 1), drawn for the global
            batch so that they do not depend on the number of processes; after ``batch_for``."""
            from ..guidance import drop_labels

            epoch, k = divmod(step_, spe)
            kk = shards[k] // dd.world
            y_g = y_all.index_select(0, perm_cache[epoch][kk * Bg : (kk + 1) * Bg])
            return drop_labels(y_g, config.uncond_prob, config.num_classes, drop_gen)[dd.rank * B : (dd.rank + 1) * B]

        stop = _StopFlag().install()
        total = config.steps
        bar = None
        if is_main and config.progress and step < total:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=step, desc="train", unit="it", dynamic_ncols=True)
        last_ckpt = Path(ckpt) if ckpt else None
        interrupted = False
        steps_this_call = 0
        model.train()
        try:
            while step < total:
                lr = learning_rate(config, step)
                for g in opt.param_groups:
                    g["lr"] = lr
                x0 = batch_for(step)
                t_global = torch.randint(0, s.num_timesteps, (Bg,), generator=_generator(config.seed, "t", step)).to(device)
                t = t_global[dd.rank * B : (dd.rank + 1) * B]
                offset = step * Bg * D  # the global batch's first Philox draw
                noise, shard = None, None
                if not fused:
                    g = _generator(config.seed, "noise", step)
                    noise = torch.randn((Bg,) + tuple(data.shape), generator=g)[dd.rank * B : (dd.rank + 1) * B].to(device)
                elif dd.world > 1:
                    shard = (global_batch_for(step), t_global, dd.rank, dd.world)
                loss, _parts = training_loss(
                    config, net, s, x0, t, seed_noise=seed_noise, offset=offset, noise=noise,
                    bins=data.bins or 256, autocast=autocast, shard=shard,
                    y=labels_for(step) if config.conditional else None,
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                opt.step()
                step += 1
                steps_this_call += 1
                _ema_update(ema, model, min(config.ema_decay, (1 + step) / (10 + step)))
                # one all-reduce carries the loss (for the log) and the stop flag
                want_stop = stop.signum is not None or (stop_after is not None and steps_this_call >= stop_after)
                red = torch.tensor([float(loss.detach()), 1.0 if want_stop else 0.0], dtype=torch.float64, device=device)
                if dd.active:
                    dd.dist.all_reduce(red)
                    red[0] /= dd.world
                lval = float(red[0])
                if not math.isfinite(lval):
                    raise FloatingPointError(
                        f"the loss became {lval} at step {step}; lower --lr (now {config.lr}) or check the data"
                    )
                losses_hist.append(lval)
                if bar is not None:
                    bar.update(1)
                    if step % config.log_every == 0 or step == total:
                        bar.set_postfix(loss=f"{np.mean(losses_hist[-config.log_every:]):.4f}", lr=f"{lr:.2e}")
                stopping = bool(red[1] > 0)
                if step % config.save_every == 0 or step == total or stopping:
                    last_ckpt = _checkpoint(out, step, config, model, ema, opt, losses_hist, dd, device, data, is_main,
                                            drop_gen)
                if stopping:
                    interrupted = True
                    break
        finally:
            stop.restore()
            if bar is not None:
                bar.close()
        if is_main and last_ckpt is not None and not (out / "loss.png").exists():
            plot_loss(out / "loss.png", losses_hist)
        return TrainResult(out, step, losses_hist, interrupted, last_ckpt, time.time() - t_start, steps_this_call)
    finally:
        if lock is not None:
            lock.release()
        dd.close()


def _checkpoint(out, step, config, model, ema, opt, losses_hist, dd, device, data, is_main, drop_gen=None):
    cpu = dd.all_gather_object(rng_state_b64(torch.get_rng_state()))
    cuda = dd.all_gather_object(rng_state_b64(torch.cuda.get_rng_state(device)) if device.type == "cuda" else "")
    digests = dd.all_gather_object(weights_digest(model))
    if len(set(digests)) != 1:  # DDP keeps replicas identical; anything else is a bug worth stopping for
        raise RuntimeError(f"the {dd.world} ranks hold different weights at step {step}: {digests}")
    path = None
    rng = {"torch_cpu": cpu, "torch_cuda": cuda, "world_size": dd.world}
    if drop_gen is not None:  # the same on every rank
        rng["label_dropout"] = rng_state_b64(drop_gen.get_state())
    if is_main:
        path = save_checkpoint(
            out, step, config, model, ema, opt, losses_hist, rng,
            extra={"data_shape": list(data.shape), "bins": data.bins, "world_size": dd.world,
                   "weights_digest": digests[0], "ranks_identical": True},
        )
        plot_loss(out / "loss.png", losses_hist)
    dd.barrier()
    return path if path is not None else out / f"{checkpoint_name(step)}.json"

