"""The configuration of a VAE training run (``VAEConfig``, stored in vae.json) and the latent
demo's VAE recipe (``VAE_DEMO_CONFIG``). ``diffmath.latent`` gives the overview.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

__all__ = ["VAEConfig", "VAE_DEMO_CONFIG"]


@dataclass
class VAEConfig:
    """A VAE training run (stored in vae.json).

    Data: ``data`` (a ``diffmath.data.load_data`` spec), ``image_size``. Model (``nn.vae.VAE``):
    ``channels``, ``channel_mult`` (down-sampling factor f = 2**(len - 1)), ``latent_channels``,
    ``num_res_blocks``. Loss: ``beta`` (the KL weight; 1 = the ELBO). Optimisation: Adam with
    ``lr``, linear warm-up over ``warmup`` steps then a cosine decay to 0 at ``steps``,
    ``batch_size``, ``grad_clip``. ``elbo_samples``: z-draws per image for the held-out ELBO.
    """

    data: str = "digits"
    image_size: int = 8
    channels: int = 16
    channel_mult: tuple = (1, 2)
    latent_channels: int = 2
    num_res_blocks: int = 1
    beta: float = 1.0
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 50
    grad_clip: float = 1.0
    elbo_samples: int = 8
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        from ..pipeline.config import MAX_SEED, check_bool_fields, check_int_fields, int_tuple_field

        self.channel_mult = int_tuple_field(self, "channel_mult")
        check_bool_fields(self, ("progress",))

        check_int_fields(
            self,
            ("image_size", "channels", "latent_channels", "num_res_blocks", "steps", "batch_size", "elbo_samples"),
            1,
            "a positive integer",
        )
        check_int_fields(self, ("warmup", "seed"), 0)
        if self.seed > MAX_SEED:
            raise ValueError(
                f"seed must lie in [0, 2**63 - 1] = [0, {MAX_SEED}] (torch's seed range); got seed = {self.seed}"
            )
        if not self.channel_mult or any(c < 1 for c in self.channel_mult):
            raise ValueError(f"channel_mult must be a non-empty list of positive integers; got {self.channel_mult}")
        for n, ok in (("beta", lambda v: v >= 0), ("lr", lambda v: v > 0), ("grad_clip", lambda v: v >= 0)):
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise ValueError(f"{n} must be a finite number {'> 0' if n == 'lr' else '>= 0'}; got {n} = {v!r}")

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def model_kwargs(self, in_channels: int) -> dict:
        return dict(
            in_channels=int(in_channels),
            image_size=self.image_size,
            channels=self.channels,
            channel_mult=self.channel_mult,
            latent_channels=self.latent_channels,
            num_res_blocks=self.num_res_blocks,
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        from ..pipeline.config import config_from_dict

        return config_from_dict(cls, d, "VAE config")


VAE_DEMO_CONFIG = dict(data="digits", image_size=8, steps=1500, batch_size=128, lr=2e-3, beta=1.0, seed=0)
