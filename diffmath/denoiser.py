"""One denoiser in sigma space: D(x; sigma), the EDM / k-diffusion view of every model.

Karras et al. 2022 ("Elucidating the design space of diffusion-based generative models", EDM)
write every diffusion model as a denoiser of x = y + sigma n (y data, n ~ N(0, I)):

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))      (EDM eq. 7)

with F the network. D is the posterior mean E[y | y + sigma n = x] when F is ideal, and the
probability-flow ODE is dx/dsigma = (x - D(x; sigma)) / sigma (EDM eq. 1 and 3 with sigma(t) = t). Every
solver in ``diffmath.samplers`` (``sample_euler``, ``sample_dpmpp_2m``, ...) takes such a D.

**Models with a scaled input.** A VP model (a discrete ``Schedule``, ``VPSDE``, ``SubVPSDE``)
sees x_t = m x_0 + s eps = m (x_0 + sigma eps) with sigma = s/m; a VE model sees x_t = x. So
c_in = m(sigma), the scale of the model's input:

    discrete / VP   sigma = sqrt((1 - abar)/abar),  m = 1/sqrt(1 + sigma^2)
    sub-VP          sigma = s/m = 2 sinh(-lmc(t)),  m = exp(-asinh(sigma/2))
    VE              sigma = s(t) = sqrt(sigma(t)^2 - sigma_min^2) (the exact marginal std),  m = 1

**c_skip and c_out by prediction type** (EDM Table 1 generalised to any (m, s = sigma m)):

    eps    x_0 = (x_t - s eps)/m = x - sigma eps        c_skip = 1,              c_out = -sigma
    x0     D = x0_pred                                  c_skip = 0,              c_out = 1
    v      v = m eps - s x_0 (Salimans & Ho 2022)       c_skip = 1/(1 + sigma^2), c_out = -sigma/(m (1 + sigma^2))
           => x_0 = (m x_t - s v)/(m^2 + s^2)
    score  D = x + sigma^2 grad_x log p(x)  (Tweedie)   c_skip = 1,              c_out = sigma^2 m
           with grad_x log p(x) = m grad_{x_t} log p_t(x_t), the model's score of x_t

**c_noise: the model's time.** For a discrete schedule the model takes a timestep index. As
k-diffusion's discrete wrappers do, t(sigma) interpolates linearly between the indices with log
sigma: for log sigma_k <= log sigma <= log sigma_{k+1}, t = k + (log sigma - log sigma_k) /
(log sigma_{k+1} - log sigma_k). When sigma lies on the table (compared in sigma's own
dtype, so a float32 sigma of a float64 table entry counts) the model gets the exact integer
index, int64; otherwise a float time. For an SDE, t(sigma) is the closed-form inverse:

    VP      t = 2 L / (beta_min + sqrt(beta_min^2 + 2 beta_d L)),  L = log1p(sigma^2)
                                                               (EDM Table 1, sigma^{-1}, without cancellation)
    sub-VP  the same with L = 2 asinh(sigma/2)
    VE      t = log1p((sigma / sigma_min)^2) / (2 log(sigma_max / sigma_min))

Each ``Denoiser`` knows the range [sigma_min, sigma_max] where its model is defined: the
table's range for a schedule; sigma(eps) to sigma(1) for an SDE (eps = ``sde.default_eps``;
any sigma in (0, sigma(1)] is accepted). A sigma outside raises ValueError rather than being
clamped (k-diffusion clamps t silently), unless the Denoiser was built with ``clamp_time=True``:
then sigma keeps its own c_skip, c_out and c_in and only the model time c_noise is clamped to
the range's end (the glue that queries a discrete model on a VP-SDE whose sigma(t) leaves the
table, ``score_from_denoiser``).

**The score of the SDE's marginal** (``score_from_denoiser``): at time t of an SDE with
x_t = m x_0 + s eps, put x = x_t/m and sigma = s/m; Tweedie's formula for x = y + sigma n
(Efron 2011; EDM eq. 3) gives grad_x log p(x; sigma) = (D(x; sigma) - x)/sigma^2, and the
chain rule through x = x_t/m:

    grad_{x_t} log p_t(x_t) = (D(x_t/m; sigma) - x_t/m) / (sigma^2 m)
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from ._array import Array, compute_dtype, is_tensor
from .checks import check_float, check_like, check_time
from .schedules import Schedule
from .sde import SDE, VESDE, VPSDE, SubVPSDE

__all__ = [
    "Denoiser",
    "PREDICTIONS",
    "preconditioning",
    "schedule_sigmas",
    "score_from_denoiser",
    "sigma_to_t_schedule",
    "sigma_to_t_sde",
    "t_to_sigma_sde",
]

PREDICTIONS = ("eps", "x0", "v", "score")


# ----------------------------------------------------------------------------- the coefficients
def preconditioning(prediction: str, sigma, m):
    """(c_skip, c_out) of D(x; sigma) = c_skip x + c_out F(m x; c_noise) for a model F that
    predicts ``prediction`` from x_t = m x (module docstring; EDM Table 1).

    sigma, m: float64 numpy arrays (or floats) of one shape. Returns float64 arrays of it."""
    sigma = np.asarray(sigma, dtype=np.float64)
    m = np.asarray(m, dtype=np.float64)
    one = np.ones_like(sigma)
    if prediction == "eps":
        c_skip = one  # x_0 = x - sigma eps
        c_out = -sigma
    elif prediction == "x0":
        c_skip = 0.0 * one  # D = x0_pred
        c_out = one
    elif prediction == "v":
        c_skip = 1.0 / (1.0 + sigma * sigma)  # x_0 = (m x_t - s v)/(m^2 + s^2), s = sigma m
        c_out = -sigma / (m * (1.0 + sigma * sigma))
    elif prediction == "score":
        c_skip = one  # Tweedie: D = x + sigma^2 grad_x log p
        c_out = sigma * sigma * m
    else:
        raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}; got {prediction!r}")
    return c_skip, c_out


def schedule_sigmas(s: Schedule) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t)/abar_t) for every index t of ``s`` (float64, increasing)."""
    return np.asarray(s.sqrt_recipm1_alphas_cumprod, dtype=np.float64)


