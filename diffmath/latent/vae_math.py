"""The VAE's objective (Kingma & Welling 2014; Burda et al. 2016): the KL to the prior, the
discretised reconstruction likelihood, the training loss, the ELBO in bits/dim and the IWAE bound.
Pure functions of a ``diffmath.nn.vae.VAE`` and its inputs; ``diffmath.latent`` gives the overview.

The VAE has a diagonal Gaussian posterior q_phi(z | x) = N(mu_phi(x), diag(sigma_phi(x)^2)), the
prior p(z) = N(0, I) and a Gaussian decoder N(m_theta(z), s_theta(z)^2) per pixel, *discretised
onto the data's grid*: for data on ``bins`` levels in [-1, 1] (17 for the 8x8 digits, 256 for
8-bit images) p_theta(x | z) is the probability of x's bin,
``gaussian.discretized_gaussian_log_likelihood(x, m, log s, bins)`` (DDPM eq. 13 with exact normal
CDFs), so log p_theta(x | z) <= 0 and the ELBO is a bound on a true log-probability of the
discrete data. It is trained on

    loss(x) = -E_q[log p_theta(x | z)] + beta * KL(q_phi(z | x) || N(0, I))

with one reparameterised sample z = mu + sigma * eps (Kingma & Welling 2014, eq. 10) and the
KL in closed form from ``gaussian.normal_kl(mu, log sigma^2, 0, 0)`` (summed over the latent
dimensions; no second copy of the formula). For beta = 1 the loss is the negative ELBO
(Kingma & Welling eq. 3); ``elbo`` reports it in bits/dim for any beta:

    ELBO(x) = E_q[log p_theta(x | z)] - KL(q || p) <= log p_theta(x),
    bits/dim = -ELBO / (D ln 2),  D = C H W.

``iwae_bound`` is the importance-weighted bound of Burda et al. (2016),
log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k | x), z_k ~ q: ELBO <= IWAE_K <= log p(x), and
IWAE_K -> log p(x) as K grows.
"""

from __future__ import annotations

import math

import torch

from ..gaussian import discretized_gaussian_log_likelihood, normal_kl, normal_log_prob
from ..losses import LN2
from ..nn.vae import VAE

__all__ = ["kl_to_standard_normal", "reconstruction_log_likelihood", "vae_loss", "elbo", "iwae_bound"]


def _per_sample_sum(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).sum(dim=1)


def kl_to_standard_normal(mean, logvar) -> torch.Tensor:
    """KL(N(mean, diag(e^logvar)) || N(0, I)) per sample, in nats, summed over the latent dims:
    ``gaussian.normal_kl(mean, logvar, 0, 0)`` elementwise, then summed. (B, ...) -> (B,)."""
    return _per_sample_sum(normal_kl(mean, logvar, 0.0, 0.0))


def reconstruction_log_likelihood(x, mean, log_scale, bins: int | None) -> torch.Tensor:
    """log p_theta(x | z) per sample, in nats, summed over the pixels.

    ``bins`` an integer: data on the grid of ``bins`` levels in [-1, 1], the discretised Gaussian
    ``gaussian.discretized_gaussian_log_likelihood(x, mean, log_scale, bins)`` (a probability,
    <= 0). ``bins=None``: continuous data, the Gaussian density ``gaussian.normal_log_prob(x,
    mean, 2 log_scale)``. x, mean, log_scale: (B, C, H, W) -> (B,).
    """
    if bins is None:
        return _per_sample_sum(normal_log_prob(x, mean, 2.0 * log_scale))
    return _per_sample_sum(discretized_gaussian_log_likelihood(x, mean, log_scale, bins=int(bins)))


def vae_loss(vae: VAE, x: torch.Tensor, noise: torch.Tensor, bins: int | None, beta: float = 1.0):
    """The training loss, nats per dimension, mean over the batch:

    loss = mean_B [ -log p_theta(x | z) + beta KL(q_phi(z | x) || N(0, I)) ] / D,
    z = mean + exp(logvar / 2) * noise (one reparameterised sample per image).

    Returns (loss, parts) with parts (detached, per-sample means): ``nll`` and ``kl`` in nats
    per image, ``elbo_bpd`` = (nll + kl) / (D ln 2) (the beta = 1 bound, whatever beta).
    """
    z, mean, logvar, dmean, dlog_scale = vae(x, noise)
    nll = -reconstruction_log_likelihood(x, dmean, dlog_scale, bins)
    kl = kl_to_standard_normal(mean, logvar)
    D = x[0].numel()
    loss = (nll + beta * kl).mean() / D
    with torch.no_grad():
        parts = {"nll": float(nll.mean()), "kl": float(kl.mean()), "elbo_bpd": float((nll + kl).mean()) / (D * LN2)}
    return loss, parts


@torch.no_grad()
def elbo(vae: VAE, x, bins: int | None, *, samples: int = 1, generator: torch.Generator | None = None):
    """ELBO(x) = E_q[log p(x | z)] - KL(q(z | x) || N(0, I)) per image, estimated with ``samples``
    reparameterised draws for the expectation (the KL is exact). Returns a dict of (B,) float64
    tensors: ``elbo`` (nats), ``bpd`` (= -elbo / (D ln 2)), ``recon`` (E log p(x|z), nats), ``kl``."""
    x = torch.as_tensor(x)
    mean, logvar = vae.encode(x)
    kl = kl_to_standard_normal(mean, logvar).double()
    rec = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for _ in range(samples):
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        dm, dls = vae.decode(vae.reparameterize(mean, logvar, noise))
        rec += reconstruction_log_likelihood(x, dm, dls, bins).double()
    rec /= samples
    e = rec - kl
    D = x[0].numel()
    return {"elbo": e, "bpd": -e / (D * LN2), "recon": rec, "kl": kl}


@torch.no_grad()
def iwae_bound(vae: VAE, x, bins: int | None, k: int, *, generator: torch.Generator | None = None, chunk: int = 1024):
    """The importance-weighted bound (Burda, Grosse & Salakhutdinov 2016, eq. 8), per image, nats:

    IWAE_K(x) = log (1/K) sum_{k=1..K} p_theta(x | z_k) p(z_k) / q_phi(z_k | x),  z_k ~ q_phi(z | x),

    with log p(z) and log q(z | x) from ``gaussian.normal_log_prob``. E[IWAE_1] = ELBO and
    ELBO <= E[IWAE_K] <= E[IWAE_{K+1}] <= log p(x). x: (B, C, H, W) -> (B,) float64."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (the number of importance samples) must be a positive integer; got {k!r}")
    x = torch.as_tensor(x)
    mean, logvar = vae.encode(x)
    out = []
    for i in range(x.shape[0]):
        m, lv, xi = mean[i : i + 1], logvar[i : i + 1], x[i : i + 1]
        logw = []
        for a in range(0, k, chunk):
            n = min(chunk, k - a)
            noise = torch.randn((n,) + tuple(m.shape[1:]), generator=generator, device=m.device, dtype=m.dtype)
            z = vae.reparameterize(m.expand(n, *m.shape[1:]), lv.expand(n, *lv.shape[1:]), noise)
            dm, dls = vae.decode(z)
            lp_x = reconstruction_log_likelihood(xi.expand(n, *xi.shape[1:]), dm, dls, bins).double()
            lp_z = _per_sample_sum(normal_log_prob(z, 0.0, 0.0)).double()
            lq_z = _per_sample_sum(normal_log_prob(z, m, lv)).double()
            logw.append(lp_x + lp_z - lq_z)
        lw = torch.cat(logw)
        out.append(torch.logsumexp(lw, 0) - math.log(k))
    return torch.stack(out)
