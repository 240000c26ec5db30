"""Drop-in diffusers schedulers whose arithmetic is diffmath's float64 core.

    pipe.scheduler = diffmath.integrations.diffusers.DDIMScheduler.from_config(pipe.scheduler.config)

``DDPMScheduler``, ``DDIMScheduler``, ``EulerDiscreteScheduler``,
``EulerAncestralDiscreteScheduler``, ``HeunDiscreteScheduler``, ``LMSDiscreteScheduler``,
``DPMSolverMultistepScheduler`` and ``UniPCMultistepScheduler`` are real diffusers schedulers (``SchedulerMixin``,
``ConfigMixin``, the same config keys and defaults as diffusers' classes, ``save_pretrained`` /
``from_pretrained`` / ``from_config`` in both directions, ``step`` returning diffusers' output
classes), so every pipeline that accepts diffusers' classes accepts them. What differs is
the arithmetic and, where diffusers is wrong, the rule (docs/diffusers.md has the numbers):

- The schedule is a float64 ``diffmath.schedules.Schedule`` built from the config
  (``schedule_from_config``): cancellation-free tables within 1e-13 of 50-digit mpmath
  (diffusers keeps float32 ``cumprod`` tables).
- ``step`` upcasts the model output and sample to float64 (float32 on MPS, which has no
  float64), applies the verified core functions -- ``diffmath.parameterization`` (x0 and eps
  from eps, v or x0 predictions), ``diffmath.posterior.q_posterior_mean`` on the respaced
  chain (Improved DDPM's respacing) and ``diffmath.samplers.ddpm_std`` for DDPM,
  ``diffmath.samplers.ddim_coefs`` for DDIM (DDIM eq. 12, 16) -- and casts the result to
  the dtype of ``model_output`` promoted with that of ``sample`` (what diffusers returns).
  The sigma-space classes step with the per-step functions of ``diffmath.samplers.solvers``
  that the loops ``sample_euler``, ``sample_heun``, ``sample_lms``, ``sample_dpmpp_*`` and
  ``sample_unipc`` call (``euler_step``, ``heun_predict`` / ``heun_correct``, ``lms_step``,
  ``dpmpp_2m_step``, ``unipc_predictor_step`` / ``unipc_corrector_step``, ...), so a loop
  of adapter steps is the core solver on the adapter's float64 ladder.
- Noise is drawn exactly where and how diffusers draws it
  (``diffusers.utils.torch_utils.randn_tensor`` with the caller's generator, the same shape,
  device, dtype and order), so seeded pipelines give the same images up to diffusers' own
  float32 error.
- DDIM steps from each timestep to the next one of ``self.timesteps`` and from the last to
  the final alpha_cumprod (1, or alphas_cumprod[0] with ``set_alpha_to_one=False``).
  diffusers uses ``t - num_train_timesteps // num_inference_steps``, which is wrong on
  ``linspace`` grids and on ``trailing`` grids whose step count does not divide
  ``num_train_timesteps`` (diffusers issues #11347, #12633). ``diffusers_compat=True``
  reproduces diffusers' rule (and accepts timesteps off the grid, as diffusers does).
- DDPM adds no noise on the step to t_prev = -1 (Ho et al. 2020, Alg. 2: z = 0 at the last
  step). diffusers adds noise whenever the timestep is > 0, which on ``trailing`` grids, with
  ``steps_offset`` or custom timesteps and ``variance_type="fixed_large"`` puts
  sqrt(1 - abar_t) noise on the final sample; ``diffusers_compat=True`` reproduces that. The
  noise is drawn in both cases, so the generator's stream stays diffusers'.
- Bad input gets a clear error instead of a NaN: betas outside (0, 1] (e.g. ``beta_end=2``),
  an unknown ``variance_type`` (diffusers silently falls back to ``fixed_small``), a
  timestep off the grid, a model output of the wrong shape, a negative learned variance,
  eps-prediction at zero terminal SNR (x0 is undefined there; predict v).
  ``variance_type="fixed_large_log"`` is the "large" variance beta (diffusers takes the square
  root of its logarithm and returns NaN).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_heun_discrete import HeunDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput
from diffusers.utils import torch_utils
from scipy.special import expit

from ..denoiser import preconditioning
from ..forward import q_sample
from ..losses import learned_range_log_variance
from ..parameterization import eps_from_v, eps_from_x0, v_from_x0_eps, x0_from_eps, x0_from_v
from ..posterior import q_posterior_mean
from ..samplers import ddim_coefs, ddpm_std
from ..samplers.sigmas import sigmas_beta, sigmas_exponential, sigmas_karras
from ..samplers.solvers import (
    ancestral_step,
    churn_gamma,
    churn_std,
    dpmpp_2m_step,
    dpmpp_multistep_step,
    dpmpp_sde_noise_std,
    euler_ancestral_step,
    euler_step,
    heun_correct,
    heun_predict,
    lms_coefficients,
    lms_step,
    unipc_corrector_step,
    unipc_predictor_step,
)
from ..schedules import (
    Schedule,
    betas_for_alpha_bar,
    cosine_schedule,
    linear_schedule,
    rescale_zero_terminal_snr,
    scaled_linear_schedule,
)
from ..schedules import timesteps as spaced_timesteps

__all__ = [
    "DDPMScheduler",
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "UniPCMultistepScheduler",
    "DDPMSchedulerOutput",
    "DDIMSchedulerOutput",
    "EulerDiscreteSchedulerOutput",
    "EulerAncestralDiscreteSchedulerOutput",
    "HeunDiscreteSchedulerOutput",
    "LMSDiscreteSchedulerOutput",
    "SchedulerOutput",
    "schedule_from_config",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace", "exp")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
# diffusers clamps the DDPM variance at 1e-20 before it takes logs or square roots
_DIFFUSERS_MIN_VARIANCE = 1e-20


# ----------------------------------------------------------------------------- the schedule
def _laplace_alpha_bar(u):
    """diffusers' "laplace" abar(u) = sqrt(sigmoid(lambda(u))), lambda(u) = -sign(1/2 - u)
    log(1 - 2|1/2 - u| + 1e-6) / 2 (a Laplace density of log-SNR; sigmoid(lambda) = snr/(1 + snr))."""
    c = 0.5 - u
    lam = -0.5 * np.copysign(1.0, c) * np.log1p(-2.0 * np.abs(c) + 1e-6)
    return np.sqrt(expit(lam))


def _config_value(config, key, default):
    return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)


def schedule_from_config(config) -> Schedule:
    """The float64 ``Schedule`` a diffusers DDPM/DDIM config describes (a mapping such as
    ``scheduler.config``; missing keys take diffusers' defaults):

    trained_betas        the given betas
    linear               linspace(beta_start, beta_end, T)                     (DDPM, Sec. 4)
    scaled_linear        linspace(sqrt(beta_start), sqrt(beta_end), T)^2        (Stable Diffusion)
    squaredcos_cap_v2    the cosine schedule, betas capped at 0.999            (Nichol & Dhariwal 2021, eq. 17)
    sigmoid              sigmoid(linspace(-6, 6, T)) (beta_end - beta_start) + beta_start (GeoDiff)
    laplace              ``betas_for_alpha_bar`` of diffusers' Laplace abar(u)
    exp                  abar(u) = exp(-12 u): constant betas 1 - exp(-12/T)  (diffusers' "exp")

    then ``rescale_zero_terminal_snr`` if ``rescale_betas_zero_snr`` (Lin et al. 2024, Alg. 1).
    Betas outside (0, 1] are refused (diffusers accepts them and returns NaN or garbage).
    """
    T = _config_value(config, "num_train_timesteps", 1000)
    beta_start = _config_value(config, "beta_start", 0.0001)
    beta_end = _config_value(config, "beta_end", 0.02)
    name = _config_value(config, "beta_schedule", "linear")
    trained = _config_value(config, "trained_betas", None)
    rescale = _config_value(config, "rescale_betas_zero_snr", False)
    if isinstance(T, (bool, np.bool_)) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"num_train_timesteps must be an integer >= 1; got {T!r}")
    for key, v in (("beta_start", beta_start), ("beta_end", beta_end)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{key} must be a finite number; got {v!r}")
    T = int(T)
    try:
        if trained is not None:
            what = "trained_betas"
            s = Schedule.from_betas(np.asarray(trained, dtype=np.float64).reshape(-1))
        else:
            what = f"beta_schedule={name!r} with beta_start={beta_start}, beta_end={beta_end}"
            if name == "linear":
                s = linear_schedule(T, beta_start, beta_end)
            elif name == "scaled_linear":
                s = scaled_linear_schedule(T, beta_start, beta_end)
            elif name == "squaredcos_cap_v2":
                s = cosine_schedule(T)
            elif name == "sigmoid":
                s = Schedule.from_betas(expit(np.linspace(-6.0, 6.0, T)) * (beta_end - beta_start) + beta_start)
            elif name == "laplace":
                s = Schedule.from_betas(betas_for_alpha_bar(_laplace_alpha_bar, T))
            elif name == "exp":
                # abar(u) = exp(-12 u): every beta is 1 - abar((i+1)/T)/abar(i/T) = -expm1(-12/T)
                s = Schedule.from_betas(np.full(T, min(-math.expm1(-12.0 / T), 0.999)))
            else:
                raise NotImplementedError(
                    f"{name} is not implemented for the diffmath adapter (valid: {BETA_SCHEDULES})"
                )
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{what} does not give a valid schedule: {e}. Betas must lie in (0, 1] "
            "(diffusers accepts such configs and steps with NaN or negative variances)"
        ) from e
    if rescale:
        s = rescale_zero_terminal_snr(s)
    return s


# ----------------------------------------------------------------------------- checks
def _check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _check_positive(value, name, upper=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    if upper is not None and value > upper:
        raise ValueError(f"{name} must lie in (0, {upper}]; got {value!r}")


def _as_int(value, name):
    """A python int from an int, an integral float or a one-element tensor/array."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        n = value.size if isinstance(value, np.ndarray) else value.numel()
        if n != 1:
            raise ValueError(f"{name} must be a single timestep; got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer timestep; got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(value)
    raise ValueError(f"{name} must be an integer timestep; got {value!r}")


def _compute_dtype(device) -> torch.dtype:
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def _check_tensors(model_output, sample, names=("model_output", "sample")):
    for name, x in zip(names, (model_output, sample)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")
    if model_output.device != sample.device:
        raise ValueError(f"{names[0]} is on {model_output.device} but {names[1]} is on {sample.device}")
    if sample.ndim < 1:
        raise ValueError(f"{names[1]} must have a batch dimension, shape (B, ...); got a 0-d tensor")


def _check_same_shape(model_output, sample, what="model_output"):
    if tuple(model_output.shape) != tuple(sample.shape):
        raise ValueError(f"{what} must have the shape of sample {tuple(sample.shape)}; got {tuple(model_output.shape)}")


def _check_steps_offset(so):
    if isinstance(so, bool) or not isinstance(so, numbers.Integral) or so < 0:
        raise ValueError(f"steps_offset must be an integer >= 0; got {so!r}")


def _check_sigma_flags(cfg):
    """At most one of the Karras / exponential / beta ladders (diffusers' rule)."""
    if sum(bool(cfg.get(k)) for k in ("use_beta_sigmas", "use_exponential_sigmas", "use_karras_sigmas")) > 1:
        raise ValueError(
            "Only one of `config.use_beta_sigmas`, `config.use_exponential_sigmas`, `config.use_karras_sigmas` "
            "can be used."
        )


def _as_list(values):
    """A python list from a tensor, an array or a sequence."""
    return values.tolist() if hasattr(values, "tolist") else values


def _shown(values: list) -> list:
    """At most 12 of ``values`` for an error message (the first and last six)."""
    return values if len(values) <= 12 else values[:6] + ["..."] + values[-6:]


def _broadcast(values, like: torch.Tensor, cd):
    """The per-sample float64 ``values`` as a tensor of dtype ``cd`` on ``like``'s device,
    broadcastable against ``like`` (trailing singleton dimensions)."""
    out = torch.tensor(values, dtype=cd, device=like.device)
    while out.ndim < like.ndim:
        out = out.unsqueeze(-1)
    return out


def _check_set(scheduler):
    if scheduler.num_inference_steps is None:
        raise ValueError(
            "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
        )


def _dynamic_threshold(x0, ratio: float, max_value: float):
    """Dynamic thresholding (Saharia et al. 2022, "Imagen", Sec. 2.3): per sample,
    s = clamp(quantile(|x0|, ratio), 1, max_value) and x0 <- clamp(x0, -s, s) / s. The
    quantile is the linear interpolation between order statistics (Hyndman & Fan type 7,
    torch.quantile's default), over all non-batch dimensions; computed by sorting, so any
    size works (torch.quantile refuses inputs above 2^24 elements)."""
    B = x0.shape[0]
    flat = x0.reshape(B, -1)
    srt = flat.abs().sort(dim=1).values
    n = srt.shape[1]
    pos = ratio * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    w = pos - lo
    q = srt[:, lo] + w * (srt[:, hi] - srt[:, lo])
    s = q.clamp(min=1.0).clamp(max=max_value).unsqueeze(1)
    return (torch.maximum(torch.minimum(flat, s), -s) / s).reshape(x0.shape)


# ----------------------------------------------------------------------------- shared base
class _DiffmathScheduler(SchedulerMixin, ConfigMixin):
    """What DDPM and DDIM share: the float64 schedule, the inference grid, x0/eps from the
    model output, clipping/thresholding, ``add_noise`` and ``get_velocity``."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    def _setup(self):
        c = self.config
        if c.trained_betas is None:
            if c.beta_schedule not in BETA_SCHEDULES:
                raise NotImplementedError(f"{c.beta_schedule} is not implemented for {self.__class__}")
        _check_choice(c.prediction_type, "prediction_type", PREDICTION_TYPES)
        _check_choice(c.timestep_spacing, "timestep_spacing", TIMESTEP_SPACINGS)
        _check_positive(c.clip_sample_range, "clip_sample_range")
        _check_positive(c.dynamic_thresholding_ratio, "dynamic_thresholding_ratio", upper=1.0)
        _check_positive(c.sample_max_value, "sample_max_value")
        _check_steps_offset(c.steps_offset)
        if not isinstance(c.diffusers_compat, (bool, np.bool_)):
            raise TypeError(f"diffusers_compat must be True or False; got {c.diffusers_compat!r}")
        self.schedule = schedule_from_config(c)
        s = self.schedule
        # diffusers' public tables, float32 as diffusers keeps them (so code that mixes them
        # with fp16 latents keeps its dtypes) but correctly rounded from the float64 tables;
        # the arithmetic below reads the float64 ``self.schedule``.
        self.betas = torch.from_numpy(s.betas.astype(np.float32))
        self.alphas = torch.from_numpy(s.alphas.astype(np.float32))
        self.alphas_cumprod = torch.from_numpy(s.alphas_cumprod.astype(np.float32))
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.custom_timesteps = False
        self._grid = None  # the inference timesteps (int64, descending) once set_timesteps ran
        self._grid_pos = {}
        self.timesteps = torch.from_numpy(np.arange(0, c.num_train_timesteps)[::-1].copy().astype(np.int64))

    # -- grid ----------------------------------------------------------------------------
    def _check_length(self):
        T, n = self.config.num_train_timesteps, self.schedule.num_timesteps
        if T != n:
            raise ValueError(
                f"the schedule has {n} betas (trained_betas) but num_train_timesteps = {T}; "
                f"pass num_train_timesteps={n} with these trained_betas"
            )

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None):
        """The inference grid (descending): ``timesteps(T, num_inference_steps, spacing)`` --
        leading = arange(S) (T // S) + steps_offset, trailing = round(arange(T, 0, -T/S)) - 1,
        linspace = round(linspace(0, T - 1, S)) -- or custom ``timesteps`` (strictly
        descending integers in [0, T)); moved to ``device``."""
        self._check_length()
        T = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if timesteps is not None:
            ts = [_as_int(v, "timesteps") for v in _as_list(timesteps)]
            if not ts:
                raise ValueError("`timesteps` must hold at least one timestep; got an empty list")
            for i in range(1, len(ts)):
                if ts[i] >= ts[i - 1]:
                    raise ValueError("`custom_timesteps` must be in descending order.")
            if ts[0] >= T:
                raise ValueError(f"`timesteps` must start before `self.config.train_timesteps`: {T}.")
            if ts[-1] < 0:
                raise ValueError(f"`timesteps` must be >= 0; got {ts[-1]}")
            grid = np.asarray(ts, dtype=np.int64)
            self.custom_timesteps = True
        else:
            if num_inference_steps is None:
                raise ValueError("set_timesteps needs `num_inference_steps` or `timesteps`")
            S = _as_int(num_inference_steps, "num_inference_steps")
            if S > T:
                raise ValueError(
                    f"`num_inference_steps`: {S} cannot be larger than `self.config.train_timesteps`:"
                    f" {T} as the unet model trained with this scheduler can only handle"
                    f" maximal {T} timesteps."
                )
            if S < 1:
                raise ValueError(f"`num_inference_steps` must be >= 1; got {S}")
            grid = spaced_timesteps(T, S, self.config.timestep_spacing).copy()
            if self.config.timestep_spacing == "leading":
                grid += self.config.steps_offset
                if grid[0] >= T:
                    raise ValueError(
                        f"steps_offset = {self.config.steps_offset} moves the first timestep to {int(grid[0])}, "
                        f"outside [0, {T}); use fewer steps or a smaller offset"
                    )
            self.custom_timesteps = False
        self.num_inference_steps = int(grid.shape[0])
        self._grid = grid
        self._grid_pos = {int(t): i for i, t in enumerate(grid.tolist())}
        self.timesteps = torch.from_numpy(grid.copy()).to(device)
        self._on_new_grid()

    def _on_new_grid(self):
        pass

    def _grid_index(self, t: int) -> int:
        try:
            return self._grid_pos[t]
        except KeyError:
            raise ValueError(
                f"timestep {t} is not on the inference grid set by set_timesteps ({_shown(self._grid.tolist())}); "
                "step at the timesteps of `scheduler.timesteps`"
            ) from None

    def _grid_previous(self, t: int) -> int:
        """The next element of the grid after ``t``, or -1 after the last."""
        i = self._grid_index(t)
        return int(self._grid[i + 1]) if i + 1 < self._grid.shape[0] else -1

    def _check_train_t(self, t: int, name="timestep"):
        T = self.schedule.num_timesteps
        if not 0 <= t < T:
            raise ValueError(f"{name} must lie in [0, {T}); got {t}")

    # -- model output --------------------------------------------------------------------
    def _x0_eps(self, m, x, t: int, need_eps: bool):
        """x0 and eps from the model output m at step t (float64 tensors):
        epsilon: x0 = x/sqrt(abar) - sqrt(1/abar - 1) m   (DDPM eq. 15)
        v:       x0 = sqrt(abar) x - sqrt(1 - abar) m, eps = sqrt(abar) m + sqrt(1 - abar) x
        sample:  x0 = m, eps = (x - sqrt(abar) m) / sqrt(1 - abar)     (Salimans & Ho 2022)."""
        s, p = self.schedule, self.config.prediction_type
        if p == "epsilon":
            return x0_from_eps(s, x, t, m), m
        if p == "v_prediction":
            return x0_from_v(s, x, t, m), (eps_from_v(s, x, t, m) if need_eps else None)
        return m, (eps_from_x0(s, x, t, m) if need_eps else None)

    def _process_x0(self, x0):
        c = self.config
        if c.thresholding:
            return _dynamic_threshold(x0, float(c.dynamic_thresholding_ratio), float(c.sample_max_value))
        if c.clip_sample:
            r = float(c.clip_sample_range)
            return x0.clamp(-r, r)
        return x0

    # -- forward process -----------------------------------------------------------------
    def _train_timesteps(self, timesteps, like):
        """Timesteps for add_noise/get_velocity as python int or an int64 tensor of shape
        (B,) on ``like``'s device (a single timestep broadcasts over the batch, as in diffusers)."""
        if isinstance(timesteps, torch.Tensor):
            if timesteps.is_floating_point() or timesteps.is_complex() or timesteps.dtype == torch.bool:
                raise TypeError(f"timesteps must be an integer tensor; got dtype {timesteps.dtype}")
            flat = timesteps.reshape(-1).to(device=like.device, dtype=torch.long)
        else:
            flat = torch.as_tensor(np.asarray(timesteps).reshape(-1))
            if flat.is_floating_point() or flat.dtype == torch.bool:
                raise TypeError(f"timesteps must be integers; got {timesteps!r}")
            flat = flat.to(device=like.device, dtype=torch.long)
        if flat.numel() == 1:
            return int(flat.item())
        if like.ndim < 1 or flat.numel() != like.shape[0]:
            raise ValueError(
                f"timesteps must hold one value or one per sample ({like.shape[0] if like.ndim else 0}); "
                f"got {flat.numel()}"
            )
        return flat

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps   (DDPM eq. 4), float64, in the
        samples' dtype (``diffmath.forward.q_sample``)."""
        _check_tensors(noise, original_samples, ("noise", "original_samples"))
        _check_same_shape(noise, original_samples, "noise")
        self._check_length()
        t = self._train_timesteps(timesteps, original_samples)
        cd = _compute_dtype(original_samples.device)
        out = q_sample(self.schedule, original_samples.to(cd), t, noise.to(cd))
        return out.to(original_samples.dtype)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0   (Salimans & Ho 2022, Sec. 4), float64,
        in the sample's dtype (``diffmath.parameterization.v_from_x0_eps``)."""
        _check_tensors(noise, sample, ("noise", "sample"))
        _check_same_shape(noise, sample, "noise")
        self._check_length()
        t = self._train_timesteps(timesteps, sample)
        cd = _compute_dtype(sample.device)
        return v_from_x0_eps(self.schedule, t, sample.to(cd), noise.to(cd)).to(sample.dtype)

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """The identity (DDPM and DDIM feed x_t to the model unscaled)."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps


# ----------------------------------------------------------------------------- DDPM
class DDPMScheduler(_DiffmathScheduler):
    """diffusers' ``DDPMScheduler`` (same config, same API) on diffmath's float64 arithmetic.

    One step from t to the next grid timestep t' (t' = -1 after the last), on the respaced
    chain abar'_j = abar[grid_j] (Improved DDPM, Sec. 4; ``Schedule.respace``):

        x0     from the model output (``prediction_type``), then thresholded or clipped
        mean   = coef1 x0 + coef2 x_t              (DDPM eq. 7: ``q_posterior_mean``)
        x_{t'} = mean + std * z,  z = randn_tensor(..., generator)  drawn when t > 0
        std    = sqrt(beta_tilde) (fixed_small[_log]), sqrt(beta') (fixed_large[_log]),
                 sqrt(predicted variance) (learned), exp(log var / 2) with Improved DDPM's
                 eq. 15 interpolation (learned_range), and 0 on the step to t' = -1.

    Without ``set_timesteps`` the grid is every training step (t' = t - 1), as in diffusers.
    ``diffusers_compat=True`` adds diffusers' noise on the last step when its timestep is > 0.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        diffusers_compat: bool = False,
    ):
        _check_choice(variance_type, "variance_type", VARIANCE_TYPES)
        self._setup()
        self.one = torch.tensor(1.0)
        self.variance_type = variance_type
        self._chain = self.schedule  # the (respaced) chain the steps run on

    def _on_new_grid(self):
        self._chain = self.schedule.respace(self._grid)

    def _position(self, t: int):
        """(t_prev, j): the previous timestep and t's index in the chain ``self._chain``."""
        if self._grid is None:
            self._check_length()
            self._check_train_t(t)
            return t - 1, t
        prev = self._grid_previous(t)
        return prev, int(np.searchsorted(self._chain.timestep_map, t))

    def previous_timestep(self, timestep):
        """The timestep the step from ``timestep`` goes to (-1 after the last)."""
        t = _as_int(timestep, "timestep")
        if self._grid is None:
            return timestep - 1
        return torch.tensor(self._grid_previous(t))

    def _get_variance(self, t, predicted_variance=None, variance_type=None):
        """diffusers' private ``_get_variance`` (same meaning per variance type: the variance,
        its square root for fixed_small_log, log beta' for fixed_large_log, the log variance
        for learned_range), from the float64 chain; float32 like diffusers'."""
        t = _as_int(t, "t")
        _, j = self._position(t)
        ch = self._chain
        var = max(float(ch.posterior_variance[j]), _DIFFUSERS_MIN_VARIANCE)
        beta = float(ch.betas[j])
        vt = variance_type or self.variance_type
        if vt == "learned":
            return predicted_variance
        if vt == "learned_range":
            frac = (predicted_variance + 1) / 2
            return frac * math.log(beta) + (1 - frac) * math.log(var)
        value = {
            "fixed_small": var,
            "fixed_small_log": math.sqrt(var),
            "fixed_large": beta,
            "fixed_large_log": math.log(beta),
        }[vt]
        return torch.tensor(value, dtype=torch.float32)

    def _std(self, j: int, t: int, predicted_variance, cd):
        """The noise std of the step at chain index j (None: no noise)."""
        vt, ch = self.variance_type, self._chain
        if j == 0:  # the step to t' = -1
            if not (self.config.diffusers_compat and t > 0):
                return None
            # diffusers' last step: abar_prev = 1, so beta_tilde = 0 (clamped to 1e-20) and beta' = 1 - abar_t
            beta = float(ch.betas[0])
            if vt in ("fixed_small", "fixed_small_log"):
                return math.sqrt(_DIFFUSERS_MIN_VARIANCE)
            if vt in ("fixed_large", "fixed_large_log"):
                return math.sqrt(beta)
            if vt == "learned_range":
                frac = (predicted_variance.to(cd) + 1) / 2
                return torch.exp(0.5 * (frac * math.log(beta) + (1 - frac) * math.log(_DIFFUSERS_MIN_VARIANCE)))
        if vt in ("fixed_small", "fixed_small_log"):
            return float(ddpm_std(ch, "small")[j])
        if vt in ("fixed_large", "fixed_large_log"):
            return float(ddpm_std(ch, "large")[j])
        if vt == "learned":
            pv = predicted_variance.to(cd)
            if bool((pv < 0).any()):
                raise ValueError(
                    f"variance_type='learned' reads the model's second half of channels as a variance; "
                    f"got a negative value {float(pv.min())} (diffusers would return NaN)"
                )
            return pv.sqrt()
        return torch.exp(0.5 * learned_range_log_variance(ch, j, predicted_variance.to(cd)))

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> DDPMSchedulerOutput | tuple:
        """One DDPM step x_t -> x_{t'} (see the class docstring). ``model_output`` holds the
        prediction (and, for learned variances, the variance in a second half of channels).
        Returns ``DDPMSchedulerOutput(prev_sample, pred_original_sample)`` or that tuple."""
        t = _as_int(timestep, "timestep")
        _check_tensors(model_output, sample)
        predicted_variance = None
        if self.variance_type in ("learned", "learned_range"):
            C = sample.shape[1] if sample.ndim > 1 else None
            if C is None or tuple(model_output.shape) != (sample.shape[0], 2 * C, *sample.shape[2:]):
                raise ValueError(
                    f"variance_type={self.variance_type!r} needs a model output of twice the sample's channels "
                    f"(prediction, variance) for sample {tuple(sample.shape)}; got {tuple(model_output.shape)}"
                )
            model_output, predicted_variance = torch.split(model_output, C, dim=1)
        else:
            _check_same_shape(model_output, sample)
        _, j = self._position(t)
        cd = _compute_dtype(sample.device)
        x, m = sample.to(cd), model_output.to(cd)
        x0, _ = self._x0_eps(m, x, t, need_eps=False)
        x0 = self._process_x0(x0)
        prev = q_posterior_mean(self._chain, x0, x, j)
        if t > 0:  # where diffusers draws its noise
            noise = torch_utils.randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
            std = self._std(j, t, predicted_variance, cd)
            if std is not None:
                prev = prev + std * noise.to(cd)
        out_dtype = torch.promote_types(model_output.dtype, sample.dtype)
        prev, x0 = prev.to(out_dtype), x0.to(out_dtype)
        if not return_dict:
            return (prev, x0)
        return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


# ----------------------------------------------------------------------------- DDIM
class DDIMScheduler(_DiffmathScheduler):
    """diffusers' ``DDIMScheduler`` (same config, same API) on diffmath's float64 arithmetic.

    One step from t to t' (DDIM eq. 12, sigma from eq. 16; ``diffmath.samplers.ddim_coefs``):

        x0, eps from the model output (``prediction_type``); x0 thresholded or clipped, and eps
                 re-derived from the clipped x0 with ``use_clipped_model_output``
        x_{t'} = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z
        sigma  = eta sqrt((1 - abar')/(1 - abar_t)) sqrt(1 - abar_t/abar')

    t' is the next timestep of ``self.timesteps``; after the last one abar' is the final
    alpha_cumprod (1 with ``set_alpha_to_one``, else alphas_cumprod[0]). With
    ``diffusers_compat=True``, t' = t - num_train_timesteps // num_inference_steps as in
    diffusers (wrong on linspace and non-divisible trailing grids; any t is accepted).
    ``set_timesteps`` also takes custom ``timesteps`` (diffusers' DDIM does not).
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        diffusers_compat: bool = False,
    ):
        self._setup()
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

    def _previous(self, t: int) -> int:
        _check_set(self)
        if self.config.diffusers_compat and not self.custom_timesteps:
            self._check_train_t(t)
            return t - self.config.num_train_timesteps // self.num_inference_steps
        return self._grid_previous(t)

    def previous_timestep(self, timestep):
        """The timestep the step from ``timestep`` goes to (negative: the final alpha_cumprod)."""
        return torch.tensor(self._previous(_as_int(timestep, "timestep")))

    def _coefs(self, t: int, t_prev: int, eta: float):
        """(sqrt(abar'), sqrt(1 - abar' - sigma^2), sigma) as python floats, t_prev < 0 meaning
        the final alpha_cumprod."""
        s = self.schedule
        if t_prev < 0:
            t_prev = -1 if self.config.set_alpha_to_one else 0
        if t_prev == t:  # the final step from t = 0 to abar' = abar_0: the identity chain
            return float(s.sqrt_alphas_cumprod[0]), float(s.sqrt_one_minus_alphas_cumprod[0]), 0.0
        if t_prev > t:
            raise ValueError(f"prev_timestep must be < timestep (DDIM steps backward); got {t_prev} >= {t}")
        return tuple(float(c) for c in ddim_coefs(s, t, t_prev, eta))

    def _get_variance(self, timestep, prev_timestep):
        """diffusers' private ``_get_variance``: (1 - abar')/(1 - abar_t) (1 - abar_t/abar'),
        the DDIM sigma^2 at eta = 1, from the float64 tables; float32 like diffusers'."""
        t, tp = _as_int(timestep, "timestep"), _as_int(prev_timestep, "prev_timestep")
        self._check_train_t(t)
        return torch.tensor(self._coefs(t, tp, 1.0)[2] ** 2, dtype=torch.float32)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple:
        """One DDIM step x_t -> x_{t'} (see the class docstring). ``variance_noise`` replaces
        the draw from ``generator`` (not both). Returns
        ``DDIMSchedulerOutput(prev_sample, pred_original_sample)`` or that tuple."""
        t = _as_int(timestep, "timestep")
        t_prev = self._previous(t)
        if isinstance(eta, torch.Tensor):
            eta = eta.item()
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not (math.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0 (0 = DDIM, 1 = DDPM's variance); got {eta!r}")
        eta = float(eta)
        _check_tensors(model_output, sample)
        _check_same_shape(model_output, sample)
        a_prev, c_eps, sigma = self._coefs(t, t_prev, eta)
        cd = _compute_dtype(sample.device)
        x, m = sample.to(cd), model_output.to(cd)
        x0, eps = self._x0_eps(m, x, t, need_eps=True)
        x0 = self._process_x0(x0)
        if use_clipped_model_output:  # eps re-derived from the clipped x0, as in GLIDE
            eps = eps_from_x0(self.schedule, x, t, x0)
        prev = a_prev * x0 + c_eps * eps
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError(
                    "Cannot pass both generator and variance_noise. Please make sure that either `generator` or"
                    " `variance_noise` stays `None`."
                )
            if variance_noise is None:
                variance_noise = torch_utils.randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
            else:
                _check_tensors(variance_noise, sample, ("variance_noise", "sample"))
                _check_same_shape(variance_noise, sample, "variance_noise")
            prev = prev + sigma * variance_noise.to(cd)
        out_dtype = torch.promote_types(model_output.dtype, sample.dtype)
        prev, x0 = prev.to(out_dtype), x0.to(out_dtype)
        if not return_dict:
            return (prev, x0)
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


# ----------------------------------------------------------------------------- sigma-space schedulers
SIGMA_SPACINGS = ("linspace", "leading", "trailing")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
# diffusers' sigma-space schedulers replace alphas_cumprod = 0 (rescale_betas_zero_snr) by 2^-24
# at the last training step so that its sigma is finite: sqrt(2^24 - 1) = 4096.0
_ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


def _float_or_none(v, name):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be None or a finite number > 0; got {v!r}")
    return float(v)


class _SigmaScheduler(SchedulerMixin, ConfigMixin):
    """What the sigma-space schedulers (Euler, Euler ancestral, Heun, LMS, DPM-Solver++, UniPC)
    share: the float64 ladder sigma_i of x = x_t / sqrt(abar_t) = x_0 + sigma eps (EDM's VP
    view, sigma_t = sqrt((1 - abar_t)/abar_t), ``diffmath.denoiser``), diffusers' step-index
    bookkeeping, ``scale_model_input`` and ``add_noise``.

    The ladder: at the inference timesteps (float, diffusers' spacing rules) sigma is the linear
    interpolation of the float64 table sigma_t in t (diffusers' ``interpolation_type="linear"``),
    or the Karras / exponential / beta ladder (``diffmath.samplers.sigmas_*``) between the
    table's ends with timesteps t(sigma) interpolated linearly in log sigma
    (``diffmath.denoiser.sigma_to_t_schedule``); then the final sigma (0, or sigma_0 with
    ``final_sigmas_type="sigma_min"``). ``self.sigmas`` is that ladder in float32 (as in
    diffusers); the steps read the float64 ``self._sig``.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    _has_sigma_options = True  # use_karras_sigmas & co. in the config

    def _setup_sigmas(self):
        c = self.config
        if c.trained_betas is None and c.beta_schedule not in BETA_SCHEDULES:
            raise NotImplementedError(f"{c.beta_schedule} is not implemented for {self.__class__}")
        _check_choice(c.prediction_type, "prediction_type", self._prediction_types)
        _check_choice(c.timestep_spacing, "timestep_spacing", SIGMA_SPACINGS)
        _check_steps_offset(c.steps_offset)
        cfg = dict(c)
        if self._has_sigma_options:
            _check_sigma_flags(cfg)
        _check_choice(cfg.get("final_sigmas_type", "zero"), "final_sigmas_type", FINAL_SIGMAS_TYPES)
        _float_or_none(cfg.get("sigma_min"), "sigma_min")
        _float_or_none(cfg.get("sigma_max"), "sigma_max")
        self.schedule = schedule_from_config(c)
        s = self.schedule
        self.betas = torch.from_numpy(s.betas.astype(np.float32))
        self.alphas = torch.from_numpy(s.alphas.astype(np.float32))
        abar = np.array(s.alphas_cumprod, dtype=np.float64)
        tab = np.array(s.sqrt_recipm1_alphas_cumprod, dtype=np.float64)
        if abar[-1] == 0:  # zero terminal SNR: diffusers' finite stand-in
            abar[-1] = _ZERO_SNR_ALPHA_CUMPROD
            tab[-1] = math.sqrt(1.0 / _ZERO_SNR_ALPHA_CUMPROD - 1.0)
        self.alphas_cumprod = torch.from_numpy(abar.astype(np.float32))
        self._abar = abar
        self._tab = tab  # sigma_t, float64, increasing in t
        self.num_inference_steps = None
        T = c.num_train_timesteps
        self._timesteps_np = np.arange(T - 1, -1, -1, dtype=np.float64)
        self._set_ladder(tab[::-1].copy(), 0.0, self._timesteps_np)
        self.is_scale_input_called = False
        self._step_index = None
        self._begin_index = None

    def _set_ladder(self, sig, last, ts, device=None):
        self._sig = np.concatenate([np.asarray(sig, dtype=np.float64), [float(last)]])
        self.sigmas = torch.from_numpy(self._sig.astype(np.float32))
        self._ts = np.asarray(ts, dtype=np.float64)
        self.timesteps = torch.from_numpy(self._ts.astype(np.float32)).to(device)

    # -- the ladder ------------------------------------------------------------------------
    def _spaced(self, S: int) -> np.ndarray:
        """diffusers' float timesteps (descending) for S steps."""
        c, T = self.config, self.config.num_train_timesteps
        if c.timestep_spacing == "linspace":
            return np.linspace(0, T - 1, S, dtype=np.float32)[::-1].astype(np.float64)
        if c.timestep_spacing == "leading":
            ratio = T // S
            return (np.arange(0, S) * ratio)[::-1].astype(np.float64) + c.steps_offset
        ratio = T / S
        return np.round(np.arange(T, 0, -ratio)) - 1.0

    def _sigma_at(self, ts: np.ndarray) -> np.ndarray:
        """sigma at float timesteps: linear interpolation of the float64 table in t."""
        T = self._tab.shape[0]
        if np.any(ts < 0) or np.any(ts > T - 1):
            raise ValueError(f"timesteps must lie in [0, {T - 1}]; got {ts.min()} .. {ts.max()}")
        return np.interp(ts, np.arange(T, dtype=np.float64), self._tab)

    def _t_of_sigma(self, sig: np.ndarray) -> np.ndarray:
        """t(sigma): linear in log sigma between the table's indices (clamped to [0, T - 1])."""
        return np.interp(
            np.log(np.maximum(sig, 1e-300)), np.log(self._tab), np.arange(self._tab.shape[0], dtype=np.float64)
        )

    def _converted(self, sig: np.ndarray, S: int) -> np.ndarray | None:
        """The Karras / exponential / beta ladder between the ends of ``sig`` (or the config's
        sigma_min / sigma_max), without the final 0; None when none is configured."""
        cfg = dict(self.config)
        smin = cfg.get("sigma_min") or float(sig[-1])
        smax = cfg.get("sigma_max") or float(sig[0])
        if cfg.get("use_karras_sigmas"):
            return _ladder(sigmas_karras, S, smin, smax)
        if cfg.get("use_exponential_sigmas"):
            return _ladder(sigmas_exponential, S, smin, smax)
        if cfg.get("use_beta_sigmas"):
            return _ladder(sigmas_beta, S, smin, smax)
        return None

    def _last_sigma(self) -> float:
        return float(self._tab[0]) if dict(self.config).get("final_sigmas_type", "zero") == "sigma_min" else 0.0

    def _check_steps(self, S, name="num_inference_steps"):
        S = _as_int(S, name)
        if S < 1:
            raise ValueError(f"`{name}` must be >= 1; got {S}")
        return S

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None):
        """The inference ladder (see the class docstring); ``timesteps`` (float model times) or
        ``sigmas`` (a ladder including its final value) replace the spacing rule."""
        given = sum(v is not None for v in (num_inference_steps, timesteps, sigmas))
        if timesteps is not None and sigmas is not None:
            raise ValueError("Only one of `timesteps` or `sigmas` should be set.")
        if given == 0:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `timesteps` or `sigmas.")
        if given > 1:
            raise ValueError("Can only pass one of `num_inference_steps` or `timesteps` or `sigmas`.")
        cfg = dict(self.config)
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            if timesteps is not None and cfg.get(key):
                raise ValueError(f"Cannot set `timesteps` with `config.{key} = True`.")
        if sigmas is not None:
            sig = np.asarray(_as_list(sigmas), dtype=np.float64).reshape(-1)
            if sig.size < 2 or not np.all(np.isfinite(sig)) or np.any(sig < 0) or np.any(sig[:-1] <= 0):
                raise ValueError(f"`sigmas` must hold >= 2 finite values > 0 (the last may be 0); got {sig.tolist()}")
            ts = self._t_of_sigma(sig[:-1])
            self.num_inference_steps = sig.size - 1
            self._finish(sig[:-1], float(sig[-1]), ts, device)
            return
        if timesteps is not None:
            ts = np.asarray(_as_list(timesteps), dtype=np.float64).reshape(-1)
            if ts.size < 1 or np.any(np.diff(ts) >= 0):
                raise ValueError(f"`timesteps` must be strictly descending; got {ts.tolist()}")
            S = ts.size
        else:
            S = self._check_steps(num_inference_steps)
            if S > self.config.num_train_timesteps and self.config.timestep_spacing != "linspace":
                raise ValueError(
                    f"`num_inference_steps`: {S} cannot be larger than `num_train_timesteps`: "
                    f"{self.config.num_train_timesteps}"
                )
            ts = self._spaced(S)
        self.num_inference_steps = S
        sig = self._sigma_at(ts)
        if dict(self.config).get("interpolation_type", "linear") == "log_linear":
            # diffusers' rule: S + 1 levels uniform in log sigma over the whole table (one more
            # level than timesteps, so the loop ends at sigma_min, not at the final sigma)
            sig = sigmas_exponential(S + 1, float(self._tab[0]), float(self._tab[-1]))[:-1]
        conv = self._converted(sig, S)
        if conv is not None:
            sig = conv
            ts = self._t_of_sigma(sig)
        self._finish(sig, self._last_sigma(), ts, device)

    def _finish(self, sig, last, ts, device):
        if dict(self.config).get("timestep_type") == "continuous" and self.config.prediction_type == "v_prediction":
            ts = 0.25 * np.log(sig)
        self._set_ladder(sig, last, ts, device)
        self._step_index = None
        self._begin_index = None
        self._on_new_ladder()

    def _on_new_ladder(self):
        pass

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """The std of the initial noise: sigma_max (linspace, trailing) or sqrt(sigma_max^2 + 1)
        (leading), as in diffusers; a 0-d float64 tensor (multiplying a float32 latent by it
        keeps float32)."""
        smax = float(self._sig.max())
        if self.config.timestep_spacing not in ("linspace", "trailing"):
            smax = math.sqrt(smax * smax + 1.0)
        return torch.tensor(smax, dtype=torch.float64)

    # -- diffusers' step-index bookkeeping ---------------------------------------------------
    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """The index of ``timestep`` in the timesteps (the second match if it occurs twice, as
        in diffusers, for image-to-image starts)."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(
                f"timestep {timestep} is not one of the scheduler's timesteps ({_shown(schedule_timesteps.tolist())})"
            )
        return indices[1 if len(indices) > 1 else 0].item()

    def _init_step_index(self, timestep):
        if self.begin_index is None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _check_step_timestep(self, timestep):
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError(
                (
                    "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to"
                    f" `{self.__class__.__name__}.step()` is not supported. Make sure to pass"
                    " one of the `scheduler.timesteps` as a timestep."
                ),
            )

    def _start_step(self, model_output, sample, timestep, check_end=False, warn_unscaled=False):
        """Check a step's tensors, find its ladder index (diffusers' bookkeeping) and return it."""
        _check_tensors(model_output, sample)
        _check_same_shape(model_output, sample)
        if warn_unscaled and not self.is_scale_input_called:
            warnings.warn(
                "The `scale_model_input` function should be called before `step` to ensure correct denoising. "
                "See `StableDiffusionPipeline` for a usage example.",
                stacklevel=3,
            )
        if self.step_index is None:
            self._init_step_index(timestep)
        i = self.step_index
        if check_end and i >= len(self.timesteps):
            raise ValueError(
                f"step called {i + 1} times on a ladder of {len(self.timesteps)} timesteps; call set_timesteps again"
            )
        return i

    def _end_step(self, prev, den, model_output, output_cls, return_dict):
        """Advance the step index and return diffusers' output: prev in the model output's
        dtype, the denoised value in it promoted with float32."""
        self._step_index += 1
        prev = prev.to(model_output.dtype)
        den = den.to(torch.promote_types(model_output.dtype, torch.float32))
        if not return_dict:
            return (prev, den)
        return output_cls(prev_sample=prev, pred_original_sample=den)

    # -- model input / output ----------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """x_t = x / sqrt(sigma^2 + 1) (the VP model's input at this level; float64, in the
        sample's dtype)."""
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = float(self._sig[self.step_index])
        self.is_scale_input_called = True
        cd = _compute_dtype(sample.device)
        return (sample.to(cd) / math.sqrt(sigma * sigma + 1.0)).to(sample.dtype)

    def _denoised(self, model_output, x, sigma: float, sigma_v: float | None = None):
        """D(x; sigma) = c_skip x + c_out F from the model output (``diffmath.denoiser.preconditioning``
        with m = 1/sqrt(1 + sigma^2)): eps: x - sigma eps; v: x/(1 + sigma^2) - sigma/sqrt(1 + sigma^2) v;
        sample: F. ``sigma_v``: the sigma of the v-formula where diffusers uses another one."""
        p = self.config.prediction_type
        if p == "v_prediction" and sigma_v is not None:
            sigma = sigma_v
        kind = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[p]
        c_skip, c_out = preconditioning(kind, sigma, 1.0 / math.sqrt(1.0 + sigma * sigma))
        c_skip, c_out = float(c_skip), float(c_out)
        if kind == "x0":
            return model_output.clone()
        return c_skip * x + c_out * model_output

    def _sigma_index_for(self, timesteps, like):
        sched = self.timesteps.to(like.device)
        timesteps = timesteps.to(like.device)
        if self.begin_index is None:
            return [self.index_for_timestep(t, sched) for t in timesteps.reshape(-1)]
        if self.step_index is not None:
            return [self.step_index] * timesteps.reshape(-1).shape[0]
        return [self.begin_index] * timesteps.reshape(-1).shape[0]

    def _noise_levels(self, original_samples, noise, timesteps):
        """The checked inputs' compute dtype and sigma at the timesteps' levels, broadcastable
        against the samples."""
        _check_tensors(noise, original_samples, ("noise", "original_samples"))
        _check_same_shape(noise, original_samples, "noise")
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.as_tensor(timesteps)
        idx = self._sigma_index_for(timesteps, original_samples)
        cd = _compute_dtype(original_samples.device)
        return cd, _broadcast(self._sig[idx], original_samples, cd)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x = x_0 + sigma eps at the timesteps' levels (float64, in the samples' dtype)."""
        cd, sigma = self._noise_levels(original_samples, noise, timesteps)
        return (original_samples.to(cd) + noise.to(cd) * sigma).to(original_samples.dtype)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def _ladder(fn, S, smin, smax):
    """The first S levels of ``fn`` (without its final 0); [smax] for S = 1 as diffusers."""
    if S == 1:
        return np.array([float(smax)])
    return fn(S, smin, smax)[:-1]


# ----------------------------------------------------------------------------- Euler
class EulerDiscreteScheduler(_SigmaScheduler):
    """diffusers' ``EulerDiscreteScheduler`` (same config, same API) on diffmath's float64
    arithmetic: D from the model output (``_denoised``), then the Euler step
    ``diffmath.samplers.solvers.euler_step`` sigma_hat -> sigma_{i+1} (EDM eq. 1 and 3; Alg. 2 with
    churn: ``churn_gamma``, ``churn_std``), the solver ``sample_euler`` runs. Noise (s_churn > 0)
    from ``randn_tensor`` with the caller's generator, as diffusers draws it.
    ``interpolation_type="log_linear"`` follows diffusers: S + 1 levels uniform in log sigma for
    S timesteps, so the loop ends at the table's sigma_min."""

    _prediction_types = PREDICTION_TYPES

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        interpolation_type: str = "linear",
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timestep_spacing: str = "linspace",
        timestep_type: str = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
    ):
        _check_choice(interpolation_type, "interpolation_type", ("linear", "log_linear"))
        _check_choice(timestep_type, "timestep_type", ("discrete", "continuous"))
        self._setup_sigmas()
        self.use_karras_sigmas = use_karras_sigmas
        self.use_exponential_sigmas = use_exponential_sigmas
        self.use_beta_sigmas = use_beta_sigmas
        if timestep_type == "continuous" and prediction_type == "v_prediction":
            self._finish(self._sig[:-1], 0.0, self._ts, None)

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ):
        """One Euler step sigma_i -> sigma_{i+1} (see the class docstring). Returns
        ``EulerDiscreteSchedulerOutput(prev_sample, pred_original_sample)`` or that tuple."""
        self._check_step_timestep(timestep)
        i = self._start_step(model_output, sample, timestep)
        sigma, sigma_next = float(self._sig[i]), float(self._sig[i + 1])
        gamma = churn_gamma(sigma, len(self._sig) - 1, float(s_churn), float(s_tmin), float(s_tmax))
        sigma_hat = sigma * (gamma + 1.0)
        cd = _compute_dtype(sample.device)
        x = sample.to(cd)
        if gamma > 0:
            noise = torch_utils.randn_tensor(
                model_output.shape, dtype=model_output.dtype, device=model_output.device, generator=generator
            )
            x = x + noise.to(cd) * churn_std(sigma, gamma, float(s_noise))
        den = self._denoised(model_output.to(cd), x, sigma_hat, sigma_v=sigma)
        prev = euler_step(x, den, sigma_hat, sigma_next)
        return self._end_step(prev, den, model_output, EulerDiscreteSchedulerOutput, return_dict)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 at the timesteps' training steps
        (Salimans & Ho 2022, Sec. 4), float64, in the sample's dtype."""
        self._check_step_timestep(timesteps)
        _check_tensors(noise, sample, ("noise", "sample"))
        idx = [self.index_for_timestep(t, self.timesteps.to(sample.device)) for t in timesteps.to(sample.device)]
        cd = _compute_dtype(sample.device)
        abar = _broadcast(self._abar[idx], sample, cd)
        return (abar.sqrt() * noise.to(cd) - (1 - abar).sqrt() * sample.to(cd)).to(sample.dtype)


# ----------------------------------------------------------------------------- Euler ancestral
class EulerAncestralDiscreteScheduler(_SigmaScheduler):
    """diffusers' ``EulerAncestralDiscreteScheduler`` on diffmath's float64 arithmetic:
    (sigma_down, sigma_up) = ``ancestral_step(sigma_i, sigma_{i+1})`` (eta = 1, DDPM's posterior
    in sigma space), then ``euler_ancestral_step`` -- the Euler step to sigma_down plus sigma_up z
    (the solver ``sample_euler_ancestral``). z is drawn at every step with ``randn_tensor`` and
    the caller's generator, as diffusers draws it (on the last step sigma_up = 0).
    ``prediction_type="sample"`` is supported (diffusers raises NotImplementedError)."""

    _prediction_types = PREDICTION_TYPES
    _has_sigma_options = False

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        self._setup_sigmas()

    def set_timesteps(self, num_inference_steps: int, device=None):
        """The inference ladder: sigma at diffusers' spaced timesteps, then 0."""
        super().set_timesteps(num_inference_steps=num_inference_steps, device=device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ):
        """One Euler ancestral step sigma_i -> sigma_{i+1}. Returns
        ``EulerAncestralDiscreteSchedulerOutput(prev_sample, pred_original_sample)`` or that tuple."""
        self._check_step_timestep(timestep)
        i = self._start_step(model_output, sample, timestep)
        sigma, sigma_next = float(self._sig[i]), float(self._sig[i + 1])
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, 1.0)
        cd = _compute_dtype(sample.device)
        x = sample.to(cd)
        den = self._denoised(model_output.to(cd), x, sigma)
        noise = torch_utils.randn_tensor(
            model_output.shape, dtype=model_output.dtype, device=model_output.device, generator=generator
        )
        prev = euler_ancestral_step(x, den, sigma, sigma_down, noise.to(cd), sigma_up)
        return self._end_step(prev, den, model_output, EulerAncestralDiscreteSchedulerOutput, return_dict)

    get_velocity = EulerDiscreteScheduler.get_velocity


# ----------------------------------------------------------------------------- VP multistep base
class _VPMultistepScheduler(_SigmaScheduler):
    """What DPM-Solver++ and UniPC share: the sample is diffusers' VP x_t (``init_noise_sigma`` =
    1, unscaled model input, x_t = alpha x_0 + sigma_t eps in ``add_noise``), each step maps it to
    x = x_t sqrt(1 + sigma^2) (EDM's VP view, x = x_0 + sigma eps) and back, on diffusers' integer
    timesteps, with a history of model values warmed up from first order."""

    order = 1

    def _refuse_flow(self):
        for key in ("use_flow_sigmas", "use_dynamic_shifting"):
            if dict(self.config)[key]:
                raise ValueError(f"{key}=True (flow matching) is not supported by the diffmath adapter")

    @staticmethod
    def _check_thresholding(dynamic_thresholding_ratio, sample_max_value):
        d = dynamic_thresholding_ratio
        if isinstance(d, bool) or not isinstance(d, numbers.Real) or not 0 <= d <= 1:
            raise ValueError(f"dynamic_thresholding_ratio must lie in [0, 1]; got {d!r}")
        _check_positive(sample_max_value, "sample_max_value")

    @property
    def init_noise_sigma(self) -> float:
        """1.0: the sample is diffusers' VP x_t."""
        return 1.0

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The sample itself (the model takes the VP x_t)."""
        return sample

    def _int_timesteps(self, S: int, last: int) -> np.ndarray:
        """diffusers' integer timesteps (descending) for S steps over [0, last)."""
        c, T = self.config, self.config.num_train_timesteps
        if c.timestep_spacing == "linspace":
            ts = np.linspace(0, last - 1, S + 1).round()[::-1][:-1]
        elif c.timestep_spacing == "leading":
            ratio = last // (S + 1)
            ts = (np.arange(0, S + 1) * ratio).round()[::-1][:-1] + c.steps_offset
        else:
            ts = np.arange(last, 0, -T / S).round() - 1
        return ts.astype(np.int64)

    def _set_int_ladder(self, sig, last, ts, device):
        """The ladder with diffusers' int64 timesteps; resets the history and the step index."""
        self._set_ladder(sig, last, ts, device)
        self.timesteps = torch.from_numpy(np.asarray(ts).astype(np.int64)).to(device=device)
        self.num_inference_steps = len(ts)
        self._reset_history()
        self._step_index = None
        self._begin_index = None

    def _threshold(self, D):
        """Dynamic thresholding of D when the config asks for it."""
        c = self.config
        if c.thresholding:
            D = _dynamic_threshold(D, float(c.dynamic_thresholding_ratio), float(c.sample_max_value))
        return D

    @staticmethod
    def _to_x(sample, s: float):
        """x = x_t / alpha_t = x_t sqrt(1 + sigma^2) in the compute dtype."""
        return sample.to(_compute_dtype(sample.device)) * math.sqrt(1.0 + s * s)

    def _end_vp_step(self, prev, s_next: float, model_output, return_dict):
        """Count the warm-up, map x back to x_t = x / sqrt(1 + sigma_next^2) in the model output's
        dtype, advance the step index and return diffusers' output."""
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        prev = (prev / math.sqrt(1.0 + s_next * s_next)).to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = alpha x_0 + sigma_t eps, alpha = 1/sqrt(1 + sigma^2), sigma_t = sigma alpha at the
        timesteps' levels (float64, in the samples' dtype)."""
        cd, sigma = self._noise_levels(original_samples, noise, timesteps)
        alpha = 1.0 / torch.sqrt(1.0 + sigma * sigma)
        return (alpha * original_samples.to(cd) + (sigma * alpha) * noise.to(cd)).to(original_samples.dtype)


# ----------------------------------------------------------------------------- DPM-Solver++
DPM_ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")


class DPMSolverMultistepScheduler(_VPMultistepScheduler):
    """diffusers' ``DPMSolverMultistepScheduler`` on diffmath's float64 arithmetic. The sample is
    diffusers' VP x_t; each step maps it to x = x_t sqrt(1 + sigma^2) (EDM's VP view, x = x_0 +
    sigma eps), forms D from the model output (``_denoised``; thresholding on D), and applies the
    core's per-step functions in lambda = -log sigma:

    - "dpmsolver++", midpoint, orders 1-2: ``diffmath.samplers.solvers.dpmpp_2m_step`` (the loop
      ``sample_dpmpp_2m``; DPM-Solver++(2M), Lu et al. 2022b, Alg. 2);
    - "dpmsolver++" with ``solver_type="heun"`` or order 3, and "sde-dpmsolver++":
      ``dpmpp_multistep_step`` with eta = 0 / 1 (the loops ``sample_dpmpp_2m_sde`` /
      ``sample_dpmpp_3m_sde``), the SDE noise of std ``dpmpp_sde_noise_std`` drawn with
      ``randn_tensor`` (float32, the caller's generator) at every step, as diffusers draws it.

    The third-order term integrates the quadratic exactly (J_2 = 2 h^2 phi_3(-h)); diffusers'
    carries a different coefficient (docs/samplers.md), so order-3 steps differ from diffusers'
    by design. The lower-order warm-up, ``lower_order_final``, ``euler_at_final`` and
    ``final_sigmas_type`` follow diffusers. The deprecated noise-prediction algorithms
    ("dpmsolver", "sde-dpmsolver"), flow sigmas and dynamic shifting are refused with a
    ``ValueError``."""

    _prediction_types = PREDICTION_TYPES

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        if algorithm_type == "deis":  # diffusers maps it to dpmsolver++
            self.register_to_config(algorithm_type="dpmsolver++")
        elif algorithm_type in ("dpmsolver", "sde-dpmsolver"):
            raise ValueError(
                f"algorithm_type={algorithm_type!r} (noise prediction, deprecated in diffusers) is not "
                "supported by the "
                f"diffmath adapter; use one of {DPM_ALGORITHMS}"
            )
        elif algorithm_type not in DPM_ALGORITHMS:
            raise NotImplementedError(f"{algorithm_type} is not implemented for {self.__class__}")
        if solver_type in ("logrho", "bh1", "bh2"):
            self.register_to_config(solver_type="midpoint")
        elif solver_type not in ("midpoint", "heun"):
            raise NotImplementedError(f"{solver_type} is not implemented for {self.__class__}")
        if isinstance(solver_order, bool) or solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3; got {solver_order!r}")
        self._refuse_flow()
        _check_choice(variance_type, "variance_type", (None, "learned", "learned_range"))
        self._check_thresholding(dynamic_thresholding_ratio, sample_max_value)
        if not isinstance(lambda_min_clipped, numbers.Real) or math.isnan(lambda_min_clipped):
            raise ValueError(f"lambda_min_clipped must be a number; got {lambda_min_clipped!r}")
        _check_sigma_flags(dict(self.config))
        self._setup_sigmas()
        self._reset_history()

    def _dpm_timesteps(self, S: int) -> np.ndarray:
        """diffusers' integer timesteps (descending) for S steps, below lambda_min_clipped."""
        c, T = self.config, self.config.num_train_timesteps
        lam = -np.log(self._tab)  # lambda_t = log(alpha_t / sigma_t), decreasing in t
        return self._int_timesteps(S, T - int(np.searchsorted(lam[::-1], c.lambda_min_clipped)))

    def set_timesteps(
        self, num_inference_steps: int | None = None, device=None, mu: float | None = None, timesteps=None
    ):
        """The inference ladder: diffusers' integer timesteps and sigma of the float64 table at
        them, or the Karras / Lu (uniform lambda) / exponential / beta ladder between the table's
        ends with t(sigma) linear in log sigma (rounded for Karras and Lu, as diffusers); then the
        final sigma (0, or sigma_0 with ``final_sigmas_type="sigma_min"``)."""
        if mu is not None:
            raise ValueError("mu (dynamic shifting) is not supported by the diffmath adapter")
        if num_inference_steps is None and timesteps is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `timesteps`.")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        c = self.config
        for key in ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas"):
            if timesteps is not None and c[key]:
                raise ValueError(f"Cannot set `timesteps` with `config.{key} = True`.")
        T = c.num_train_timesteps
        if timesteps is not None:
            ts = np.array(_as_list(timesteps)).astype(np.int64).reshape(-1)
            if ts.size < 1 or np.any(np.diff(ts) >= 0) or ts.min() < 0 or ts.max() > T - 1:
                raise ValueError(f"`timesteps` must be strictly descending integers in [0, {T - 1}]; got {ts.tolist()}")
            S = ts.size
        else:
            S = self._check_steps(num_inference_steps)
            ts = self._dpm_timesteps(S)
        full = self._tab[::-1].copy()  # sigma from t = T - 1 down to 0
        smin, smax = float(full[-1]), float(full[0])
        sig = None
        if timesteps is None:
            if c.use_karras_sigmas:
                sig = _ladder(sigmas_karras, S, smin, smax)
            elif c.use_lu_lambdas or c.use_exponential_sigmas:
                sig = _ladder(sigmas_exponential, S, smin, smax)
            elif c.use_beta_sigmas:
                sig = _ladder(sigmas_beta, S, smin, smax)
        if sig is None:
            sig = self._sigma_at(ts.astype(np.float64))
        else:
            ts = self._t_of_sigma(sig)
            if (c.use_karras_sigmas or c.use_lu_lambdas) and c.beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
        self._set_int_ladder(sig, self._last_sigma(), ts, device)

    def _reset_history(self):
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0

    def _x0(self, model_output, x, sigma: float):
        """D = E[x_0 | x] from the model output (learned-variance channels dropped), thresholded."""
        return self._threshold(self._denoised(model_output, x, sigma))

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        """One multistep step sigma_i -> sigma_{i+1} (see the class docstring). Returns
        ``SchedulerOutput(prev_sample)`` or that tuple."""
        _check_set(self)
        c = self.config
        _check_tensors(model_output, sample)
        if c.variance_type in ("learned", "learned_range") and c.prediction_type == "epsilon":
            model_output = model_output[:, : sample.shape[1]]
        i, N = self._start_step(model_output, sample, timestep), len(self.timesteps)
        lower_final = i == N - 1 and (
            c.euler_at_final or (c.lower_order_final and N < 15) or c.final_sigmas_type == "zero"
        )
        lower_second = i == N - 2 and c.lower_order_final and N < 15
        s, s_next = float(self._sig[i]), float(self._sig[i + 1])
        cd = _compute_dtype(sample.device)
        x = self._to_x(sample, s)
        D = self._x0(model_output.to(cd), x, s)
        for k in range(c.solver_order - 1):
            self.model_outputs[k] = self.model_outputs[k + 1]
        self.model_outputs[-1] = D
        sde = c.algorithm_type == "sde-dpmsolver++"
        noise = None
        if sde:
            if variance_noise is None:
                noise = torch_utils.randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=torch.float32
                )
            else:
                noise = variance_noise.to(device=model_output.device, dtype=torch.float32)
        if c.solver_order == 1 or self.lower_order_nums < 1 or lower_final:
            p = 1
        elif c.solver_order == 2 or self.lower_order_nums < 2 or lower_second:
            p = 2
        else:
            p = 3
        hist = [self.model_outputs[-1 - k].to(cd) for k in range(1, p)]
        if s_next == s:
            # a zero-length step (Karras / Lu / exponential ladders end at sigma_min, and
            # final_sigmas_type="sigma_min" appends sigma_min again): the identity, the h -> 0
            # limit of every step below (diffusers gets it as 0 * inf terms that vanish)
            prev = x
        elif not sde and (p == 1 or (p == 2 and c.solver_type == "midpoint")):
            h_prev = math.log(float(self._sig[i - 1]) / s) if p == 2 else None
            prev = dpmpp_2m_step(x, D, s, s_next, hist[0] if p == 2 else None, h_prev)
        elif s_next == 0:
            prev = D
        else:
            lam_hist = [(-math.log(float(self._sig[i - k])), hist[k - 1]) for k in range(1, p)]
            solver_type = c.solver_type if p == 2 else "heun"
            prev = dpmpp_multistep_step(x, s, s_next, D, lam_hist, 1.0 if sde else 0.0, solver_type)
            if sde:
                prev = prev + noise.to(cd) * dpmpp_sde_noise_std(s, s_next, 1.0)
        return self._end_vp_step(prev, s_next, model_output, return_dict)


# ----------------------------------------------------------------------------- Heun
class HeunDiscreteScheduler(_SigmaScheduler):
    """diffusers' ``HeunDiscreteScheduler`` (same config, same API, ``order = 2``) on diffmath's
    float64 arithmetic: Heun's step sigma_i -> sigma_{i+1} (Karras et al. 2022, Alg. 1) split
    over two ``step`` calls as diffusers splits it. The timesteps and sigmas are diffusers'
    doubled ones, [t_0, t_1, t_1, ..., t_{N-1}, t_{N-1}] and [s_0, s_1, s_1, ..., s_{N-1},
    s_{N-1}, 0], so a pipeline calls the model 2N - 1 times:

    - first call (``state_in_first_order``): D_i from the model output at sigma_i, then the
      Euler point x~ = ``heun_predict`` (stored with d_i and dt as ``sample``,
      ``prev_derivative`` and ``dt``); the step to sigma = 0 returns D_i (the core's rule; Euler
      gives it up to rounding);
    - second call, at sigma_{i+1}: D~ from the model output at x~, then ``heun_correct``
      (the trapezoidal rule) from the stored x_i and d_i.

    That is the loop ``diffmath.samplers.solvers.sample_heun`` runs. ``clip_sample`` clamps D to
    [-clip_sample_range, clip_sample_range] at both calls, as diffusers does."""

    _prediction_types = PREDICTION_TYPES
    order = 2

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ) -> None:
        _check_positive(clip_sample_range, "clip_sample_range")
        self._setup_sigmas()
        self._on_new_ladder()
        self.use_karras_sigmas = use_karras_sigmas

    def _set_ladder(self, sig, last, ts, device=None):
        """Keep the ladder s_0 .. s_{N-1}, last (``_lev``) and expose diffusers' doubled one."""
        self._lev = np.concatenate([np.asarray(sig, dtype=np.float64), [float(last)]])
        self._sig = np.concatenate([self._lev[:1], np.repeat(self._lev[1:-1], 2), self._lev[-1:]])
        self.sigmas = torch.from_numpy(self._sig.astype(np.float32))
        ts = np.asarray(ts, dtype=np.float64)
        self._ts = np.concatenate([ts[:1], np.repeat(ts[1:], 2)])
        self.timesteps = torch.from_numpy(self._ts.astype(np.float32)).to(device)

    def _on_new_ladder(self):
        self.prev_derivative = None
        self.dt = None
        self.sample = None

    def set_timesteps(self, num_inference_steps=None, device=None, num_train_timesteps=None, timesteps=None):
        """The inference ladder (``_SigmaScheduler``), doubled; resets the Heun state."""
        if num_inference_steps is None and timesteps is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `custom_timesteps`.")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if num_train_timesteps is not None and num_train_timesteps != self.config.num_train_timesteps:
            raise ValueError(
                f"num_train_timesteps must be None or the config's {self.config.num_train_timesteps}; got "
                f"{num_train_timesteps!r}"
            )
        super().set_timesteps(num_inference_steps=num_inference_steps, device=device, timesteps=timesteps)

    @property
    def state_in_first_order(self) -> bool:
        return self.dt is None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One half of Heun's step (see the class docstring). Returns
        ``HeunDiscreteSchedulerOutput(prev_sample, pred_original_sample)`` or that tuple."""
        k = self._start_step(model_output, sample, timestep, check_end=True)
        c = self.config
        cd = _compute_dtype(sample.device)
        first = self.state_in_first_order
        sigma, sigma_next = (
            (float(self._sig[k]), float(self._sig[k + 1])) if first else (float(self._sig[k - 1]), float(self._sig[k]))
        )
        x = sample.to(cd)
        den = self._denoised(model_output.to(cd), x, sigma if first else sigma_next)
        if c.clip_sample:
            r = float(c.clip_sample_range)
            den = den.clamp(-r, r)
        if first:
            if sigma_next == 0:
                prev, d = den, (x - den) / sigma
            else:
                prev, d = heun_predict(x, den, sigma, sigma_next)
            self.prev_derivative, self.dt, self.sample = d, sigma_next - sigma, x
        else:
            prev = heun_correct(self.sample, self.prev_derivative, x, den, sigma, sigma_next)
            self.prev_derivative = self.dt = self.sample = None
        return self._end_step(prev, den, model_output, HeunDiscreteSchedulerOutput, return_dict)


# ----------------------------------------------------------------------------- LMS
class LMSDiscreteScheduler(_SigmaScheduler):
    """diffusers' ``LMSDiscreteScheduler`` (same config, same API, ``step(..., order=4)``) on
    diffmath's float64 arithmetic: the linear multistep (Adams-Bashforth) step on dx/dsigma =
    (x - D)/sigma (Karras et al. 2022, eq. 1 and 3),

        x_{i+1} = x_i + sum_{j < q} c_j d_{i-j},   d_i = (x_i - D(x_i; sigma_i)) / sigma_i,

    with the weights c_j the Lagrange basis integrated exactly over [sigma_i, sigma_{i+1}]
    (``diffmath.samplers.solvers.lms_coefficients``; diffusers integrates with scipy ``quad`` at
    ``epsrel=1e-4`` from its float32 sigmas) and the step ``lms_step`` -- the loop
    ``sample_lms`` runs. q = min(order, number of derivatives held): a start mid-ladder
    (``set_begin_index``) warms up from first order, where diffusers takes order-q weights with
    fewer derivatives than nodes."""

    _prediction_types = PREDICTION_TYPES

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        self._setup_sigmas()
        self.derivatives = []
        self.use_karras_sigmas = use_karras_sigmas

    def set_timesteps(self, num_inference_steps: int, device=None):
        """The inference ladder (``_SigmaScheduler``); clears the derivative history."""
        super().set_timesteps(num_inference_steps=num_inference_steps, device=device)

    def _on_new_ladder(self):
        self.derivatives = []

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        """The weight of d_{t - current_order} in the order-``order`` step from ladder index t
        (``lms_coefficients`` on the float64 ladder)."""
        return float(lms_coefficients(self._sig, int(t), int(order))[int(current_order)])

    def step(
        self, model_output: torch.Tensor, timestep, sample: torch.Tensor, order: int = 4, return_dict: bool = True
    ):
        """One linear multistep step sigma_i -> sigma_{i+1} (see the class docstring). Returns
        ``LMSDiscreteSchedulerOutput(prev_sample, pred_original_sample)`` or that tuple."""
        if isinstance(order, (bool, np.bool_)) or not isinstance(order, (int, np.integer)) or order < 1:
            raise ValueError(f"order must be an integer >= 1; got {order!r}")
        i = self._start_step(model_output, sample, timestep, check_end=True, warn_unscaled=True)
        sigma = float(self._sig[i])
        cd = _compute_dtype(sample.device)
        x = sample.to(cd)
        den = self._denoised(model_output.to(cd), x, sigma)
        self.derivatives.append((x - den) / sigma)
        if len(self.derivatives) > order:
            self.derivatives.pop(0)
        q = min(int(order), i + 1, len(self.derivatives))
        ds = self.derivatives[::-1][:q]  # newest first
        prev = lms_step(x, ds, lms_coefficients(self._sig, i, q))
        return self._end_step(prev, den, model_output, LMSDiscreteSchedulerOutput, return_dict)


# ----------------------------------------------------------------------------- UniPC
class UniPCMultistepScheduler(_VPMultistepScheduler):
    """diffusers' ``UniPCMultistepScheduler`` (same config, same API) on diffmath's float64
    arithmetic. The sample is diffusers' VP x_t; each step maps it to x = x_t sqrt(1 + sigma^2)
    (x = x_0 + sigma eps), forms the model value -- D (thresholded) with ``predict_x0=True``, eps
    with ``predict_x0=False`` -- and applies the core's UniPC steps (Zhao et al. 2023, Alg. 2, B(h)
    = "bh1" | "bh2"): first the corrector ``unipc_corrector_step`` of the previous step with the
    new model value (unless the previous index is in ``disable_corrector``), then the predictor
    ``unipc_predictor_step`` of order min(solver_order, warm-up, and with ``lower_order_final``
    the steps left). That is the loop ``diffmath.samplers.solvers.sample_unipc`` runs.

    The step to sigma = 0 returns the denoised value D (the h -> inf limit; diffusers gets it as
    the first-order step with ``lower_order_final``, and NaN without it or with
    ``predict_x0=False``, where 0 * inf appears); a zero-length step (sigma_min repeated by
    ``final_sigmas_type="sigma_min"`` after a Karras / exponential / beta ladder) is the identity.
    Flow sigmas, dynamic shifting, custom ``sigmas``, ``solver_p`` and
    ``prediction_type="flow_prediction"`` are refused with a ``ValueError``."""

    _prediction_types = PREDICTION_TYPES

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list[int] = [],  # noqa: B006 (diffusers' signature; its config records this default, never mutated)
        solver_p: SchedulerMixin = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        sigma_min: float | None = None,
        sigma_max: bool | None = None,
        shift_terminal: bool | None = None,
    ) -> None:
        if solver_type in ("midpoint", "heun", "logrho"):  # diffusers maps these to bh2
            self.register_to_config(solver_type="bh2")
        elif solver_type not in ("bh1", "bh2"):
            raise NotImplementedError(f"{solver_type} is not implemented for {self.__class__}")
        if isinstance(solver_order, bool) or not isinstance(solver_order, numbers.Integral) or solver_order < 1:
            raise ValueError(f"solver_order must be an integer >= 1; got {solver_order!r}")
        self._refuse_flow()
        if shift_terminal is not None:
            raise ValueError("`shift_terminal` is only supported when `use_flow_sigmas=True`.")
        if solver_p is not None:
            raise ValueError("solver_p (another scheduler as the predictor) is not supported by the diffmath adapter")
        self._check_thresholding(dynamic_thresholding_ratio, sample_max_value)
        if isinstance(disable_corrector, (str, bytes)) or not all(
            isinstance(k, numbers.Integral) and not isinstance(k, bool) for k in disable_corrector
        ):
            raise ValueError(f"disable_corrector must be a list of step indices; got {disable_corrector!r}")
        self._setup_sigmas()
        self.predict_x0 = predict_x0
        self.disable_corrector = disable_corrector
        self.solver_p = None
        self._reset_history()

    def _reset_history(self):
        n = self.config.solver_order
        self.model_outputs = [None] * n
        self.timestep_list = [None] * n
        self._levels = [None] * n  # the sigma of each model value
        self.lower_order_nums = 0
        self.last_sample = None
        self.this_order = None

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu=None):
        """The inference ladder: sigma of the float64 table at diffusers' integer timesteps, or the
        Karras / exponential / beta ladder between the table's ends (or ``sigma_min`` /
        ``sigma_max``) with t(sigma) linear in log sigma (rounded for Karras, truncated otherwise,
        as diffusers); then the final sigma (0, or sigma_min with ``final_sigmas_type``)."""
        if sigmas is not None:
            raise ValueError(
                "Passing `sigmas` is only supported when `use_flow_sigmas=True`. "
                "Please set `use_flow_sigmas=True` during scheduler initialization."
            )
        if mu is not None:
            raise ValueError("mu (dynamic shifting) is not supported by the diffmath adapter")
        c = self.config
        S = self._check_steps(num_inference_steps)
        ts = self._int_timesteps(S, c.num_train_timesteps)
        T = c.num_train_timesteps
        if ts.min() < 0 or ts.max() > T - 1:
            raise ValueError(f"the timesteps of {S} steps leave [0, {T - 1}]: {ts.tolist()}")
        full = self._tab[::-1].copy()
        conv = self._converted(full, S)
        if conv is not None:
            sig = conv
            ts = self._t_of_sigma(sig)
            if c.use_karras_sigmas:
                ts = ts.round()
            last = float(sig[-1]) if c.final_sigmas_type == "sigma_min" else 0.0
        else:
            sig = self._sigma_at(ts.astype(np.float64))
            last = self._last_sigma()
        self._set_int_ladder(sig, last, ts, device)

    def convert_model_output(
        self, model_output: torch.Tensor, *args, sample: torch.Tensor = None, **kwargs
    ) -> torch.Tensor:
        """The model value UniPC steps with, on diffusers' VP sample: x0 (D, thresholded) with
        ``predict_x0``, eps otherwise (float64; at the current step's sigma)."""
        if sample is None:
            if len(args) > 1:
                sample = args[1]
            else:
                raise ValueError("missing `sample` as a required keyword argument")
        s = float(self._sig[self.step_index])
        return self._model_value(model_output.to(_compute_dtype(sample.device)), self._to_x(sample, s), s)

    def _model_value(self, m, x, s: float):
        c = self.config
        if self.predict_x0:
            return self._threshold(self._denoised(m, x, s))
        if c.prediction_type == "epsilon":
            return m
        return (x - self._denoised(m, x, s)) / s

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One UniPC step sigma_i -> sigma_{i+1}: the corrector of the previous step, then the
        predictor (see the class docstring). Returns ``SchedulerOutput(prev_sample)`` or that tuple."""
        _check_set(self)
        c = self.config
        i, N = self._start_step(model_output, sample, timestep, check_end=True), len(self.timesteps)
        s, s_next = float(self._sig[i]), float(self._sig[i + 1])
        cd = _compute_dtype(sample.device)
        x = self._to_x(sample, s)
        M = self._model_value(model_output.to(cd), x, s)
        variant = c.solver_type
        pred = "data" if self.predict_x0 else "noise"
        if i > 0 and (i - 1) not in self.disable_corrector and self.last_sample is not None:
            s_prev = float(self._sig[i - 1])
            p = self.this_order
            hist = [self.model_outputs[-1 - k] for k in range(p)]
            levels = [self._levels[-1 - k] for k in range(p)]
            if s != s_prev:  # a zero-length previous step needs no correction
                x = unipc_corrector_step(self.last_sample, s_prev, s, hist, levels, M, variant, pred)
        for k in range(c.solver_order - 1):
            self.model_outputs[k] = self.model_outputs[k + 1]
            self.timestep_list[k] = self.timestep_list[k + 1]
            self._levels[k] = self._levels[k + 1]
        self.model_outputs[-1], self.timestep_list[-1], self._levels[-1] = M, timestep, s
        order = min(c.solver_order, N - i) if c.lower_order_final else c.solver_order
        self.this_order = min(order, self.lower_order_nums + 1)
        self.last_sample = x
        if s_next == s:
            prev = x  # a zero-length step: the identity
        elif s_next == 0:
            prev = M if self.predict_x0 else x - s * M  # D, the h -> inf limit of every order
        else:
            p = self.this_order
            hist = [self.model_outputs[-1 - k] for k in range(p)]
            levels = [self._levels[-1 - k] for k in range(p)]
            prev = unipc_predictor_step(x, s, s_next, hist, levels, variant, pred)
        return self._end_vp_step(prev, s_next, model_output, return_dict)
