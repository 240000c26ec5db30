"""Checkpoints and run directories of ``diffmath train``: file formats, reading, writing, resuming.

Files in a run directory ``out``: config.json (``RUN_FORMAT``: the config, the data's shape and
levels, the parameter count), step-NNNNNN.safetensors (weights ``model.*``, EMA ``ema.*``,
optimizer tensors ``optim.<i>.<name>``, ``loss_history``) + step-NNNNNN.json
(``CHECKPOINT_FORMAT``: step, config, RNG states, optimizer hyper-parameters, SHA-256 of the
.safetensors), all written atomically through ``diffmath.pipeline.io``. No file is ever unpickled.

A checkpoint's weights are verified against the SHA-256 in its JSON sidecar; a checkpoint
without a sidecar, or with a sidecar that has no ``weights_sha256``, is refused unless the
caller passes ``trust_unverified=True`` (``--trust-unverified``), and damaged weights are
refused always. The sidecar's keys are checked for presence and type before use
(``check_checkpoint_meta``), so a tampered sidecar gives an error naming the key.

``prepare_out`` checks ``out`` against ``--resume`` / ``--overwrite``, opens it through
``diffmath.pipeline.rundir`` (its marker and lock) and picks the checkpoint to resume from;
``check_compatible`` refuses a stored config that differs from the new one in
anything but ``RESUMABLE_FIELDS``. ``config`` arguments are ``diffmath.pipeline.config.TrainConfig``
instances (this module sits below ``config`` and does not import it; ``check_compatible`` reads
the stored config with ``type(config).from_dict``). The names stay importable from
``diffmath.train``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from .data import Data
from .io import atomic_write_json, read_json, safetensors_metadata, save_safetensors, sha256_file, weights_and_sidecar
from .rundir import RunError, is_empty, open_run

__all__ = [
    "RunError",
    "RUN_FORMAT",
    "CHECKPOINT_FORMAT",
    "RESUMABLE_FIELDS",
    "OUR_FILES",
    "SAMPLE_KEYS",
    "RESUME_KEYS",
    "check_checkpoint_meta",
    "check_class_count",
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


# ----------------------------------------------------------------------------- files
def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def read_run_config(out) -> dict:
    """config.json of a run directory, checked to be ours."""
    p = Path(out) / "config.json"
    if not p.exists():
        raise RunError(f"{str(out)!r} is not a diffmath run: it has no config.json")
    d = read_json(p, RUN_FORMAT, "run config", RunError)
    if not isinstance(d.get("config"), dict):
        raise RunError(
            f"{str(p)!r} is not a diffmath run config (its key 'config' must be a JSON object; got "
            f"{d.get('config')!r:.100})"
        )
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


def _is_int(v, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _b64_list(v) -> bool:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        return False
    try:
        for x in v:
            base64.b64decode(x, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _rng_ok(v) -> bool:
    return (
        isinstance(v, dict)
        and _b64_list(v.get("torch_cpu"))
        and len(v["torch_cpu"]) >= 1
        and _b64_list(v.get("torch_cuda"))
        and _is_int(v.get("world_size"), 1)
    )


def _optimizer_ok(v) -> bool:
    if not isinstance(v, dict):
        return False
    groups, tensors, scalars = v.get("param_groups"), v.get("tensors", {}), v.get("scalars", {})
    return (
        isinstance(groups, list)
        and bool(groups)
        and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)
        and isinstance(tensors, dict)
        and all(isinstance(k, list) and all(isinstance(n, str) for n in k) for k in tensors.values())
        and isinstance(scalars, dict)
        and all(isinstance(d, dict) for d in scalars.values())
    )


# key: (what it must be, test). The keys a sampler needs, and those a resumed run needs too.
_META = {
    "step": ("an integer >= 0", lambda v: _is_int(v, 0)),
    "config": ("a JSON object (the training config)", lambda v: isinstance(v, dict)),
    "data_shape": (
        "a list of positive integers",
        lambda v: isinstance(v, list) and bool(v) and all(_is_int(n, 1) for n in v),
    ),
    "bins": ("an integer >= 2 or null", lambda v: v is None or _is_int(v, 2)),
    "rng": ("an object with torch_cpu and torch_cuda lists of base64 RNG states and world_size", _rng_ok),
    "optimizer": ("an object with param_groups (a list of objects with params), tensors and scalars", _optimizer_ok),
}
SAMPLE_KEYS = ("step", "config", "data_shape", "bins")
RESUME_KEYS = SAMPLE_KEYS + ("rng", "optimizer")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def check_checkpoint_meta(meta: dict, where: str, keys=SAMPLE_KEYS) -> dict:
    """``RunError`` naming the first of ``keys`` that ``meta`` lacks or holds with the wrong type."""
    for k in keys:
        what, ok = _META[k]
        if k not in meta:
            raise RunError(f"{where} lacks the key {k!r} ({what}); the checkpoint cannot be used")
        if not ok(meta[k]):
            raise RunError(f"{where}: the key {k!r} must be {what}; got {meta[k]!r:.200}")
    return meta


def load_checkpoint(path, verify: bool = True, *, trust_unverified: bool = False, keys=SAMPLE_KEYS):
    """Read a checkpoint (its .json or .safetensors path) -> (meta dict, tensors dict).

    The weights must match the ``weights_sha256`` of the JSON sidecar (``verify=False`` skips
    hashing the file, not the other checks). Without a sidecar, or with one that has no
    ``weights_sha256``, the weights cannot be verified: ``RunError`` unless ``trust_unverified``
    (then the sidecar, or the metadata embedded in the .safetensors, is used as it is). ``meta``
    must hold ``keys`` with the right types (``check_checkpoint_meta``). ``RunError`` too if it is
    not a diffmath checkpoint. Uses safetensors only (never pickle).
    """
    from safetensors.torch import load_file

    st, js = weights_and_sidecar(path)
    if not st.exists():
        raise RunError(f"checkpoint weights {str(st)!r} do not exist")
    md = safetensors_metadata(st, CHECKPOINT_FORMAT, "checkpoint", RunError)
    hint = "pass --trust-unverified (trust_unverified=True) to load them anyway"
    if js.exists():
        meta = read_json(js, CHECKPOINT_FORMAT, "checkpoint", RunError)
        where = repr(str(js))
        digest = meta.get("weights_sha256")
        if digest is None:
            if not trust_unverified:
                raise RunError(
                    f"{where} has no 'weights_sha256', so the weights {str(st)!r} cannot be verified; {hint}"
                )
        elif not isinstance(digest, str) or not _SHA256_RE.match(digest):
            raise RunError(f"{where}: the key 'weights_sha256' must be a SHA-256 hex digest; got {digest!r:.100}")
        elif verify and digest != sha256_file(st):
            raise RunError(f"{str(st)!r} does not match {str(js)!r} (SHA-256 differs): the checkpoint is damaged")
    else:
        if not trust_unverified:
            raise RunError(
                f"{str(st)!r} has no {js.name} beside it (the JSON sidecar that holds its SHA-256), so its weights "
                f"cannot be verified; keep the two files together, or {hint}"
            )
        try:
            meta = json.loads(md.get("meta", "{}"))
        except ValueError as e:
            raise RunError(f"{str(st)!r}: its embedded metadata is not JSON: {e}") from e
        if not isinstance(meta, dict) or not meta:
            raise RunError(f"{str(st)!r} has no {js.name} beside it and no embedded metadata")
        where = f"the metadata embedded in {str(st)!r}"
    check_checkpoint_meta(meta, where, keys)
    tensors = load_file(str(st))
    return meta, tensors


def check_class_count(num_classes: int, tensors: dict, where: str) -> None:
    """``RunError`` unless the class embeddings in ``tensors`` (``model.class_emb.weight``,
    ``ema.class_emb.weight``: num_classes + 1 rows, the last the null class) fit the config's
    ``num_classes`` (0: an unconditional network, which has none)."""
    for prefix in ("model.", "ema."):
        if not any(k.startswith(prefix) for k in tensors):
            continue
        w = tensors.get(f"{prefix}class_emb.weight")
        rows = None if w is None else int(w.shape[0])
        if num_classes == 0 and rows is not None:
            raise RunError(
                f"{where}: the weights hold a class embedding of {rows} rows ({rows - 1} classes and the null "
                "class) but the config is unconditional (num_classes = 0); the checkpoint does not match its "
                "config"
            )
        if num_classes > 0 and rows != num_classes + 1:
            got = "no class embedding" if rows is None else f"a class embedding of {rows} rows ({rows - 1} classes)"
            raise RunError(
                f"{where}: the config names num_classes = {num_classes} (a class embedding of "
                f"{num_classes + 1} rows with the null class) but the weights hold {got}; the checkpoint "
                "does not match its config"
            )


def rng_state_b64(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode("ascii")


def rng_state_from_b64(s: str) -> torch.Tensor:
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


def load_optimizer(opt, layout: dict, tensors: dict, where: str = "the checkpoint"):
    """Restore ``opt`` from the sidecar's layout and the checkpoint's tensors; ``RunError`` if they do not fit."""
    try:
        _restore_optimizer(opt, layout, tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise RunError(f"the optimizer state in {where} does not fit this model and optimizer: {e!r}") from e


def _restore_optimizer(opt, layout: dict, tensors: dict):
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
    tensors["loss_history"] = (
        torch.tensor(loss_history, dtype=torch.float64) if loss_history else torch.zeros(0, dtype=torch.float64)
    )
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


def write_run_config(out: Path, config, data: Data, model, world: int):
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


def legacy_run_files(out) -> list[str] | None:
    """For a run written before folders got a marker: the names in ``out`` that a training run
    writes, if ``out`` holds a readable diffmath run config (else None). ``rundir`` marks such a
    folder with these names when it is resumed, sampled or evaluated into."""
    try:
        read_run_config(out)
    except RunError:
        return None
    return sorted(p.name for p in Path(out).iterdir() if p.is_file() and not p.is_symlink() and _is_ours(p))


def _resume_point(out: Path, config, trust_unverified: bool) -> Path | None:
    stored = read_run_config(out)
    check_compatible(stored["config"], config, where=str(out / "config.json"))
    ck = latest_checkpoint(out)
    if ck is None:
        return None  # the run wrote its config but no checkpoint: start from scratch
    meta, _ = load_checkpoint(ck, verify=False, trust_unverified=trust_unverified, keys=RESUME_KEYS)
    check_compatible(meta["config"], config, where=str(ck))
    return ck


def prepare_out(
    out: Path, config, *, resume: bool, overwrite: bool, trust_unverified: bool = False, command: str = "train"
):
    """Check ``out`` against the flags and open it (``rundir.open_run``: created and marked, or
    resumed, or cleared of diffmath's files by ``overwrite``; locked). Returns ``(checkpoint to
    resume from or None, the folder's lock)``; the caller releases the lock. A resumed run is
    checked (config, latest checkpoint) before anything in ``out`` is touched."""
    out = Path(out)
    if resume and not overwrite and out.is_dir() and not is_empty(out):
        _resume_point(out, config, trust_unverified)  # read-only: refuse before the lock file is made
    lock = open_run(out, command, resume=resume, overwrite=overwrite, adopt=legacy_run_files)
    try:
        ck = _resume_point(out, config, trust_unverified) if resume else None
    except BaseException:
        lock.release()
        raise
    return ck, lock


def check_compatible(stored: dict, config, where: str):
    try:
        old = type(config).from_dict(stored).model_fields()
    except (TypeError, ValueError) as e:
        raise RunError(f"{where} does not hold a diffmath training config this version can read: {e}") from e
    new = config.model_fields()
    diff = [f"{k}: checkpoint {old.get(k)!r} vs now {new[k]!r}" for k in sorted(new) if old.get(k) != new[k]]
    if diff:
        raise RunError(
            f"cannot resume: {where} was written with a different configuration ("
            + "; ".join(diff)
            + f"). Only {', '.join(RESUMABLE_FIELDS)} may change on --resume; the existing checkpoints are left intact."
        )
