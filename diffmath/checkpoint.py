"""Checkpoints and run directories of ``diffmath train``: file formats, reading, writing, resuming.

Files in a run directory ``out``: config.json (``RUN_FORMAT``: the config, the data's shape and
levels, the parameter count), step-NNNNNN.safetensors (weights ``model.*``, EMA ``ema.*``,
optimizer tensors ``optim.<i>.<name>``, ``loss_history``) + step-NNNNNN.json
(``CHECKPOINT_FORMAT``: step, config, RNG states, optimizer hyper-parameters, SHA-256 of the
.safetensors), all written atomically through ``diffmath._io``. Nothing is ever unpickled.

``prepare_out`` checks ``out`` against ``--resume`` / ``--overwrite`` and picks the checkpoint
to resume from; ``check_compatible`` refuses a stored config that differs from the new one in
anything but ``RESUMABLE_FIELDS``. ``config`` arguments are ``diffmath.train.TrainConfig``
instances (this module sits below ``train`` and does not import it; ``check_compatible`` reads
the stored config with ``type(config).from_dict``). The names stay importable from
``diffmath.train``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from ._io import atomic_write_json, read_json, read_sidecar, safetensors_metadata, save_safetensors, weights_and_sidecar
from .data import Data

__all__ = [
    "RunError",
    "RUN_FORMAT",
    "CHECKPOINT_FORMAT",
    "RESUMABLE_FIELDS",
    "OUR_FILES",
    "checkpoint_name",
    "read_run_config",
    "list_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "weights_digest",
    "prepare_out",
    "check_compatible",
]


RUN_FORMAT = "diffmath.run/1"
CHECKPOINT_FORMAT = "diffmath.checkpoint/1"
_CKPT_RE = re.compile(r"^step-(\d{6,})\.json$")
# Fields that may change when a run is resumed; any other difference is refused.
RESUMABLE_FIELDS = ("steps", "save_every", "device", "progress", "log_every", "bf16")


class RunError(ValueError):
    """A run directory or checkpoint that cannot be used as asked (message says why)."""


# ----------------------------------------------------------------------------- files
def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def read_run_config(out) -> dict:
    """config.json of a run directory, checked to be ours."""
    p = Path(out) / "config.json"
    if not p.exists():
        raise RunError(f"{str(out)!r} is not a diffmath run: it has no config.json")
    d = read_json(p, RUN_FORMAT, "run config", RunError)
    if "config" not in d:
        raise RunError(f"{str(p)!r} is not a diffmath run config (it has no 'config')")
    return d


def list_checkpoints(out) -> list[tuple[int, Path]]:
    """(step, json path) of the checkpoints in ``out``, ascending."""
    found = []
    for p in Path(out).glob("step-*.json"):
        m = _CKPT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out) -> Path | None:
    c = list_checkpoints(out)
    return c[-1][1] if c else None


def load_checkpoint(path, verify: bool = True):
    """Read a checkpoint (its .json or .safetensors path) -> (meta dict, tensors dict).

    Raises RunError if it is not a diffmath checkpoint or its weights do not match the JSON.
    Uses safetensors only (never pickle).
    """
    from safetensors.torch import load_file

    st, js = weights_and_sidecar(path)
    if not st.exists():
        raise RunError(f"checkpoint weights {str(st)!r} do not exist")
    md = safetensors_metadata(st, CHECKPOINT_FORMAT, "checkpoint", RunError)
    if js.exists():
        meta = read_sidecar(js, st, CHECKPOINT_FORMAT, "checkpoint", RunError, verify=verify)
    else:
        meta = json.loads(md.get("meta", "{}"))
        if not meta:
            raise RunError(f"{str(st)!r} has no {js.name} beside it and no embedded metadata")
    tensors = load_file(str(st))
    return meta, tensors


def _rng_state_b64(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode("ascii")


def _rng_state_from_b64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def _optimizer_tensors(opt: torch.optim.Optimizer):
    sd = opt.state_dict()
    tensors, layout = {}, {}
    for idx, st in sd["state"].items():
        keys = []
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v.detach().cpu().contiguous()
                keys.append(k)
            else:
                layout.setdefault("scalars", {}).setdefault(str(idx), {})[k] = v
        layout.setdefault("tensors", {})[str(idx)] = keys
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, **layout}


def _load_optimizer(opt, layout: dict, tensors: dict):
    state = {}
    for idx, keys in layout.get("tensors", {}).items():
        state[int(idx)] = {k: tensors[f"optim.{idx}.{k}"] for k in keys}
    for idx, sc in layout.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(sc)
    groups = []
    for g in layout["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(out: Path, step: int, config, model, ema, opt, loss_history, rng_states, extra=None):
    name = checkpoint_name(step)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    opt_tensors, opt_layout = _optimizer_tensors(opt)
    tensors.update(opt_tensors)
    tensors["loss_history"] = torch.tensor(loss_history, dtype=torch.float64) if loss_history else torch.zeros(0, dtype=torch.float64)
    small_meta = {"format": CHECKPOINT_FORMAT, "step": step, "config": config.to_dict(), **(extra or {})}
    st = out / f"{name}.safetensors"
    digest = save_safetensors(st, tensors, CHECKPOINT_FORMAT, small_meta)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "config": config.to_dict(),
        "weights": st.name,
        "weights_sha256": digest,
        "rng": rng_states,
        "optimizer": opt_layout,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **(extra or {}),
    }
    atomic_write_json(out / f"{name}.json", meta)
    return out / f"{name}.json"


def weights_digest(model) -> str:
    """SHA-256 of the parameters' bytes (in order): equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _write_run_config(out: Path, config, data: Data, model, world: int):
    atomic_write_json(
        out / "config.json",
        {
            "format": RUN_FORMAT,
            "config": config.to_dict(),
            "data": {
                "name": data.name,
                "kind": data.kind,
                "shape": list(data.shape),
                "bins": data.bins,
                "train": int(data.train.shape[0]),
                "held_out": int(data.held_out.shape[0]),
            },
            "model": {"class": type(model).__name__, "parameters": int(sum(p.numel() for p in model.parameters()))},
            "world_size": world,
            "torch": torch.__version__,
        },
    )


