"""The ``diffmath`` command line: train | sample | evaluate | demo | compare-latent | verify | bench.

Run ``diffmath COMMAND --help`` for every option. ``--latent`` (train, sample, demo) switches to
latent diffusion (``diffmath.latent``; docs/latent.md); ``evaluate`` and ``sample`` recognise a
latent run directory (it holds latent.json) by themselves. Errors in the input (a bad flag value, a
missing data folder, an ``--out`` that exists, a checkpoint from another configuration or
not ours, an ``--out`` that another diffmath process is writing into, a model that gives
non-finite samples, running out of memory) print one line ``diffmath COMMAND: error: ...`` and
exit with status 2 (``DIFFMATH_DEBUG=1`` shows the traceback instead). An interrupted ``train``
(Ctrl-C, SIGTERM) writes a checkpoint and exits with 130.

Folders: every command that writes into a folder locks it for its duration and lists the files it
writes in the folder's ``.diffmath-run`` marker; ``--overwrite`` deletes only those
(``diffmath.pipeline.rundir``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from .pipeline.demo import DEMO_OUT, run_demo
from .pipeline.generate import DEFAULT_LADDER, LADDERS

__all__ = ["main", "build_parser", "train_config_from_args", "run_demo"]

LATENT_DEMO_OUT = Path("runs/demo-latent")


def __getattr__(name):
    # ``cli.DEMO_CONFIG`` was the demo recipe's old home; it lives in ``diffmath.pipeline.config`` now
    # (imports point downward), read lazily so that ``diffmath --help`` does not import torch.
    if name == "DEMO_CONFIG":
        from .pipeline.config import DEMO_CONFIG

        return DEMO_CONFIG
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and appends "(default: X)" where the help does not
    already say and X is not None/False."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if (
            d is not None
            and d is not argparse.SUPPRESS
            and action.nargs != 0
            and "default" not in h
            and action.option_strings
        ):
            h += " (default: %(default)s)"
        return h


def _checked(convert, ok, expected: str, expected_value: str | None = None):
    """An argparse ``type``: ``convert(s)`` that must satisfy ``ok``; the error says
    "expected <expected>; got ..." (``expected_value`` for a parsed value that fails ``ok``)."""

    def parse(s: str):
        try:
            v = convert(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}; got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected_value or expected}; got {v}")
        return v

    parse.__name__ = convert.__name__
    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _checked(float, lambda v: 0 < v < float("inf"), "a positive number", "a positive finite number")
_nonneg_float = _checked(float, lambda v: 0 <= v < float("inf"), "a number >= 0", "a finite number >= 0")


def _int_list(s: str) -> tuple:
    try:
        v = tuple(int(p) for p in s.replace(" ", "").split(",") if p)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,2; got {s!r}") from None
    if any(x < 0 for x in v):
        raise argparse.ArgumentTypeError(f"expected non-negative integers; got {s!r}")
    return v


def _float_list(s: str) -> tuple:
    try:
        v = tuple(float(p) for p in s.replace(" ", "").split(",") if p)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0,1,2,3,5; got {s!r}") from None
    if not v or any(not (x >= 0 and x < float("inf")) for x in v):
        raise argparse.ArgumentTypeError(f"expected finite numbers >= 0; got {s!r}")
    return v


def _device(s: str) -> str:
    if s in ("auto", "cpu", "cuda") or s.startswith("cuda:"):
        return s
    raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or auto; got {s!r}")


MAX_SEED = (
    2**63 - 1
)  # torch's seed is a 64-bit integer; diffmath.pipeline.config.MAX_SEED (not imported: no torch for --help)
_seed = _checked(int, lambda v: 0 <= v <= MAX_SEED, f"an integer in [0, 2**63 - 1] = [0, {MAX_SEED}]")


def _threads(s: str) -> int:
    cores = os.cpu_count() or 1
    return _checked(
        int,
        lambda v: 0 <= v <= cores,
        f"an integer in [0, {cores}] (0: auto; at most the {cores} CPUs of this machine)",
    )(s)


_threads.__name__ = "int"


def _threads_flag(p):
    p.add_argument(
        "--threads",
        type=_threads,
        default=0,
        help="CPU threads for torch, at most the number of CPUs "
        "(0: auto = torch's default, one per core, but 1 when the 1-minute load average shows other work on "
        "the cores: OpenMP's spinning threads slow down many-fold on busy cores)",
    )


def _trust_flag(p, what: str):
    p.add_argument(
        "--trust-unverified",
        action="store_true",
        help=f"{what} a checkpoint whose weights cannot be "
        "verified: a .safetensors without its JSON sidecar, or a sidecar without weights_sha256 (refused "
        "otherwise). Weights that do not match a SHA-256 are refused even so",
    )


def _device_flag(p, default="auto", help="cpu, cuda or auto"):
    p.add_argument("--device", type=_device, default=default, help=help)


def _progress_and_threads(p, help="no progress bar"):
    """--no-progress and --threads, the last options of every command that runs a model but train."""
    p.add_argument("--no-progress", dest="progress", action="store_false", help=help)
    _threads_flag(p)


def set_threads(n: int) -> int:
    """Apply --threads (see its help); returns the thread count in use."""
    import torch

    if n:
        torch.set_num_threads(n)
        return n
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:  # pragma: no cover - no load average on this platform
        busy = 0.0
    if cores > 1 and busy >= 0.75:
        torch.set_num_threads(1)
    return torch.get_num_threads()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diffmath",
        description="diffmath: the mathematics of diffusion models, exact, checked and fast.\n"
        "Train a denoiser on the embedded digits, a folder of images or 2-D toy data, in pixel space\n"
        "or in a VAE's latent space (--latent); sample; evaluate; compare pixel and latent diffusion;\n"
        "run the sampler verification table; benchmark the kernels.",
        formatter_class=_Formatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(sub)
    _add_sample(sub)
    _add_evaluate(sub)
    _add_demo(sub)
    _add_compare_latent(sub)
    _add_verify(sub)
    _add_bench(sub)
    return p


def _add_train(sub) -> None:
    """``diffmath train``."""
    from .schedules import SCHEDULE_NAMES

    t = sub.add_parser(
        "train",
        help="train a denoiser (U-Net for images, MLP for 2-D toy data)",
        formatter_class=_Formatter,
        description="Train a denoiser. Writes into --out: config.json, checkpoints step-NNNNNN.safetensors (+ .json "
        "with step, RNG and optimizer state), loss.png and schedule.png. Options may also come from a TOML file "
        "(--config; keys are the long option names with _ or -, optionally under a [train] table); flags given on "
        "the command line win. Under `torchrun --nproc_per_node=K diffmath train ...` the run uses "
        "DistributedDataParallel with the global --batch-size split over the K processes.",
    )
    t.add_argument(
        "--data",
        default=None,
        help="digits (embedded 8x8 handwritten digits), swissroll, gmm (2-D toy sets), "
        "or the path of a folder of PNG/JPEG images (unreadable files are skipped with a warning). Required "
        "unless given by --config or --resume",
    )
    t.add_argument(
        "--out",
        required=True,
        type=Path,
        help="run directory to create (refused if it exists and is not empty, "
        "unless --resume or --overwrite, and while another diffmath process writes into it)",
    )
    t.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="total optimisation steps of the run (default 2000; with --resume, training continues up to this step)",
    )
    t.add_argument("--batch-size", type=_positive_int, default=None, help="global batch size (default 128)")
    t.add_argument("--lr", type=_positive_float, default=None, help="AdamW learning rate after warm-up (default 2e-4)")
    t.add_argument(
        "--channels",
        type=_positive_int,
        default=None,
        help="U-Net base width (the MLP's hidden width is 4x this; default 32)",
    )
    t.add_argument(
        "--image-size",
        type=_positive_int,
        default=None,
        help="image side: 8 or 16 for the digits (16 upsamples bilinearly), any size for a folder (default 8)",
    )
    t.add_argument(
        "--prediction", choices=("eps", "x0", "v"), default=None, help="what the network predicts (default eps)"
    )
    t.add_argument(
        "--schedule",
        choices=SCHEDULE_NAMES,
        default=None,
        help="noise schedule, diffmath.named_schedule (default linear)",
    )
    t.add_argument("--timesteps", type=_positive_int, default=None, help="number of diffusion steps T (default 1000)")
    t.add_argument(
        "--save-every",
        type=_positive_int,
        default=None,
        help="write a checkpoint every N steps (all are kept; default 500)",
    )
    t.add_argument("--seed", type=_seed, default=None, help="seed of everything random, in [0, 2**63 - 1] (default 0)")
    _device_flag(t, None, "cpu, cuda or auto (cuda when available; default auto)")
    t.add_argument("--config", type=Path, default=None, help="a TOML file of options (see above)")
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest checkpoint (flags "
        "must match its config except --steps, --save-every, --device)",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run in --out that diffmath wrote: deletes only "
        "the files listed in its .diffmath-run marker (and the temp files of killed writes); a non-empty "
        "folder without the marker is refused. Checked after every other argument, before anything is "
        "deleted",
    )
    _trust_flag(t, "with --resume: continue from")
    _add_train_model_flags(t)
    _add_train_latent_flags(t)
    _add_train_class_flags(t)
    _threads_flag(t)


def _add_train_model_flags(t) -> None:
    """train's group "model and optimisation (extra)"."""
    g = t.add_argument_group("model and optimisation (extra)")
    g.add_argument(
        "--channel-mult",
        type=_int_list,
        default=None,
        help="U-Net width multipliers per resolution, e.g. 1,2,2 (default 1,2)",
    )
    g.add_argument(
        "--num-res-blocks", type=_positive_int, default=None, help="residual blocks per resolution (default 2)"
    )
    g.add_argument(
        "--attention-resolutions",
        type=_int_list,
        default=None,
        help="spatial sizes with self-attention, e.g. 4,2 (default 4)",
    )
    g.add_argument("--dropout", type=_nonneg_float, default=None, help="dropout in the residual blocks (default 0.1)")
    g.add_argument(
        "--learn-sigma",
        action="store_true",
        default=None,
        help="learn the variance (Improved DDPM learned range, hybrid loss L_simple + 0.001 L_vlb)",
    )
    g.add_argument(
        "--ema-decay", type=_nonneg_float, default=None, help="EMA decay of the sampling weights (default 0.999)"
    )
    g.add_argument("--warmup", type=_nonneg_int, default=None, help="linear learning-rate warm-up steps (default 100)")
    g.add_argument(
        "--lr-decay-steps",
        type=_nonneg_int,
        default=None,
        help="cosine decay of the learning rate to 0 at this step; 0 keeps it constant (default 0)",
    )
    g.add_argument(
        "--grad-clip", type=_nonneg_float, default=None, help="clip the gradient norm to this (0: off; default 1)"
    )
    g.add_argument("--weight-decay", type=_nonneg_float, default=None, help="AdamW weight decay (default 0)")
    g.add_argument("--no-bf16", dest="bf16", action="store_false", default=None, help="no bf16 autocast on CUDA")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")


