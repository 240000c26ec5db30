"""Classifier-free guidance (Ho & Salimans 2022, "Classifier-free diffusion guidance").

One network eps(x, t, y) is trained on labels y in [0, K) with each label replaced by the
null class K with probability p_uncond (``drop_labels``), so that it is both the conditional
model eps_c = eps(x, t, y) and the unconditional model eps_u = eps(x, t, K). Sampling uses

    eps_s = eps_u + s (eps_c - eps_u)  =  (1 - s) eps_u + s eps_c          (Ho & Salimans 2022, eq. 6)

in diffusers' convention for the scale s: s = 1 is the plain conditional model, s = 0 the
unconditional one, s > 1 extrapolates away from the unconditional prediction (their w is
s - 1). In score terms, grad log p_s(x_t | y) = (1 - s) grad log p(x_t) + s grad log p(x_t | y)
= grad log p(x_t) + s grad log p(y | x_t): guidance by an implicit classifier raised to the
power s.

The combination is written as (1 - s) eps_u + s eps_c, which returns eps_u exactly at s = 0
and eps_c exactly at s = 1 (eps_u + s (eps_c - eps_u) can be an ulp off at s = 1).

Where guidance is applied. At fixed (x_t, t) every parameterization is an affine function
of eps with the same coefficients for both halves (``diffmath.parameterization``):
x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar), v = (eps - sqrt(1 - abar) x_t) / sqrt(abar),
score = -eps / sqrt(1 - abar), and a k-diffusion denoiser D = x - sigma eps. An affine map
z = a x_t + b eps commutes with a combination whose weights (1 - s) and s sum to 1:

    (1 - s) z_u + s z_c = a x_t + b ((1 - s) eps_u + s eps_c),

so guiding eps, x0, v, the score or D gives the same sampler update. ``guided`` converts an
x0 or v network's outputs to eps (``parameterization.eps_from_x0`` / ``eps_from_v``) and
combines there; ``guided_denoiser`` combines denoiser outputs directly.

Guidance rescale (Lin et al. 2023, "Common diffusion noise schedules and sample steps are
flawed", Sec. 3.4, Alg. 2): with std the per-sample standard deviation over all non-batch
dimensions,

    eps_rescaled = eps_s * std(eps_c) / std(eps_s)
    eps_final    = phi eps_rescaled + (1 - phi) eps_s = eps_s (1 - phi + phi std(eps_c) / std(eps_s)).

Unlike the combination, the rescale is not invariant under a change of parameterization (the
std of a x_t + b eps is not proportional to the std of eps). diffmath applies it to eps
for every network (and, equivalently, to x - D for a denoiser: the per-sample factor sigma
cancels in the ratio); diffusers applies it to the raw network output, which is the same
for eps-prediction networks. A sample whose guided prediction is constant (std 0, e.g. an
untrained zero-initialised network, or one-dimensional data) is left as it is.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from ._array import is_tensor, upcast
from .checks import check_float, check_like
from .parameterization import eps_from_v, eps_from_x0
from .schedules import Schedule

__all__ = ["classifier_free_guidance", "rescale_guidance", "guided", "guided_denoiser", "drop_labels", "check_labels"]

PREDICTIONS = ("eps", "score", "x0", "v")


# ----------------------------------------------------------------------------- validation
def _check_scale(scale) -> float:
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale (the guidance scale s) must be a real number >= 0; got {scale!r}")
    s = float(scale)
    if not (math.isfinite(s) and s >= 0):
        raise ValueError(
            f"scale (the guidance scale s) must be finite and >= 0 (0: unconditional, 1: conditional, > 1: "
            f"guided); got scale = {s}"
        )
    return s


def _check_rescale(phi) -> float:
    if isinstance(phi, (bool, np.bool_)) or not isinstance(phi, numbers.Real):
        raise TypeError(f"rescale (the guidance rescale phi) must be a real number in [0, 1]; got {phi!r}")
    p = float(phi)
    if not 0.0 <= p <= 1.0:  # also rejects NaN
        raise ValueError(f"rescale (the guidance rescale phi) must lie in [0, 1]; got rescale = {p}")
    return p


def _check_null_class(null_class, name: str = "null_class") -> int:
    if isinstance(null_class, (bool, np.bool_)) or not isinstance(null_class, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= 1 (the number of classes K); got {null_class!r}")
    if null_class < 1:
        raise ValueError(
            f"{name} must be >= 1 (the number of classes K, the null label); got {name} = {int(null_class)}"
        )
    return int(null_class)


def check_labels(labels, num_classes: int, name: str = "label", allow_null: bool = False):
    """Validate class labels: a python int, or an integer numpy array / torch tensor of shape
    (B,), each in [0, num_classes) (or [0, num_classes] with ``allow_null``: num_classes is the
    null class). Returns a python int or an int64 numpy array (B,) (a tensor is copied to the
    CPU once, here)."""
    K = _check_null_class(num_classes, "num_classes")
    hi = K + 1 if allow_null else K
    rng = f"[0, {K}]" if allow_null else f"[0, {K})"
    extra = (
        f" ({K} is the null class)" if allow_null else f" ({K} classes; the null class {K} is the unconditional half)"
    )
    if isinstance(labels, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer class index or an integer array of shape (B,); got {labels!r}")
    if isinstance(labels, numbers.Integral):
        v = int(labels)
        if not 0 <= v < hi:
            raise ValueError(f"{name} must lie in {rng}{extra}; got {name} = {v}")
        return v
    if is_tensor(labels):
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer class indices; got dtype {labels.dtype}")
        arr = labels.detach().cpu().numpy()
    elif isinstance(labels, (np.ndarray, list, tuple)):
        arr = np.asarray(labels)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"{name} must hold integer class indices; got dtype {arr.dtype}")
    else:
        raise TypeError(f"{name} must be an int or an integer array/tensor of shape (B,); got {type(labels).__name__}")
    if arr.ndim == 0:
        return check_labels(int(arr), K, name, allow_null)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be an int or have shape (B,); got shape {arr.shape}")
    arr = arr.astype(np.int64)
    if arr.size:
        lo, top = int(arr.min()), int(arr.max())
        if lo < 0 or top >= hi:
            raise ValueError(f"{name} must lie in {rng}{extra}; got {name} = {lo if lo < 0 else top}")
    return arr


# ----------------------------------------------------------------------------- the math
def _per_sample_std(z):
    """Population std over every non-batch dimension, shape (B, 1, ..., 1)."""
    B = z.shape[0]
    shape = (B,) + (1,) * (z.ndim - 1)
    if is_tensor(z):
        return z.reshape(B, -1).std(dim=1, correction=0).reshape(shape)
    return np.asarray(z).reshape(B, -1).std(axis=1).reshape(shape)


def rescale_guidance(guided_pred, cond, phi: float):
    """Guidance rescale (Lin et al. 2023, Sec. 3.4, Alg. 2):

        out = phi * guided * std(cond) / std(guided) + (1 - phi) * guided
            = guided * (1 - phi + phi * std(cond) / std(guided)),

    std per sample over all non-batch dimensions (population std; the ratio is the same for
    the unbiased one). A sample with std(guided) = 0 is returned unchanged. guided_pred, cond:
    arrays (B, ...) of one kind, device and shape; phi in [0, 1]. Returns the compute dtype
    (float32 for half-precision inputs).
    """
    phi = _check_rescale(phi)
    guided_pred = check_float(guided_pred, "guided_pred")
    cond = check_like(cond, guided_pred, "cond", "guided_pred")
    return _rescale(upcast(guided_pred), upcast(cond), phi)


def _rescale(g, c, phi: float):
    if phi == 0.0:
        return g
    sd_g, sd_c = _per_sample_std(g), _per_sample_std(c)
    ratio: torch.Tensor | np.ndarray
    if is_tensor(g):
        ratio = torch.where(sd_g > 0, sd_c / torch.where(sd_g > 0, sd_g, torch.ones_like(sd_g)), torch.ones_like(sd_g))
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(sd_g > 0, sd_c / np.where(sd_g > 0, sd_g, 1.0), 1.0)
    return g * ((1.0 - phi) + phi * ratio)


def classifier_free_guidance(cond, uncond, scale: float, rescale: float = 0.0):
    """eps_s = (1 - s) eps_u + s eps_c   (Ho & Salimans 2022, eq. 6, in diffusers' scale s),
    then the guidance rescale ``phi = rescale`` (``rescale_guidance``) when rescale > 0.

    cond, uncond: the conditional and unconditional predictions (B, ...), one kind, device and
    shape; scale s >= 0 (0: uncond exactly, 1: cond exactly); rescale in [0, 1]. Returns the
    compute dtype of ``cond`` (float32 for half precision).
    """
    s = _check_scale(scale)
    phi = _check_rescale(rescale)
    cond = check_float(cond, "cond")
    uncond = check_like(uncond, cond, "uncond", "cond")
    return _combine(upcast(cond), upcast(uncond), s, phi)


def _combine(c, u, s: float, phi: float):
    g = (1.0 - s) * u + s * c
    return _rescale(g, c, phi)


# ----------------------------------------------------------------------------- batching
def _cat(a, b):
    return torch.cat([a, b]) if is_tensor(a) else np.concatenate([a, b])


def _twice(v, batch: int):
    """A per-sample argument (t or sigma) for the doubled batch: (B,) -> (2B,); a scalar as is."""
    if (is_tensor(v) or isinstance(v, np.ndarray)) and v.ndim >= 1:
        if v.shape[0] != batch:
            raise ValueError(f"t/sigma must be a scalar or have shape (B,) = ({batch},); got shape {tuple(v.shape)}")
        return _cat(v, v)
    return v


class _Labels:
    """The requested labels and the null label for a batch of x's kind and device."""

    def __init__(self, label, null_class: int):
        self.label = check_labels(label, null_class)
        self.null = null_class
        self._cache: dict[tuple[str, int], np.ndarray | torch.Tensor] = {}

    def pair(self, x):
        B = x.shape[0]
        if isinstance(self.label, np.ndarray) and self.label.shape[0] != B:
            raise ValueError(
                f"label has {self.label.shape[0]} entries but x holds a batch of {B}; give one label per sample "
                "or an int"
            )
        key = (str(x.device) if is_tensor(x) else "numpy", B)
        if key not in self._cache:
            y = np.full(B, self.label, dtype=np.int64) if isinstance(self.label, int) else self.label
            both = np.concatenate([y, np.full(B, self.null, dtype=np.int64)])
            self._cache = {key: torch.as_tensor(both, device=x.device) if is_tensor(x) else both}
        return self._cache[key]


def _null_class_of(model, null_class):
    """The null label: ``null_class`` if given, else the network's ``num_classes``."""
    K = getattr(model, "num_classes", None)
    if null_class is None:
        if K is None:
            raise TypeError(
                "pass null_class (the number of classes K; label K is the unconditional model): the model has no "
                "num_classes attribute"
            )
        if isinstance(K, numbers.Integral) and not isinstance(K, bool) and K == 0:
            raise ValueError("the model is unconditional (num_classes = 0); guidance needs a class-conditional model")
        return _check_null_class(K, "model.num_classes")
    null_class = _check_null_class(null_class)
    if isinstance(K, numbers.Integral) and not isinstance(K, bool) and K != null_class:
        raise ValueError(f"null_class = {null_class} disagrees with the model's num_classes = {int(K)}")
    return null_class


def _split(out, x, name: str):
    """The model's output on the doubled batch, checked and split into (cond, uncond)."""
    B = x.shape[0]
    want = (2 * B,) + tuple(x.shape[1:])
    if not (is_tensor(out) or isinstance(out, np.ndarray)) or is_tensor(out) != is_tensor(x):
        kind = "a torch tensor" if is_tensor(x) else "a numpy array"
        raise TypeError(f"{name} must return {kind} like x; got {type(out).__name__}")
    if tuple(out.shape) != want:
        raise ValueError(
            f"{name} returned shape {tuple(out.shape)} for the doubled batch [cond; uncond]; expected {want} (x's "
            "shape with twice the batch; slice off any learned-variance channels in the model)"
        )
    return out[:B], out[B:]


def guided(
    model, label, scale: float, *, rescale: float = 0.0, prediction: str = "eps", schedule=None, null_class=None
):
    """Classifier-free guidance as an eps callable: ``eps_model(x, t)`` for the samplers
    (``sample_ddpm``, ``sample_ddim``; with ``prediction="score"``, a score callable for
    ``sample_sde``, ``sample_pc``, ``sample_ode``).

    model(x, t, y): a class-conditional network (``diffmath.nn.UNet`` / ``MLPDenoiser`` with
    num_classes = K, or any callable) whose label K is the unconditional model.
    label: the requested class, an int or an integer array/tensor (B,), in [0, K).
    scale: s >= 0, eps_s = eps_u + s (eps_c - eps_u) (diffusers' convention; module docstring).
    rescale: phi in [0, 1], Lin et al. (2023)'s guidance rescale on eps (0: off).
    prediction: what the network outputs. "eps" and "score" are combined as they are (the
    score is -eps / sigma_t, the same combination at fixed t); "x0" and "v" are converted to
    eps first with ``parameterization.eps_from_x0`` / ``eps_from_v`` on ``schedule`` (a
    ``Schedule``; t must then be the integer index), and the result is eps.
    null_class: K; by default the model's ``num_classes``.

    Each call evaluates the model ONCE on the doubled batch [x; x] with labels [label; K] (t
    repeated), as GLIDE and diffusers do, and returns (1 - s) out_u + s out_c (rescaled) of
    x's shape in the compute dtype of the model output.
    """
    if not callable(model):
        raise TypeError(f"model must be callable model(x, t, y); got {type(model).__name__}")
    s = _check_scale(scale)
    phi = _check_rescale(rescale)
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}; got {prediction!r}")
    if prediction in ("x0", "v") and not isinstance(schedule, Schedule):
        raise TypeError(
            f"prediction = {prediction!r} needs schedule (the diffmath Schedule the network was trained on) to convert "
            f"to eps; got {type(schedule).__name__}"
        )
    labels = _Labels(label, _null_class_of(model, null_class))
    to_eps = {"x0": eps_from_x0, "v": eps_from_v}.get(prediction)

    def eps_model(x, t):
        x = check_float(x, "x")
        c, u = _split(model(_cat(x, x), _twice(t, x.shape[0]), labels.pair(x)), x, "model")
        if to_eps is not None:
            c, u = to_eps(schedule, x, t, c), to_eps(schedule, x, t, u)
        return _combine(upcast(c), upcast(u), s, phi)

    return eps_model