def sigma_to_t_schedule(s: Schedule, sigma):
    """The model time t(sigma) of a discrete schedule: linear in log sigma between the table's
    indices (k-diffusion's ``DiscreteSchedule.sigma_to_t``), float64. sigma: float64 array
    within [sigma_0, sigma_{T-1}] (the finite part of the table). For a respaced schedule the
    indices are the original ones (``s.timestep_map``), which the model was trained on."""
    tab = schedule_sigmas(s)
    fin = np.isfinite(tab)
    log_tab = -0.5 * np.asarray(s.log_snr, dtype=np.float64)[fin]  # log sigma_t = -log_snr_t / 2
    idx = np.asarray(s.timestep_map, dtype=np.float64)[fin]  # the original indices of a respaced schedule
    return np.interp(np.log(np.asarray(sigma, dtype=np.float64)), log_tab, idx)


def _sde_L(sde: SDE, sigma):
    """L = -2 log m(t): log1p(sigma^2) for VP, 2 asinh(sigma / 2) for sub-VP."""
    if isinstance(sde, SubVPSDE):
        return 2.0 * np.arcsinh(0.5 * sigma)
    return np.log1p(sigma * sigma)


def sigma_to_t_sde(sde: SDE, sigma):
    """The inverse t(sigma) of sigma(t) = s(t)/m(t) for a VP, sub-VP or VE SDE (module
    docstring), float64 of sigma's shape."""
    sigma = np.asarray(sigma, dtype=np.float64)
    if isinstance(sde, VESDE):
        return np.log1p((sigma / sde.sigma_min) ** 2) / (2.0 * math.log(sde.sigma_max / sde.sigma_min))
    if isinstance(sde, VPSDE):  # and SubVPSDE
        L = _sde_L(sde, sigma)
        b0, bd = sde.beta_min, sde.beta_max - sde.beta_min
        # the root of bd/2 t^2 + b0 t - L = 0, in the form without cancellation
        return 2.0 * L / (b0 + np.sqrt(b0 * b0 + 2.0 * bd * L))
    raise TypeError(f"sde must be a VPSDE, SubVPSDE or VESDE; got {type(sde).__name__}")