def _add_train_latent_flags(t) -> None:
    """train's group "latent diffusion" (--latent and the VAE's flags)."""
    lg = t.add_argument_group(
        "latent diffusion (docs/latent.md)",
        "With --latent, --out becomes a latent diffusion run (Rombach et al. 2022): a VAE, trained\n"
        "here on the images of --data/--image-size or given by --vae, encodes the images once into\n"
        "OUT/latents.safetensors, and the U-Net of the flags above is trained on the scaled latents\n"
        "in OUT/unet; OUT also gets latent.json and vae/ (a VAE trained here). --channel-mult\n"
        "defaults to 1 (no down-sampling: the latents are small, 2x4x4 for the 8x8 digits).\n"
        "--resume continues a latent run (known by its latent.json; --latent is then optional)\n"
        "with its own VAE and latents.",
    )
    lg.add_argument(
        "--latent", action="store_true", help="train latent diffusion (see above) instead of pixel-space diffusion"
    )
    lg.add_argument(
        "--vae",
        type=Path,
        default=None,
        metavar="CKPT",
        help="with --latent: reuse this trained VAE "
        "instead of training one (its folder, vae.json or vae.safetensors, e.g. RUN/vae of another latent "
        "run)",
    )
    lg.add_argument(
        "--vae-steps",
        type=_positive_int,
        default=None,
        help="with --latent: Adam steps of the VAE trained here (default 1500)",
    )
    lg.add_argument(
        "--vae-channels",
        type=_positive_int,
        default=None,
        help="with --latent: base width of the VAE trained here (default 16)",
    )
    lg.add_argument(
        "--latent-channels",
        type=_positive_int,
        default=None,
        help="with --latent: channels of the latent z of the VAE trained here; z has shape (C, H/2, W/2) (default 2)",
    )
    lg.add_argument(
        "--beta",
        type=_nonneg_float,
        default=None,
        help="with --latent: weight of the KL term in the loss "
        "of the VAE trained here; 1 trains on the ELBO, < 1 trades it for sharper reconstructions "
        "(default 1)",
    )
    lg.add_argument(
        "--encode-mode",
        choices=("mean", "sample"),
        default=None,
        help="with --latent: encode each image "
        "as its posterior mean, or as one seeded draw z ~ q(z | x) (default mean; with --resume the run's)",
    )