# ----------------------------------------------------------------------------- the run directory
OUR_FILES = ("config.json", "loss.png", "schedule.png", "samples.npz", "samples.png", "metrics.json", "report.md")


def _is_ours(p: Path) -> bool:
    return p.name in OUR_FILES or bool(re.match(r"^step-\d{6,}\.(json|safetensors)$", p.name))


def prepare_out(out: Path, config, *, resume: bool, overwrite: bool) -> Path | None:
    """Check ``out`` against the flags; returns the checkpoint to resume from (or None)."""
    out = Path(out)
    if resume and overwrite:
        raise RunError("--resume and --overwrite contradict each other; pick one")
    exists = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {str(out)!r} exists and is a file, not a directory")
    if resume:
        if not exists:
            raise RunError(f"--resume: {str(out)!r} holds no run to resume (missing or empty)")
        stored = read_run_config(out)
        check_compatible(stored["config"], config, where=str(out / "config.json"))
        ck = latest_checkpoint(out)
        if ck is None:
            return None  # the run wrote its config but no checkpoint: start from scratch
        meta, _ = load_checkpoint(ck, verify=False)
        check_compatible(meta.get("config", {}), config, where=str(ck))
        return ck
    if exists:
        if not overwrite:
            raise RunError(
                f"--out {str(out)!r} already exists and is not empty; pass --resume to continue that run or "
                "--overwrite to replace it"
            )
        for p in out.iterdir():
            if p.is_file() and _is_ours(p):
                p.unlink()
    return None


def check_compatible(stored: dict, config, where: str):
    try:
        old = type(config).from_dict(stored).model_fields()
    except (TypeError, ValueError) as e:
        raise RunError(f"{where} does not hold a diffmath training config this version can read: {e}") from e
    new = config.model_fields()
    diff = [f"{k}: checkpoint {old[k]!r} vs now {new[k]!r}" for k in sorted(new) if old.get(k) != new[k]]
    if diff:
        raise RunError(
            f"cannot resume: {where} was written with a different configuration ("
            + "; ".join(diff)
            + f"). Only {', '.join(RESUMABLE_FIELDS)} may change on --resume; the existing checkpoints are left intact."
        )