def t_to_sigma_sde(sde: SDE, t):
    """sigma(t) = s(t)/m(t), the EDM noise level of the SDE at time t (float64)."""
    t = np.asarray(t, dtype=np.float64)
    m, s = sde.marginal_coefs(t)
    if isinstance(sde, VESDE):
        return np.asarray(s, dtype=np.float64)
    if not isinstance(sde, VPSDE):  # SubVPSDE is a VPSDE
        raise TypeError(f"sde must be a VPSDE, SubVPSDE or VESDE; got {type(sde).__name__}")
    lmc = sde._lmc(t)
    if isinstance(sde, SubVPSDE):
        return 2.0 * np.sinh(-lmc)  # (1 - m^2)/m
    return np.sqrt(np.expm1(-2.0 * lmc))  # sqrt(1 - m^2)/m


def _input_scale(kind, sde, sigma):
    """m(sigma) = c_in, float64."""
    if isinstance(sde, SubVPSDE):
        return np.exp(-np.arcsinh(0.5 * sigma))  # m = exp(lmc), sigma = 2 sinh(-lmc)
    if isinstance(sde, VESDE):
        return np.ones_like(sigma)
    return 1.0 / np.sqrt(1.0 + sigma * sigma)  # discrete schedule and VP: m^2 + s^2 = 1