def _add_train_class_flags(t) -> None:
    """train's group "classes" (--conditional, --uncond-prob)."""
    cg = t.add_argument_group(
        "classes (docs/guidance.md)",
        "With --conditional the network takes the class label of each training image (the digits'\n"
        "digit, the gmm's component, or the sub-folder of an image folder laid out as torchvision's\n"
        "ImageFolder reads it: root/<class>/<image>, classes in sorted order), and each label is\n"
        "replaced by the null class with probability --uncond-prob (Ho & Salimans 2022), so one\n"
        "network is the conditional and the unconditional model: sample it with --class and --guidance.",
    )
    cg.add_argument(
        "--conditional",
        action="store_true",
        default=None,
        help="train a class-conditional model (config records num_classes and class_names)",
    )
    cg.add_argument(
        "--uncond-prob",
        type=_checked(float, lambda v: 0 <= v < 1, "a probability in [0, 1)"),
        default=None,
        help="with --conditional: the probability of dropping a label to the null class (default 0.1)",
    )


def _add_sample(sub) -> None:
    """``diffmath sample``."""
    s = sub.add_parser(
        "sample",
        help="draw samples from a trained run",
        formatter_class=_Formatter,
        description="Draw samples with the EMA weights of a run's latest checkpoint (or of one checkpoint file); "
        "writes samples.npz (key 'samples', float32 in the data range, and 'info') and samples.png. A latent "
        "diffusion run (--latent, or a --run holding latent.json) gives decoded images (and 'latents'). "
        "Samplers: ddpm (ancestral, fused kernel step; the learned variance if the model has one), ddim "
        "(fused kernel step; --eta), em (Euler-Maruyama on the VP-SDE, fused kernel step), pc (predictor-"
        "corrector), ode (probability-flow ODE, scipy RK45). The SDE samplers turn the eps model into a score "
        "through the VP-SDE correspondence score = -eps / sigma(t).",
    )
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        type=Path,
        help="a run directory (uses its latest checkpoint); "
        "under torchrun spell it --run-dir (torchrun's own parser rejects --run as an ambiguous "
        "abbreviation of its --run-path)",
    )
    src.add_argument("--checkpoint", type=Path, help="one checkpoint, step-NNNNNN.safetensors or .json")
    s.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write samples.npz/png (default: the --run directory); "
        "locked while sampling, and a samples.npz/png there that diffmath did not write is never replaced",
    )
    _trust_flag(s, "load")
    s.add_argument(
        "--sampler",
        choices=(
            "ddpm",
            "ddim",
            "em",
            "pc",
            "ode",
            "euler",
            "heun",
            "edm",
            "euler-a",
            "dpmpp-2m",
            "dpmpp-2m-sde",
            "dpmpp-3m-sde",
            "unipc",
            "lms",
        ),
        default="ddim",
        help="the sampler; euler .. lms are "
        "the sigma-space solvers of diffmath.samplers on the model's denoiser (docs/samplers.md)",
    )
    s.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="sampler steps (default: ddim 50, ddpm T, em/pc 500, "
        "the sigma-space solvers 20 noise levels; ignored by ode, which is adaptive)",
    )
    s.add_argument(
        "--sigmas",
        choices=LADDERS,
        default=DEFAULT_LADDER,
        help="the "
        "noise-level ladder of the sigma-space solvers: exponential (uniform in log sigma; the default, the "
        "lowest exact KL on linear and cosine schedules, docs/samplers.md) or Karras rho = 7 between the "
        "schedule's sigma_min and sigma_max, or the schedule's own sigmas at leading timesteps",
    )
    s.add_argument("--eta", type=_nonneg_float, default=0.0, help="DDIM eta (0 deterministic, 1 DDPM-like)")
    s.add_argument("--num-samples", type=_positive_int, default=500, help="number of samples")
    s.add_argument("--seed", type=_seed, default=0, help="sampling seed, in [0, 2**63 - 1]")
    _device_flag(s)
    s.add_argument("--batch-size", type=_positive_int, default=500, help="samples per network call")
    s.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="precision of the U-Net: bf16/fp16 "
        "run it under torch.autocast (CPU or CUDA; on CPUs without a float16 unit fp16 is slow); the sampling "
        "state stays float32 whatever this is (docs/samplers.md)",
    )
    s.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    s.add_argument(
        "--no-clip",
        dest="clip",
        action="store_false",
        help="ddpm/ddim: do not clip the predicted x0 to "
        "[-1, 1] (clipping is on for images in [-1, 1], off for toy data and for latents)",
    )
    s.add_argument(
        "--latent",
        action="store_true",
        help="--run is a latent diffusion run (diffmath train --latent): "
        "sample scaled latents with its U-Net (never clipped), divide by the scaling factor and decode them "
        "with its VAE; samples.npz then also holds the latents. Implied when --run holds latent.json",
    )
    sg = s.add_argument_group(
        "classes and guidance (a run trained with --conditional; docs/guidance.md)",
        "--class asks for classes: an index (4), a range (0-9), a list (1,3,5), all, or a class name;\n"
        "--num-samples is split into an equal block per class (it must be a multiple of their number),\n"
        "and samples.npz also holds the requested 'labels'. Every sampler then uses classifier-free\n"
        "guidance, eps = eps_u + s (eps_c - eps_u), with cond and uncond in one batched network call.\n"
        "Without --class a conditional run samples its unconditional model (the null label).",
    )
    sg.add_argument(
        "--class", dest="classes", default=None, metavar="CLASSES", help="the classes to sample: 4, 0-9, 1,3,5 or all"
    )
    sg.add_argument(
        "--guidance",
        type=_nonneg_float,
        default=None,
        metavar="S",
        help="with --class: the guidance scale "
        "s >= 0 (diffusers' guidance_scale: 0 unconditional, 1 plain conditional, > 1 guided; default 1.5)",
    )
    sg.add_argument(
        "--guidance-rescale",
        type=_checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
        default=None,
        metavar="PHI",
        help="with --class: Lin et al. (2023)'s guidance rescale phi in "
        "[0, 1] (0: off; against over-saturation at large s)",
    )
    _progress_and_threads(s)


