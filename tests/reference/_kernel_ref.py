"""Independent float64 references for the kernel tests, written from the equations (numpy only,
no diffmath code): the schedule tables by plain products, the four sampler updates, and the
Philox4x32-10 stream with its Box-Muller transform."""

import numpy as np

# ----------------------------------------------------------------------------- schedule tables


def tables(betas):
    """abar by cumulative product and every table the kernels use, float64, from the betas."""
    b = np.asarray(betas, dtype=np.float64)
    abar = np.cumprod(1.0 - b)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = b * (1.0 - abar_prev) / (1.0 - abar)
    if b.size > 1:
        log_var_clipped = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
    else:
        log_var_clipped = np.log(b)
    return dict(
        betas=b,
        abar=abar,
        abar_prev=abar_prev,
        coef1=b * np.sqrt(abar_prev) / (1.0 - abar),
        coef2=(1.0 - abar_prev) * np.sqrt(1.0 - b) / (1.0 - abar),
        log_var_clipped=log_var_clipped,
    )


def per_sample(c, x):
    c = np.asarray(c, dtype=np.float64)
    return c.reshape((-1,) + (1,) * (x.ndim - 1)) if c.ndim else c


def q_sample(betas, x0, t, eps):
    tb = tables(betas)
    return per_sample(np.sqrt(tb["abar"][t]), x0) * x0 + per_sample(np.sqrt(1.0 - tb["abar"][t]), x0) * eps


def ddpm_step(betas, x_t, t, eps, z, variance="small", clip_x0=None):
    """DDPM Alg. 2 with the posterior mean (DDPM eq. 7) and no noise at t = 0."""
    tb = tables(betas)
    t = np.asarray(t)
    ab = per_sample(tb["abar"][t], x_t)
    x0 = x_t / np.sqrt(ab) - np.sqrt(1.0 / ab - 1.0) * eps
    if clip_x0 is not None:
        x0 = np.clip(x0, -clip_x0, clip_x0)
    mean = per_sample(tb["coef1"][t], x_t) * x0 + per_sample(tb["coef2"][t], x_t) * x_t
    std = np.exp(0.5 * tb["log_var_clipped"][t]) if variance == "small" else np.sqrt(tb["betas"][t])
    std = np.where(t == 0, 0.0, std)
    return mean + per_sample(std, x_t) * z


def ddim_step(betas, x_t, t, t_prev, eps, z, eta=0.0):
    """DDIM eq. 12 with sigma from eq. 16, abar_prev = 1 at t_prev = -1 (naive float64 forms)."""
    tb = tables(betas)
    t, t_prev = np.asarray(t), np.asarray(t_prev)
    a_t = tb["abar"][t]
    a_p = np.where(t_prev >= 0, tb["abar"][np.maximum(t_prev, 0)], 1.0)
    sigma = eta * np.sqrt((1.0 - a_p) / (1.0 - a_t)) * np.sqrt(1.0 - a_t / a_p)
    a_t, a_p, sigma = (per_sample(v, x_t) for v in (a_t, a_p, sigma))
    x0 = (x_t - np.sqrt(1.0 - a_t) * eps) / np.sqrt(a_t)
    return np.sqrt(a_p) * x0 + np.sqrt(np.maximum(1.0 - a_p - sigma**2, 0.0)) * eps + sigma * z


def vp_coefs(t, beta_min=0.1, beta_max=20.0):
    """VP SDE (Song et al. 2021, eq. 11): a(t) = -beta(t)/2, g(t) = sqrt(beta(t))."""
    beta = beta_min + np.asarray(t, dtype=np.float64) * (beta_max - beta_min)
    return -0.5 * beta, np.sqrt(beta)


def subvp_coefs(t, beta_min=0.1, beta_max=20.0):
    """sub-VP (eq. 12): g(t)^2 = beta(t) (1 - exp(-2 int_0^t beta))."""
    t = np.asarray(t, dtype=np.float64)
    beta = beta_min + t * (beta_max - beta_min)
    integral = beta_min * t + 0.5 * (beta_max - beta_min) * t * t
    return -0.5 * beta, np.sqrt(beta * (1.0 - np.exp(-2.0 * integral)))


def ve_coefs(t, sigma_min=0.01, sigma_max=50.0):
    """VE (eq. 9): a = 0, g(t) = sigma(t) sqrt(2 log(sigma_max / sigma_min))."""
    t = np.asarray(t, dtype=np.float64)
    sigma = sigma_min * (sigma_max / sigma_min) ** t
    return 0.0 * t, sigma * np.sqrt(2.0 * np.log(sigma_max / sigma_min))


def euler_maruyama_step(coefs, x, t, dt, score, z):
    a, g = coefs(t)
    a, g = per_sample(a, x), per_sample(g, x)
    return x + (a * x - g * g * score) * dt + g * np.sqrt(-dt) * z


def langevin_step(x, score, h, z):
    h = per_sample(h, x)
    return x + 0.5 * h * score + np.sqrt(h) * z


