"""The configuration of a training run: ``TrainConfig`` (stored in config.json), the demo recipe,
the checks of its fields (shared with ``diffmath.latent``'s VAE config) and the seeds derived from it.

Every random draw of a run is keyed by (seed, keys...) through ``derive_seed``
(numpy ``SeedSequence`` hashing), so that nothing depends on a stateful generator's history.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..schedules import SCHEDULE_NAMES, named_schedule
from .checkpoint import RESUMABLE_FIELDS

PREDICTIONS = ("eps", "x0", "v")
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a signed 64-bit seed

# The recipe of ``diffmath demo`` (``diffmath.pipeline.demo.run_demo``) and of the pixel model in
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
    if (
        isinstance(v, (str, bytes))
        or not isinstance(v, (list, tuple))
        or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in v)
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
        check_int_fields(
            self,
            ("steps", "batch_size", "channels", "num_res_blocks", "num_heads", "mlp_depth", "save_every", "log_every"),
        )
        check_int_fields(self, ("warmup", "lr_decay_steps", "seed"), 0)
        if self.seed > MAX_SEED:
            raise ValueError(
                f"seed must lie in [0, 2**63 - 1] = [0, {MAX_SEED}] (torch's seed range); got seed = {self.seed}"
            )
        check_int_fields(self, ("timesteps",), 2)
        check_int_fields(self, ("image_size",))
        for n, lo, hi in (
            ("lr", 0.0, math.inf),
            ("dropout", 0.0, 1.0),
            ("ema_decay", 0.0, 1.0),
            ("grad_clip", 0.0, math.inf),
        ):
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
                f"the {self.schedule} schedule with timesteps = {self.timesteps} ends at alphas_cumprod = 0 "
                "(zero terminal "
                "SNR), where an eps-prediction model cannot be sampled or trained with learn_sigma; use more "
                "timesteps or "
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
            raise ValueError(
                f"uncond_prob (the label dropout probability) must be a number in [0, 1); got uncond_prob = {p!r}"
            )
        if not self.conditional:
            given = [n for n in ("num_classes", "class_names") if getattr(self, n)]
            if given or p != CLASS_FIELDS_DEFAULTS["uncond_prob"]:
                raise ValueError(
                    f"{', '.join(given) or 'uncond_prob'} {'is' if len(given) < 2 else 'are'} for class-"
                    "conditional runs: set conditional = true (--conditional) or leave it out"
                )
            return
        if self.num_classes == 1:
            raise ValueError(
                "num_classes must be >= 2 for a class-conditional run (0: taken from the data); got num_classes = 1"
            )
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
    def from_dict(cls, d: dict) -> TrainConfig:
        return config_from_dict(cls, d, "config")

    def model_fields(self) -> dict:
        """The fields a checkpoint must agree on to be resumed (all but RESUMABLE_FIELDS; the class
        fields too, with their defaults for an unconditional run, except the classes of a
        conditional config that ``train`` has still to take from the data: num_classes = 0)."""
        d = {
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in CLASS_FIELDS_DEFAULTS.items()},
            **self.to_dict(),
        }
        if self.conditional and self.num_classes == 0:
            del d["num_classes"], d["class_names"]
        return {k: v for k, v in d.items() if k not in RESUMABLE_FIELDS}


CLASS_FIELDS_DEFAULTS = {"conditional": False, "uncond_prob": 0.1, "num_classes": 0, "class_names": ()}


# ----------------------------------------------------------------------------- seeds
def derive_seed(seed: int, *keys) -> int:
    """A 63-bit integer seed from (seed, keys...) (numpy SeedSequence hashing)."""
    ent = [int(seed)] + [
        k if isinstance(k, int) else int.from_bytes(hashlib.sha256(str(k).encode()).digest()[:4], "little")
        for k in keys
    ]
    return int(np.random.SeedSequence(ent).generate_state(1, np.uint64)[0] >> np.uint64(1))


def keyed_generator(seed: int, *keys, device="cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded with ``derive_seed(seed, *keys)``."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, *keys))
    return g