def _add_evaluate(sub) -> None:
    """``diffmath evaluate``."""
    e = sub.add_parser(
        "evaluate",
        help="score a run's samples (metrics.json)",
        formatter_class=_Formatter,
        description="Digits: a cached classifier's mean confidence, class histogram and entropy, the Fréchet distance "
        "in its feature space beside the real held-out floor and the Gaussian-noise ceiling, and the test VLB in "
        "bits/dim. Toy data: the sliced Wasserstein distance (with floor and ceiling). Image folders: the test VLB. "
        "A latent diffusion run (--run holds latent.json): the decoded samples get the same sample metrics, plus the "
        "VAE's held-out ELBO, the latent shape and scaling factor; no test VLB (it would bound the latents' "
        "likelihood, not the images'), so --vlb-images is ignored.",
    )
    e.add_argument("--run", type=Path, required=True, help="the run directory")
    e.add_argument(
        "--guidance-sweep",
        type=_float_list,
        default=None,
        metavar="S,S,...",
        help="instead of scoring "
        "samples: sample every class of a class-conditional run at each guidance scale s (e.g. 0,1,2,3,5), "
        "score them per class and write guidance.json and guidance.png into --out",
    )
    e.add_argument(
        "--per-class",
        type=_positive_int,
        default=100,
        help="with --guidance-sweep: samples per class at each scale (DDIM, 50 steps)",
    )
    e.add_argument("--samples", type=Path, default=None, help="samples .npz (default RUN/samples.npz)")
    e.add_argument("--out", type=Path, default=None, help="where to write metrics.json (default: the run directory)")
    _trust_flag(e, "for the test VLB, load")
    e.add_argument(
        "--vlb-images",
        type=_nonneg_int,
        default=64,
        help="held-out images for the test VLB (0: skip; each costs T network evaluations; ignored for a latent run)",
    )
    _device_flag(e, help="cpu, cuda or auto (for the VLB)")
    _progress_and_threads(e)


