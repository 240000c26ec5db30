"""The training loop (``diffmath train``): data, model, optimiser and checkpoints around the
objective of ``diffmath.pipeline.objective`` (the loss), with the pieces of ``.config`` (the run's
configuration and seeds), ``.model`` (the network and schedule) and ``.optim`` (learning rate, EMA,
the stop flag); the file formats and the run directory live in ``.checkpoint`` and ``.rundir``,
the figures in ``.plots``, devices and the process group in ``.distributed``.

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
``.diffmath-run`` marker; the folder is locked while the run writes (``diffmath.pipeline.rundir``). No
file is ever unpickled (under torchrun the ranks exchange small objects through torch's object
collectives, which pickle them: ``diffmath.pipeline.distributed``). Ctrl-C / SIGTERM finish the current
step, write a checkpoint and return.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import (
    RESUME_KEYS,
    RunError,
    check_class_count,
    checkpoint_name,
    load_checkpoint,
    load_optimizer,
    prepare_out,
    rng_state_b64,
    rng_state_from_b64,
    save_checkpoint,
    weights_digest,
    write_run_config,
)
from .config import TrainConfig, derive_seed, keyed_generator
from .data import Data, load_data
from .distributed import Dist, resolve_device
from .model import build_model, check_model_config, make_schedule, resolve_classes
from .objective import training_loss, uses_fused_noise
from .optim import StopFlag, ema_update, learning_rate
from .plots import plot_loss, plot_schedule

__all__ = ["TrainResult", "train"]


@dataclass
class TrainResult:
    out: Path
    step: int
    losses: list = field(default_factory=list)
    interrupted: bool = False
    checkpoint: Path | None = None
    seconds: float = 0.0
    trained_steps: int = 0


def train(
    config: TrainConfig,
    out,
    *,
    resume: bool = False,
    overwrite: bool = False,
    data: Data | None = None,
    stop_after: int | None = None,
    trust_unverified: bool = False,
) -> TrainResult:
    """Train as configured, writing into ``out``; see the module docstring.

    ``resume`` continues from the latest checkpoint in ``out`` (the flags must match its
    config except ``RESUMABLE_FIELDS``); ``overwrite`` replaces a run that diffmath wrote
    (``diffmath.pipeline.rundir``: only the files its marker lists are deleted). The data and the model
    configuration are checked before ``out`` is touched, and ``out`` stays locked against other
    writers until this returns. ``data`` overrides ``config.data`` (tests). ``stop_after`` stops
    (with a checkpoint) after that many steps of this call, as if interrupted.
    ``trust_unverified`` resumes from a checkpoint whose sidecar has no SHA-256.
    """
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
            raise RunError(
                f"batch_size {config.batch_size} (the global batch) must be divisible by the world size {dd.world}"
            )
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
                ckpt, lock = prepare_out(
                    out, config, resume=resume, overwrite=overwrite, trust_unverified=trust_unverified
                )
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
        drop_gen = keyed_generator(config.seed, "label-dropout") if config.conditional else None
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
                    raise RunError(
                        f"{str(ckpt)!r}: rng.label_dropout (the state of the label-dropout generator) is "
                        f"missing or not a torch generator state: {e!r}"
                    ) from e
            cpu_states = rng["torch_cpu"]
            if len(cpu_states) == dd.world:
                try:
                    torch.set_rng_state(rng_state_from_b64(cpu_states[dd.rank]))
                except RuntimeError as e:
                    raise RunError(f"{str(ckpt)!r}: rng.torch_cpu[{dd.rank}] is not a torch RNG state: {e}") from e
            elif is_main:
                import warnings

                warnings.warn(
                    f"{str(ckpt)!r} was written by {len(cpu_states)} process(es) and is resumed by {dd.world}: "
                    "the dropout RNG restarts, so the continuation is not bit-identical to an unbroken run",
                    UserWarning,
                    stacklevel=2,
                )
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
            torch.autocast(device_type="cuda", dtype=torch.bfloat16)
            if (device.type == "cuda" and config.bf16)
            else None
        )
        batches = GlobalBatches(x_all, y_all, config.seed, Bg, dd, device)
        D = int(np.prod(data.shape))
        seed_noise = derive_seed(config.seed, "philox") % (2**31 - 1)
        fused = uses_fused_noise(config)

        stop = StopFlag().install()
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
                x0 = batches.local(step)
                t_global = torch.randint(
                    0, s.num_timesteps, (Bg,), generator=keyed_generator(config.seed, "t", step)
                ).to(device)
                t = t_global[dd.rank * B : (dd.rank + 1) * B]
                offset = step * Bg * D  # the global batch's first Philox draw
                noise, shard = None, None
                if not fused:
                    g = keyed_generator(config.seed, "noise", step)
                    noise = torch.randn((Bg,) + tuple(data.shape), generator=g)[dd.rank * B : (dd.rank + 1) * B].to(
                        device
                    )
                elif dd.world > 1:
                    shard = (batches.global_batch(step), t_global, dd.rank, dd.world)
                loss, _parts = training_loss(
                    config,
                    net,
                    s,
                    x0,
                    t,
                    seed_noise=seed_noise,
                    offset=offset,
                    noise=noise,
                    bins=data.bins or 256,
                    autocast=autocast,
                    shard=shard,
                    y=batches.labels(step, config.uncond_prob, config.num_classes, drop_gen)
                    if config.conditional
                    else None,
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                opt.step()
                step += 1
                steps_this_call += 1
                ema_update(ema, model, min(config.ema_decay, (1 + step) / (10 + step)))
                # one all-reduce carries the loss (for the log) and the stop flag
                want_stop = stop.signum is not None or (stop_after is not None and steps_this_call >= stop_after)
                red = torch.tensor(
                    [float(loss.detach()), 1.0 if want_stop else 0.0], dtype=torch.float64, device=device
                )
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
                        bar.set_postfix(loss=f"{np.mean(losses_hist[-config.log_every :]):.4f}", lr=f"{lr:.2e}")
                stopping = bool(red[1] > 0)
                if step % config.save_every == 0 or step == total or stopping:
                    last_ckpt = _checkpoint(
                        out, step, config, model, ema, opt, losses_hist, dd, device, data, is_main, drop_gen
                    )
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


class GlobalBatches:
    """The samples a rank trains on at each step. Every epoch's seeded permutation of the data
    (``keyed_generator(seed, "epoch", epoch)``) is cut into global batches of ``batch_size``, each
    global batch into ``world`` contiguous shards, and a ``DistributedSampler`` over the shard
    indices hands shard r of every batch to rank r; so a sample's place in its global batch, and
    with it its noise and timestep, does not depend on the number of processes."""

    def __init__(self, x_all, y_all, seed: int, batch_size: int, dd, device):
        from torch.utils.data import DistributedSampler

        self.x_all, self.y_all, self.seed, self.device = x_all, y_all, seed, device
        self.Bg, self.B, self.rank, self.world = batch_size, batch_size // dd.world, dd.rank, dd.world
        self.N = int(x_all.shape[0])
        self.per_epoch = self.N // batch_size  # global batches per epoch
        sampler = DistributedSampler(
            range(self.per_epoch * dd.world), num_replicas=dd.world, rank=dd.rank, shuffle=False, drop_last=True
        )
        self.shards = list(iter(sampler))  # shard ids k * world + rank, k = 0 .. per_epoch - 1
        self._perm: dict[int, torch.Tensor] = {}

    def _locate(self, step: int):
        """(the permutation of the step's epoch, the index of its global batch, this rank's shard)."""
        epoch, k = divmod(step, self.per_epoch)
        if epoch not in self._perm:
            self._perm.clear()
            self._perm[epoch] = torch.randperm(self.N, generator=keyed_generator(self.seed, "epoch", epoch)).to(
                self.device
            )
        kk, r = divmod(self.shards[k], self.world)
        return self._perm[epoch], kk, r

    def local(self, step: int) -> torch.Tensor:
        """This rank's rows of the step's global batch."""
        perm, kk, r = self._locate(step)
        return self.x_all.index_select(0, perm[kk * self.Bg + r * self.B : kk * self.Bg + (r + 1) * self.B])

    def global_batch(self, step: int) -> torch.Tensor:
        """The step's whole global batch."""
        perm, kk, _ = self._locate(step)
        return self.x_all.index_select(0, perm[kk * self.Bg : (kk + 1) * self.Bg])

    def labels(self, step: int, uncond_prob: float, num_classes: int, generator) -> torch.Tensor:
        """This rank's labels after dropout (Ho & Salimans 2022, Alg. 1), drawn for the global batch
        from ``generator`` so that they do not depend on the number of processes."""
        from ..guidance import drop_labels

        perm, kk, _ = self._locate(step)
        y_g = self.y_all.index_select(0, perm[kk * self.Bg : (kk + 1) * self.Bg])
        return drop_labels(y_g, uncond_prob, num_classes, generator)[self.rank * self.B : (self.rank + 1) * self.B]


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
            out,
            step,
            config,
            model,
            ema,
            opt,
            losses_hist,
            rng,
            extra={
                "data_shape": list(data.shape),
                "bins": data.bins,
                "world_size": dd.world,
                "weights_digest": digests[0],
                "ranks_identical": True,
            },
        )
        plot_loss(out / "loss.png", losses_hist)
    dd.barrier()
    return path if path is not None else out / f"{checkpoint_name(step)}.json"
