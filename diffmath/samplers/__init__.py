"""Samplers for diffusion and score-based models.

Discrete (eps-prediction on a ``Schedule``): ``ddpm_step``/``sample_ddpm`` (Ho et al. 2020),
``ddim_step``/``sample_ddim`` (Song, Meng & Ermon 2021).
Continuous (score on an ``SDE``; Song et al. 2021): ``euler_maruyama_step``/``sample_sde``,
``reverse_diffusion_step``, ``langevin_corrector_step``/``sample_pc``,
``sample_ode`` (scipy ``solve_ivp``), ``heun_step``/``sample_ode_heun``.
Langevin (Song & Ermon 2019): ``langevin_step``, ``annealed_langevin``.

Sigma space (Karras et al. 2022; k-diffusion's convention, on a denoiser D(x; sigma), see
``diffmath.denoiser``): ladders ``sigmas_karras``, ``sigmas_exponential``,
``sigmas_polyexponential``, ``sigmas_vp``, ``sigmas_from_schedule``; solvers ``sample_euler``,
``sample_heun``, ``sample_edm``, ``sample_euler_ancestral``, ``sample_dpmpp_2m``,
``sample_dpmpp_2m_sde``, ``sample_dpmpp_3m_sde``, ``sample_unipc``, ``sample_lms``, each
``(denoiser, x, sigmas, *, generator=None, callback=None, progress=False, **options)``.

Step functions return the new sample only; loops take a model callable, a shape, a
``numpy.random.Generator`` or ``torch.Generator``, ``progress`` (tqdm) and ``callback``.
No loop modifies its inputs, so interrupting one (KeyboardInterrupt) leaves them intact.

Every loop keeps its state in float32 (float64 when given float64) whatever the dtype of x_T,
the model's output or the noise, upcasts a half-precision model output before each update and
returns the state's dtype (``out_dtype=`` rounds once at the end); a model output that is not
finite stops it with a ValueError naming the step and t (docs/samplers.md).
"""

from .ddim import ddim_coefs, ddim_pairs, ddim_step, sample_ddim
from .ddpm import ddpm_std, ddpm_step, sample_ddpm
from .langevin import (
    annealed_langevin,
    annealed_step_sizes,
    corrector_step_size,
    geometric_sigmas,
    langevin_corrector_step,
    langevin_step,
)
from .ode import heun_step, sample_ode, sample_ode_heun
from .sde_solvers import euler_maruyama_step, reverse_diffusion_step, sample_pc, sample_sde, time_grid
from .sigmas import (
    append_zero,
    sigmas_beta,
    sigmas_exponential,
    sigmas_from_schedule,
    sigmas_karras,
    sigmas_polyexponential,
    sigmas_vp,
)
from .solvers import (
    SOLVERS,
    ancestral_step,
    check_sigmas,
    lms_coefficients,
    phi,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_3m_sde,
    sample_edm,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lms,
    sample_unipc,
)

__all__ = [
    "SOLVERS",
    "ancestral_step",
    "append_zero",
    "check_sigmas",
    "lms_coefficients",
    "phi",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde",
    "sample_edm",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lms",
    "sample_unipc",
    "sigmas_exponential",
    "sigmas_from_schedule",
    "sigmas_karras",
    "sigmas_polyexponential",
    "sigmas_beta",
    "sigmas_vp",
    "annealed_langevin",
    "annealed_step_sizes",
    "corrector_step_size",
    "ddim_coefs",
    "ddim_pairs",
    "ddim_step",
    "ddpm_std",
    "ddpm_step",
    "euler_maruyama_step",
    "geometric_sigmas",
    "heun_step",
    "langevin_corrector_step",
    "langevin_step",
    "reverse_diffusion_step",
    "sample_ddim",
    "sample_ddpm",
    "sample_ode",
    "sample_ode_heun",
    "sample_pc",
    "sample_sde",
    "time_grid",
]