def _add_demo(sub) -> None:
    """``diffmath demo``."""
    d = sub.add_parser(
        "demo",
        help="train + sample + evaluate + report on the digits (minutes on a CPU)",
        formatter_class=_Formatter,
        description="The end-to-end demo on the embedded 8x8 digits: train a small class-conditional U-Net (label "
        "dropout 0.3), sample its unconditional model (the null label) with DDIM and evaluate it, then sample every "
        "digit at the guidance scales 0, 1, 1.5, 2, 3, 5 and score them per digit; write report.md beside samples.png, "
        "classes.png (one row per digit), guidance.png, loss.png, schedule.png and metrics.json. Re-running with the "
        "same --out reuses the finished training (it resumes a demo run) and redoes the rest.",
    )
    d.add_argument(
        "--out", type=Path, default=None, help="run directory (default runs/demo, or runs/demo-latent with --latent)"
    )
    d.add_argument(
        "--latent",
        action="store_true",
        help="the latent diffusion demo instead "
        "(diffmath.latent.demo_latent): train a VAE and a U-Net on its 2x4x4 latents of the digits, sample "
        "with DDIM, decode, evaluate and write report.md (docs/latent.md)",
    )
    d.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run in --out that is not the demo's (only the "
        "files diffmath wrote there, listed in its .diffmath-run marker, are deleted)",
    )
    _device_flag(d)
    _progress_and_threads(d, "no progress bars")


def _add_compare_latent(sub) -> None:
    """``diffmath compare-latent``."""
    c = sub.add_parser(
        "compare-latent",
        help="pixel vs latent diffusion on the digits at an equal training budget",
        formatter_class=_Formatter,
        description="diffmath.latent.compare_pixel_latent: train the pixel demo's U-Net and the latent one (on the "
        "latents of a VAE trained first, timed separately) for the same wall-clock budget each, sample both with DDIM "
        "(50 steps) and score them with diffmath.evaluate. Writes OUT/comparison.json and OUT/comparison.md and prints "
        "the table (docs/latent.md).",
    )
    c.add_argument("--out", type=Path, required=True, help="directory for the two runs and the table")
    c.add_argument(
        "--budget",
        type=_positive_float,
        default=120.0,
        metavar="SECONDS",
        help="seconds of diffusion training for each model",
    )
    c.add_argument("--num-samples", type=_positive_int, default=500, help="samples drawn from each model")
    _device_flag(c, "cpu", "where both models train and sample: cpu, cuda or auto (docs/latent.md reports CPU timings)")
    c.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the runs of an earlier comparison in --out (only the files diffmath wrote there are deleted)",
    )
    _progress_and_threads(c, "no progress bars")


def _add_verify(sub) -> None:
    """``diffmath verify``."""
    v = sub.add_parser(
        "verify",
        help="exact KL of each sampler vs steps (diffmath.verify)",
        add_help=False,
        description="Forwarded to diffmath.verify.main: [--json PATH] [--plot PATH] (run `diffmath verify --help`).",
    )
    v.add_argument("args", nargs=argparse.REMAINDER, help="options of diffmath.verify (--json PATH, --plot PATH)")


def _add_bench(sub) -> None:
    """``diffmath bench``."""
    b = sub.add_parser(
        "bench",
        help="benchmark the fused kernels (benchmarks/side_by_side.py)",
        formatter_class=_Formatter,
        description="Time the fused kernels against the torch reference paths "
        "(benchmarks/side_by_side.py of the source checkout).",
    )
    b.add_argument("--quick", action="store_true", help="a short run (small sizes, few repeats)")


# ----------------------------------------------------------------------------- train config
_FLAG_FIELDS = (
    "data",
    "steps",
    "batch_size",
    "lr",
    "channels",
    "image_size",
    "prediction",
    "schedule",
    "timesteps",
    "save_every",
    "seed",
    "device",
    "channel_mult",
    "num_res_blocks",
    "attention_resolutions",
    "dropout",
    "learn_sigma",
    "ema_decay",
    "warmup",
    "lr_decay_steps",
    "grad_clip",
    "weight_decay",
    "bf16",
    "progress",
    "conditional",
    "uncond_prob",
)