# ----------------------------------------------------------------------------- the denoiser
class Denoiser:
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (EDM eq. 7) around a model F.

    Build with ``Denoiser.from_schedule(model, s, prediction)`` (a discrete-time model
    ``model(x_t, t)``, t an index) or ``Denoiser.from_sde(model, sde, prediction)`` (a
    continuous-time model ``model(x_t, t)``, t in (0, 1]). Call as ``D(x, sigma)`` with x of
    shape (B, ...) (numpy or torch) and sigma a float or an array/tensor of shape (B,); the
    result has x's shape, kind and device in x's compute dtype (float32 for half inputs).
    ``coefficients(sigma)`` returns the float64 (c_skip, c_out, c_in, c_noise).
    ``sigma_min``/``sigma_max`` give the model's range (for ``sigmas_karras`` etc.); a sigma
    outside raises ValueError, or with ``clamp_time=True`` keeps its own preconditioning and
    queries the model at the range's nearest end (module docstring).
    """

    def __init__(self, model, kind: str, prediction: str, *, schedule=None, sde=None, clamp_time: bool = False):
        if not callable(model):
            raise TypeError(f"model must be callable model(x_t, t); got {type(model).__name__}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}; got {prediction!r}")
        self.model = model
        self.kind = kind
        self.prediction = prediction
        self.schedule = schedule
        self.sde = sde
        self.clamp_time = bool(clamp_time)
        if kind == "schedule":
            tab = schedule_sigmas(schedule)
            fin = tab[np.isfinite(tab)]
            if fin.size == 0:
                raise ValueError("the schedule has no finite sigma (every alphas_cumprod is 0)")
            self._table = tab
            self.sigma_min, self.sigma_max = float(fin[0]), float(fin[-1])
            self._lo = float(fin[0])
        else:
            self.sigma_min = float(t_to_sigma_sde(sde, sde.default_eps))
            self.sigma_max = float(t_to_sigma_sde(sde, 1.0))
            self._lo = 0.0

    @classmethod
    def from_schedule(cls, model, s: Schedule, prediction: str = "eps", *, clamp_time: bool = False) -> Denoiser:
        """A discrete-time model ``model(x_t, t)`` trained on schedule ``s`` to predict
        ``prediction`` ("eps", "x0", "v" or "score" of x_t); t is an int64 index of shape (B,)
        when sigma lies on the table, else a float time of x's compute dtype. ``clamp_time``:
        accept any sigma > 0, the model queried at index 0 below the table and T - 1 above it."""
        if not isinstance(s, Schedule):
            raise TypeError(f"s must be a diffmath.schedules.Schedule; got {type(s).__name__}")
        return cls(model, "schedule", prediction, schedule=s, clamp_time=clamp_time)

    @classmethod
    def from_sde(cls, model, sde: SDE, prediction: str = "score", *, clamp_time: bool = False) -> Denoiser:
        """A continuous-time model ``model(x_t, t)`` (t float of shape (B,) in (0, 1], x's
        compute dtype) of a ``VPSDE``, ``SubVPSDE`` or ``VESDE`` predicting ``prediction``:
        "score" (score_sde's score_fn), "eps", "x0" or "v". ``clamp_time``: a sigma above
        sigma(1) queries the model at t = 1."""
        if not isinstance(sde, (VPSDE, VESDE)):
            raise TypeError(f"sde must be a diffmath VPSDE, SubVPSDE or VESDE; got {type(sde).__name__}")
        return cls(model, "sde", prediction, sde=sde, clamp_time=clamp_time)

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        base = self.schedule if self.kind == "schedule" else self.sde
        return f"Denoiser({self.prediction}, {base!r}, sigma in [{self.sigma_min:.4g}, {self.sigma_max:.4g}])"

    # -- the math
    def _check_sigma(self, sig: np.ndarray, native=None):
        """sig: float64 values; ``native``: the same values in the caller's dtype (for the
        upper bound, which a rounded sigma_max may exceed by an ulp)."""
        bad = ~np.isfinite(sig) | (sig <= 0)
        if self.clamp_time:  # any sigma > 0: the model time is clamped (``_times``)
            rng = "(0, inf) (clamp_time=True)"
        elif self.kind == "schedule":
            tab = self._table[np.isfinite(self._table)]
            if native is not None and native.dtype != np.float64:
                tab = tab.astype(native.dtype)
                vals = native
            else:
                vals = sig
            bad |= (vals < tab[0]) | (vals > tab[-1])
            rng = f"[{self.sigma_min:.6g}, {self.sigma_max:.6g}] (the schedule's table)"
        else:
            tol = 1.0 + (4 * np.finfo(native.dtype).eps if native is not None else 1e-15)
            bad |= sig > self.sigma_max * tol
            rng = f"(0, {self.sigma_max:.6g}] (sigma(t) for t in (0, 1])"
        if bad.any():
            v = float(sig[np.argmax(bad)])
            raise ValueError(f"sigma must lie in {rng}; got sigma = {v!r}")

    def _times(self, sig: np.ndarray, native):
        """c_noise: int64 indices when every sigma is on the table, else float64 times."""
        if self.kind == "schedule":
            tab = self._table if native.dtype == np.float64 else self._table.astype(native.dtype)
            k = np.clip(np.searchsorted(tab, native), 0, tab.size - 1)
            if np.all(tab[k] == native):
                return np.asarray(self.schedule.timestep_map, dtype=np.int64)[k]
            return sigma_to_t_schedule(self.schedule, sig)
        return np.minimum(sigma_to_t_sde(self.sde, sig), 1.0)

    def coefficients(self, sigma):
        """(c_skip, c_out, c_in, c_noise) at ``sigma`` (float64 numpy of sigma's shape; c_noise
        int64 when every sigma is on a schedule's table)."""
        native = _as_numpy(sigma)
        sig = native.astype(np.float64)
        self._check_sigma(sig, native)
        m = _input_scale(self.kind, self.sde, sig)
        c_skip, c_out = preconditioning(self.prediction, sig, m)
        return c_skip, c_out, m, self._times(sig, native)

    def __call__(self, x, sigma):
        x = check_float(x, "x")
        B = x.shape[0] if x.ndim else 1
        native = _as_numpy(sigma)
        if native.ndim == 0:
            native = np.full(B, native[()], dtype=native.dtype)
        if native.ndim != 1 or native.shape[0] != B:
            raise ValueError(f"sigma must be a float or have shape (B,) = ({B},); got shape {native.shape}")
        c_skip, c_out, c_in, c_noise = self.coefficients(native)
        dt = compute_dtype(x)
        xc = x if x.dtype == dt else (x.to(dt) if is_tensor(x) else x.astype(dt))
        shape = (B,) + (1,) * (x.ndim - 1)

        def col(c):
            if is_tensor(x):
                return torch.as_tensor(c, device=x.device).to(dt).reshape(shape)
            return np.asarray(c).astype(dt).reshape(shape)

        t = _model_time(c_noise, x, dt)
        F = self.model(col(c_in) * xc, t)
        F = check_like(F, x, "the output of model", "x")
        F = F if F.dtype == dt else (F.to(dt) if is_tensor(F) else F.astype(dt))
        return col(c_skip) * xc + col(c_out) * F


def score_from_denoiser(denoiser, sde: SDE):
    """The score of the SDE's marginal from a denoiser in sigma space: ``score(x_t, t)``.

    At time t of a VP, sub-VP or VE SDE with x_t = m x_0 + s eps (``sde.marginal_coefs``), put
    sigma = s/m (``t_to_sigma_sde``) and x = x_t/m; Tweedie's formula (Efron 2011; Karras et al.
    2022, eq. 3) and the chain rule through x = x_t/m give

        grad_{x_t} log p_t(x_t) = (D(x; sigma) - x) / (sigma^2 m)

    ``denoiser(x, sigma)``: a ``Denoiser`` (or ``GaussianData.denoise``, a guided denoiser, ...),
    called with sigma float64 of shape (B,) in x's kind and device. ``score(x_t, t)``: x_t of
    shape (B, ...), t a float or an array/tensor of shape (B,) in (0, 1] (what ``sample_sde``,
    ``sample_pc`` and ``sample_ode`` pass); returns x_t's shape, kind and device in x_t's
    compute dtype (float32 for half inputs). With this the score-based loops (Euler-Maruyama,
    predictor-corrector, probability-flow ODE) and the sigma-space solvers share one D."""
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable denoiser(x, sigma); got {type(denoiser).__name__}")
    if not isinstance(sde, (VPSDE, VESDE)):
        raise TypeError(f"sde must be a diffmath VPSDE, SubVPSDE or VESDE; got {type(sde).__name__}")

    def score(x_t, t):
        x_t = check_float(x_t, "x_t")
        B = x_t.shape[0] if x_t.ndim else 1
        # SDE time in (0, 1] (the score divides by the marginal std), one per sample or a scalar
        tc = check_time(t, x_t, "t", open_left=True)
        tt = np.broadcast_to(tc.cpu().numpy() if is_tensor(tc) else np.asarray(tc), (B,)).astype(np.float64)
        m, _ = sde.marginal_coefs(tt)
        m = np.asarray(m, dtype=np.float64)
        sigma = np.asarray(t_to_sigma_sde(sde, tt), dtype=np.float64)
        dt = compute_dtype(x_t)
        shape = (B,) + (1,) * (x_t.ndim - 1)
        sig: Array
        if is_tensor(x_t):
            xc: Array = x_t.to(dt)
            sig = torch.as_tensor(sigma, device=x_t.device)

            def col(c):
                return torch.as_tensor(c, device=x_t.device).to(dt).reshape(shape)
        else:
            xc = x_t.astype(dt, copy=False)
            sig = sigma

            def col(c):
                return np.asarray(c).astype(dt).reshape(shape)

        x = xc * col(1.0 / m)  # x = x_t / m
        d = check_like(denoiser(x, sig), x, "the output of denoiser", "x")
        d = d.to(dt) if is_tensor(d) else np.asarray(d).astype(dt, copy=False)
        return (d - x) * col(1.0 / (sigma * sigma * m))  # (D - x) / (sigma^2 m)

    return score


def _as_numpy(sigma) -> np.ndarray:
    if is_tensor(sigma):
        if not sigma.is_floating_point():
            raise TypeError(f"sigma must be floating-point; got dtype {sigma.dtype}")
        v = sigma.detach().cpu()
        return (v.to(torch.float32) if v.dtype in (torch.float16, torch.bfloat16) else v).numpy()
    if isinstance(sigma, (bool, np.bool_)):
        raise TypeError(f"sigma must be a positive float; got {sigma!r}")
    if isinstance(sigma, numbers.Real):
        return np.asarray(float(sigma), dtype=np.float64)
    arr = np.asarray(sigma)
    if arr.dtype.kind != "f":
        raise TypeError(f"sigma must be floating-point; got dtype {arr.dtype}")
    return arr.astype(np.float32) if arr.dtype == np.float16 else arr


def _model_time(c_noise: np.ndarray, x, dt):
    """The model's time argument, shape (B,), in x's kind and device: int64 indices as int64,
    float times in x's compute dtype."""
    integer = c_noise.dtype.kind == "i"
    if is_tensor(x):
        return torch.as_tensor(c_noise, device=x.device) if integer else torch.as_tensor(c_noise).to(dt).to(x.device)
    return c_noise if integer else c_noise.astype(dt)