def rel_err(out, ref, mag=None):
    """||out - ref|| / ||ref||, or with ``mag`` (the sum of the update's terms in absolute value,
    ``magnitude``) ||out - ref|| / max(||ref||, ||mag||): a float32 affine update a x + b y + c z
    is accurate to a few float32 ulps of |a x| + |b y| + |c z|, which is ||ref|| unless the
    terms cancel. (The thorough hypothesis profile found a one-element q_sample whose terms
    cancel to 0.0065 from magnitude ~1: 1.4e-6 off relative to the result, 5e-8 relative to
    the terms.)"""
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    den = np.linalg.norm(ref)
    if mag is not None:
        den = max(den, np.linalg.norm(np.asarray(mag, dtype=np.float64)))
    return np.linalg.norm(out - ref) / (den if den > 0 else 1.0)


def magnitude(step, x, y, *rest):
    """The update's terms summed in absolute value, from a reference ``step(x, y, *rest)`` that
    is affine in x, y and the noise (last argument) with coefficients of x and of the noise
    >= 0: the larger of step(|x|, |y|, ..., |z|) and step(|x|, -|y|, ..., |z|) is
    |c_x| |x| + |c_y| |y| + |c_z| |z| whatever the sign of c_y (DDIM's folded eps coefficient
    takes either; for DDPM pass the step without its clip: the clip passes on x0's error)."""
    *args, z = rest
    a = step(np.abs(x), np.abs(y), *args, np.abs(z))
    b = step(np.abs(x), -np.abs(y), *args, np.abs(z))
    return np.maximum(a, b)


# ----------------------------------------------------------------------------- Philox stream
_M32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Salmon et al. 2011, Random123) on uint64 numpy arrays holding uint32 values."""
    c = [np.asarray(v, dtype=np.uint64) & _M32 for v in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(k0) & _M32, np.uint64(k1) & _M32
    mA, mB = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    wA, wB = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
    for _ in range(10):
        pA, pB = mA * c[0], mB * c[2]  # < 2**64: exact in uint64
        c = [
            ((pB >> np.uint64(32)) ^ c[1] ^ k0) & _M32,
            pB & _M32,
            ((pA >> np.uint64(32)) ^ c[3] ^ k1) & _M32,
            pA & _M32,
        ]
        k0, k1 = (k0 + wA) & _M32, (k1 + wB) & _M32
    return c


def stream_uint32(seed, offset, n):
    """The four uint32 of each Philox call covering draws [offset, offset + n): returns
    (r, first) with r of shape (calls, 4) and first = offset - 4 * first counter."""
    c_first, c_last = offset // 4, (offset + n - 1) // 4
    ctr = np.arange(c_first, c_last + 1, dtype=np.uint64)
    r = philox4x32_10(ctr & _M32, ctr >> np.uint64(32), 0, 0, seed & 0xFFFFFFFF, seed >> 32)
    return np.stack(r, axis=1), offset - 4 * c_first


def stream_normal(seed, offset, n):
    """Draws [offset, offset + n) of the kernels' N(0, 1) stream, Box-Muller in float64:
    u = r0 2**-32 + 2**-33, theta = 2 pi int32(r1) 2**-32, lanes (rad cos, rad sin, ...)."""
    r, first = stream_uint32(seed, offset, n)
    r = r.astype(np.float64)

    def bm(a, b):
        u = a * 2.0**-32 + 2.0**-33
        s = np.where(b >= 2.0**31, b - 2.0**32, b)
        theta = 2.0 * np.pi * s * 2.0**-32
        rad = np.sqrt(-2.0 * np.log(u))
        return rad * np.cos(theta), rad * np.sin(theta)

    n0, n1 = bm(r[:, 0], r[:, 1])
    n2, n3 = bm(r[:, 2], r[:, 3])
    return np.stack([n0, n1, n2, n3], axis=1).reshape(-1)[first : first + n]


def tl_randn_reference(seed, offset, n):
    """Triton's own tl.randn(seed, offset + i) (triton/language/random.py), reproduced: lanes
    0 and 1 of counter offset + i, a 31-bit uniform (sign folded) clamped at 1e-7, Box-Muller,
    float32 like the kernel."""
    ctr = np.arange(offset, offset + n, dtype=np.uint64)
    r = philox4x32_10(ctr & _M32, ctr >> np.uint64(32), 0, 0, seed & 0xFFFFFFFF, seed >> 32)

    def uniform(x):
        xi = x.astype(np.uint32).view(np.int32)
        xi = np.where(xi < 0, ~xi, xi)
        return xi.astype(np.float32) * np.float32(4.6566127342e-10)

    u1 = np.maximum(np.float32(1e-7), uniform(r[0]))
    u2 = uniform(r[1])
    return np.sqrt(np.float32(-2.0) * np.log(u1)) * np.cos(np.float32(6.283185307179586) * u2)