def _read_toml(path: Path) -> dict:
    import tomllib

    from .pipeline.config import TrainConfig

    if not path.exists():
        raise FileNotFoundError(f"--config {str(path)!r}: no such file")
    try:
        with open(path, "rb") as f:
            d = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--config {str(path)!r} is not valid TOML: {e}") from e
    if "train" in d and isinstance(d["train"], dict):
        d = d["train"]
    d = {k.replace("-", "_"): v for k, v in d.items()}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"--config {str(path)!r}: unknown keys {unknown}; valid keys are {sorted(names)}")
    return d


def train_config_from_args(args) -> TrainConfig:  # noqa: F821
    """defaults < the stored config (with --resume) < TOML (--config) < flags.

    With ``args.latent`` the config is the latent U-Net's: the stored one is ``out/unet``'s, and
    ``channel_mult`` defaults to (1,) when neither the stored config, the TOML nor a flag sets it."""
    from .pipeline.checkpoint import RunError, read_run_config
    from .pipeline.config import TrainConfig

    latent = bool(getattr(args, "latent", False))
    stored = Path(args.out) / "unet" if latent else Path(args.out)
    merged: dict = {}
    if args.resume and (stored / "config.json").exists():
        merged.update(read_run_config(stored)["config"])
    if args.config is not None:
        merged.update(_read_toml(args.config))
    for f in _FLAG_FIELDS:
        v = getattr(args, f, None)
        if v is not None:
            merged[f] = v
    if latent and "channel_mult" not in merged:
        merged["channel_mult"] = (1,)
    if "data" not in merged:
        if args.resume:
            what = "a latent diffusion run (no unet/config.json)" if latent else "a diffmath run (no config.json)"
            raise RunError(f"--resume: {str(args.out)!r} is not {what}")
        raise RunError("train needs --data (digits, swissroll, gmm or a folder of images)")
    if merged.get("data") not in ("digits", "swissroll", "gmm"):
        merged["data"] = str(merged["data"])
    if "uncond_prob" in merged and not merged.get("conditional"):
        raise ValueError(f"--uncond-prob {merged['uncond_prob']} is for class-conditional runs: add --conditional")
    return TrainConfig.from_dict(merged)


# ----------------------------------------------------------------------------- commands
def _rank() -> int:
    """This process's rank under torchrun (RANK), else 0: only rank 0 prints."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


# train's latent-only flags (attribute, VAEConfig field or None)
_LATENT_FLAGS = (
    ("vae", None),
    ("vae_steps", "steps"),
    ("vae_channels", "channels"),
    ("latent_channels", "latent_channels"),
    ("beta", "beta"),
    ("encode_mode", None),
)


def _flag(attr: str) -> str:
    return "--" + attr.replace("_", "-")


def _cmd_train(args) -> int:
    from .pipeline.loop import train

    if not args.latent and args.resume and (Path(args.out) / "latent.json").exists():
        args.latent = True  # resuming a latent run: --latent is implied
    if args.latent:
        return _cmd_train_latent(args)
    given = [_flag(a) for a, _ in _LATENT_FLAGS if getattr(args, a, None) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for latent diffusion: add --latent")
    config = train_config_from_args(args)
    res = train(config, args.out, resume=args.resume, overwrite=args.overwrite, trust_unverified=args.trust_unverified)
    msg = f"{'interrupted at' if res.interrupted else 'trained to'} step {res.step} in {res.seconds:.1f} s; "
    msg += f"checkpoint {res.checkpoint}" if res.checkpoint else "no checkpoint written"
    if _rank() == 0:
        print(msg)
    return 130 if res.interrupted else 0


def _vae_flags(args) -> dict:
    """The VAEConfig fields given by train's --vae-* flags."""
    return {field: getattr(args, a) for a, field in _LATENT_FLAGS if field and getattr(args, a) is not None}


def _cmd_train_latent(args) -> int:
    import json

    from .latent import VAEConfig, read_latent_run, train_latent
    from .pipeline.checkpoint import RunError

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ValueError(
            "train --latent runs in one process (the VAE and the latent cache are not distributed); "
            "run it without torchrun"
        )
    config = train_config_from_args(args)
    vae_flags = _vae_flags(args)
    names = ", ".join(_flag(a) for a, f in _LATENT_FLAGS if f in vae_flags)
    if args.vae is not None and vae_flags:
        raise ValueError(f"--vae reuses a trained VAE while {names} set up a VAE to train here: give one or the other")
    encode_mode = args.encode_mode
    if args.resume:
        info = read_latent_run(args.out)
        if encode_mode is None:
            encode_mode = info.get("encode_mode", "mean")
        if vae_flags:  # the run keeps its VAE: the flags may only repeat how it was trained
            ck = Path(info["vae_checkpoint"])
            try:
                trained = json.loads((ck if ck.is_absolute() else Path(args.out) / ck).read_text()).get("train") or {}
            except (OSError, ValueError):
                trained = {}
            if not trained:
                raise RunError(f"--resume: the VAE of {str(args.out)!r} was not trained by this run; drop {names}")
            for a, f in _LATENT_FLAGS:
                if f in vae_flags and vae_flags[f] != trained.get(f):
                    raise RunError(
                        f"--resume: the run's VAE was trained with {_flag(a)} {trained.get(f)}, not "
                        f"{vae_flags[f]} (a resumed run keeps its VAE)"
                    )
    vae_config = VAEConfig(**{**vae_flags, "seed": config.seed}) if args.vae is None else None
    res = train_latent(
        args.out,
        config,
        vae=args.vae,
        vae_config=vae_config,
        resume=args.resume,
        overwrite=args.overwrite,
        encode_mode=encode_mode or "mean",
        trust_unverified=args.trust_unverified,
    )
    u = res.unet
    msg = (
        f"latent run {args.out}: latents {'x'.join(map(str, res.latent_shape))}, scaling factor {res.scale:.4f}; "
        f"U-Net {'interrupted at' if u.interrupted else 'trained to'} step {u.step} in {u.seconds:.1f} s; "
    )
    msg += f"checkpoint {u.checkpoint}" if u.checkpoint else "no checkpoint written"
    if _rank() == 0:
        print(msg)
    return 130 if u.interrupted else 0