def guided_denoiser(denoiser, label, scale: float, *, rescale: float = 0.0, null_class=None):
    """Classifier-free guidance for a denoiser (k-diffusion's convention, x = x0 + sigma n):
    ``denoiser(x, sigma, y) -> D`` becomes ``D_s(x, sigma)`` for the sigma-space solvers.

        D_s = (1 - s) D_u + s D_c

    Equivalent to guiding eps at the same sigma: with D = x - sigma eps,
    (1 - s) (x - sigma eps_u) + s (x - sigma eps_c) = x - sigma ((1 - s) eps_u + s eps_c),
    because the weights sum to 1. The rescale (phi = ``rescale``) is applied to eps as in
    ``guided``; since sigma eps = x - D and sigma is one number per sample, it cancels in the
    std ratio:  D_final = x - (x - D_s) (1 - phi + phi std(x - D_c) / std(x - D_s)).

    label, scale, null_class: as in ``guided``. sigma: a scalar or shape (B,), repeated for
    the doubled batch [x; x] evaluated in one call.
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable denoiser(x, sigma, y); got {type(denoiser).__name__}")
    s = _check_scale(scale)
    phi = _check_rescale(rescale)
    labels = _Labels(label, _null_class_of(denoiser, null_class))

    def guided_d(x, sigma):
        x = check_float(x, "x")
        c, u = _split(denoiser(_cat(x, x), _twice(sigma, x.shape[0]), labels.pair(x)), x, "denoiser")
        c, u = upcast(c), upcast(u)
        d = (1.0 - s) * u + s * c
        if phi == 0.0:
            return d
        xc = x.to(d.dtype) if is_tensor(d) else np.asarray(x, dtype=d.dtype)
        return xc - _rescale(xc - d, xc - c, phi)

    return guided_d


# ----------------------------------------------------------------------------- training
def drop_labels(y, uncond_prob: float, null_class: int, generator):
    """Label dropout for classifier-free guidance training (Ho & Salimans 2022, Alg. 1):
    each label is replaced by the null class K with probability p = ``uncond_prob``,
    independently: y'_i = K if u_i < p else y_i, u_i ~ U[0, 1).

    y: integer numpy array or torch tensor (B,), values in [0, K] (K: already null).
    generator: a numpy.random.Generator for numpy labels, a torch.Generator for tensors (its
    uniforms are drawn on the generator's device and moved to y's). Exactly B uniforms are
    drawn whatever p, so the stream does not depend on p. Returns new labels of y's kind,
    dtype and device (y is not modified).
    """
    K = _check_null_class(null_class)
    if isinstance(uncond_prob, (bool, np.bool_)) or not isinstance(uncond_prob, numbers.Real):
        raise TypeError(f"uncond_prob must be a probability in [0, 1]; got {uncond_prob!r}")
    p = float(uncond_prob)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"uncond_prob must lie in [0, 1]; got uncond_prob = {p}")
    if not (is_tensor(y) or isinstance(y, np.ndarray)):
        raise TypeError(f"y must be an integer numpy array or torch tensor of shape (B,); got {type(y).__name__}")
    if y.ndim != 1:
        raise ValueError(f"y must have shape (B,); got shape {tuple(y.shape)}")
    check_labels(y, K, "y", allow_null=True)
    B = y.shape[0]
    if is_tensor(y):
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator for tensor labels; got {type(generator).__name__}")
        u = torch.rand(B, generator=generator, device=generator.device, dtype=torch.float64).to(y.device)
        return torch.where(u < p, torch.full_like(y, K), y)
    if not isinstance(generator, np.random.Generator):
        raise TypeError(f"generator must be a numpy.random.Generator for numpy labels; got {type(generator).__name__}")
    u = generator.random(B)
    return np.where(u < p, np.asarray(K, dtype=y.dtype), y)