def _is_latent_run(run) -> bool:
    return run is not None and (Path(run) / "latent.json").is_file()


def _cmd_sample(args) -> int:
    from .pipeline.sample_run import sample_run

    out = args.out if args.out is not None else args.run
    if args.latent or _is_latent_run(args.run):
        return _cmd_sample_latent(args, out)
    if out is None:
        raise ValueError("sample --checkpoint needs --out DIR")
    info = sample_run(
        out, run=args.run, checkpoint=args.checkpoint, clip_x0="auto" if args.clip else None, **_sampling_args(args)
    )
    if _rank() == 0:
        steps = "adaptive" if info["steps"] is None else f"{info['steps']}"
        print(
            f"{info['num_samples']} samples ({info['sampler']}, {steps} steps{_conditioning_note(info)}) in "
            f"{info['seconds']:.1f} s -> {Path(out) / 'samples.npz'}, {Path(out) / 'samples.png'}"
        )
    return 0


def _guidance_args(args) -> dict:
    return {"classes": args.classes, "guidance": args.guidance, "guidance_rescale": args.guidance_rescale or 0.0}


def _sampling_args(args) -> dict:
    """The request that ``sample`` passes alike to a pixel run (``sample_run``) and a latent run
    (``sample_latent``)."""
    return {
        "sampler": args.sampler,
        "steps": args.steps,
        "eta": args.eta,
        "num_samples": args.num_samples,
        "seed": args.seed,
        "device": args.device,
        "batch_size": args.batch_size,
        "progress": args.progress,
        "ema": not args.raw_weights,
        "dtype": args.dtype,
        "trust_unverified": args.trust_unverified,
        "sigmas": args.sigmas,
        **_guidance_args(args),
    }


def _conditioning_note(info: dict) -> str:
    if info.get("conditioning") == "class":
        names = info.get("class_names") or []
        cls = ",".join(names[c] if c < len(names) else str(c) for c in info["classes"])
        note = f"; classes {cls}, {info['per_class']} each, guidance {info['guidance']:g}"
        return note + (f", rescale {info['guidance_rescale']:g}" if info.get("guidance_rescale") else "")
    if info.get("conditioning"):
        return "; null label (unconditional)"
    return ""


def _cmd_sample_latent(args, out) -> int:
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ValueError(
            "sample --latent runs in one process (latent sampling is not split over ranks); run it without torchrun"
        )
    from .latent import sample_latent

    if args.run is None:
        raise ValueError("sample --latent needs --run DIR (a latent run directory), not --checkpoint")
    _, info = sample_latent(args.run, out, **_sampling_args(args))
    steps = "adaptive" if info["steps"] is None else f"{info['steps']}"
    print(
        f"{info['num_samples']} latent samples ({info['sampler']}, {steps} steps{_conditioning_note(info)}, decoded "
        f"by the run's VAE) in "
        f"{info['seconds']:.1f} s -> {Path(out) / 'samples.npz'}, {Path(out) / 'samples.png'}"
    )
    return 0


def _latent_summary(m: dict) -> str:
    """The line a latent run adds to its metrics: the VAE's held-out ELBO, latent shape, scale."""
    v = m.get("vae") or {}
    e = v.get("held_out_elbo_bpd")
    elbo = (
        f"{e:.3f} bits/dim"
        if e is not None
        else f"not measured ({v.get('held_out_elbo_skipped', 'no held-out images')})"
    )
    return f"VAE held-out ELBO {elbo}; latents {m['latent']['shape']}, scaling factor {m['latent']['scale_factor']:.4f}"


def _cmd_evaluate(args) -> int:
    from .pipeline.evaluate import evaluate_run
    from .pipeline.report import format_metrics

    if args.guidance_sweep is not None:
        from .pipeline.evaluate import evaluate_guidance
        from .pipeline.report import guidance_table

        if _is_latent_run(args.run):
            from .latent import evaluate_guidance_latent as evaluate_guidance
        g = evaluate_guidance(
            args.run,
            args.out,
            scales=args.guidance_sweep,
            per_class=args.per_class,
            device=args.device,
            progress=args.progress,
            trust_unverified=args.trust_unverified,
        )
        print("\n".join(guidance_table(g["scales"])))
        where = Path(args.out if args.out is not None else args.run)
        print(f"-> {where / 'guidance.json'}, {where / 'guidance.png'}")
        return 0
    if _is_latent_run(args.run):
        from .latent import evaluate_latent

        m = evaluate_latent(args.run, args.samples, args.out, device=args.device, progress=args.progress)
    else:
        m = evaluate_run(
            args.run,
            args.samples,
            args.out,
            vlb_images=args.vlb_images,
            device=args.device,
            trust_unverified=args.trust_unverified,
            progress=args.progress,
        )
    print(format_metrics(m))
    if isinstance(m.get("vae"), dict) and "held_out_elbo_bpd" in m["vae"]:
        print(_latent_summary(m))
    print(f"-> {Path(args.out if args.out is not None else args.run) / 'metrics.json'}")
    return 0


def _cmd_demo(args) -> int:
    from .pipeline.report import format_metrics

    if args.latent:
        from .latent import demo_latent

        out = Path(args.out or LATENT_DEMO_OUT)
        m = demo_latent(out, overwrite=args.overwrite, device=args.device, progress=args.progress)
    else:
        out = Path(args.out or DEMO_OUT)
        m = run_demo(out, overwrite=args.overwrite, device=args.device, progress=args.progress)
    print(format_metrics(m))
    if args.latent:
        print(_latent_summary(m))
    if isinstance(m.get("guidance"), dict):
        from .pipeline.report import guidance_table

        print(f"class-conditional samples (DDIM 50), per guidance scale s (default {m['guidance']['default']:g}):")
        print("\n".join(guidance_table(m["guidance"]["scales"])))
    print(f"timings: {m['timings']}")
    print(f"report: {out / 'report.md'}")
    return 0


def _cmd_compare_latent(args) -> int:
    from .latent import compare_pixel_latent, comparison_table

    r = compare_pixel_latent(
        args.out,
        budget_s=args.budget,
        num_samples=args.num_samples,
        device=args.device,
        progress=args.progress,
        overwrite=args.overwrite,
    )
    print(comparison_table(r))
    print(f"-> {Path(args.out) / 'comparison.md'}, {Path(args.out) / 'comparison.json'}")
    return 0


def _cmd_verify(args) -> int:
    try:
        from . import verify
    except ImportError as e:
        raise ImportError(f"diffmath.verify is not available in this install: {e}") from e
    rc = verify.main(list(args.args))
    return int(rc or 0)


def _bench_script() -> Path:
    """benchmarks/side_by_side.py of the source checkout this package runs from (benchmarks/ is
    not installed: ``diffmath bench`` needs ``pip install -e .`` from a clone)."""
    return Path(__file__).resolve().parents[1] / "benchmarks" / "side_by_side.py"


def _load_bench():
    path = _bench_script()
    if not (path.is_file() and (path.parents[1] / "kernels" / "_affine.py").is_file()):
        raise FileNotFoundError(
            f"diffmath bench runs benchmarks/side_by_side.py from a source checkout, and there is none at {path}: "
            "clone the repository and `pip install -e .` there (or run `python benchmarks/side_by_side.py`)"
        )
    import importlib.util

    spec = importlib.util.spec_from_file_location("diffmath_side_by_side", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cmd_bench(args) -> int:
    return int(_load_bench().main(quick=args.quick) or 0)


_COMMANDS = {
    "train": _cmd_train,
    "sample": _cmd_sample,
    "evaluate": _cmd_evaluate,
    "demo": _cmd_demo,
    "compare-latent": _cmd_compare_latent,
    "verify": _cmd_verify,
    "bench": _cmd_bench,
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "verify":  # everything after `verify` belongs to diffmath.verify
        args = argparse.Namespace(command="verify", args=argv[1:])
    else:
        args = parser.parse_args(argv)
    from .pipeline.checkpoint import RunError

    if getattr(args, "threads", None) is not None:
        set_threads(args.threads)
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"diffmath {args.command}: interrupted", file=sys.stderr)
        return 130
    except (
        RunError,
        ValueError,
        TypeError,
        FileNotFoundError,
        ImportError,
        OSError,
        FloatingPointError,
        MemoryError,
        RuntimeError,
    ) as e:
        if os.environ.get("DIFFMATH_DEBUG"):
            raise
        if isinstance(e, RuntimeError) and not _out_of_memory(e):
            raise  # a bug, not a condition we can explain: keep the traceback
        msg = _memory_message(args, e) if isinstance(e, (MemoryError, RuntimeError)) else str(e)
        print(f"diffmath {args.command}: error: {msg}", file=sys.stderr)
        return 2


def _out_of_memory(e: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA, or a failed CPU allocation reported as a RuntimeError)."""
    return (
        type(e).__name__ == "OutOfMemoryError"
        or "out of memory" in str(e).lower()
        or ("DefaultCPUAllocator: can't allocate memory" in str(e))
    )


def _memory_message(args, e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    if args.command == "train":
        batch = getattr(args, "batch_size", None)
        hint = f"lower --batch-size (now {batch if batch is not None else 'the default 128'})"
    elif args.command == "sample":
        hint = f"lower --batch-size (samples per network call, now {args.batch_size})"
    elif args.command == "evaluate":
        hint = f"lower --vlb-images (now {args.vlb_images}) or sample fewer images"
    else:
        hint = "use a smaller batch or model"
    return f"out of memory ({type(e).__name__}: {first}); {hint}, or use another --device"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
