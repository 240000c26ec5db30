"""File I/O of the pipeline: atomic writes, and safetensors files with a JSON sidecar.

Every file the pipeline writes (checkpoints, configs, samples, figures, reports) goes through
``atomic_write_bytes``: a temp file in the same folder, fsync, then ``os.replace``, so a reader
sees the old file or the new one, never a partial write. Weights are safetensors whose header
metadata carries ``format=<a diffmath format string>``, with a JSON sidecar (same stem, ``.json``)
holding the SHA-256 of the weights file; reading them never unpickles anything.

A folder that diffmath writes into carries a marker file, ``.diffmath-run`` (``MARKER``): JSON
naming the command that created it and listing every file (``files``) and sub-folder run (``runs``)
diffmath wrote there. ``atomic_write_bytes`` adds each file it writes to the marker of its folder,
when the folder has one; ``diffmath.pipeline.rundir`` creates markers, takes the folder's lock and uses the
lists to delete exactly what diffmath wrote (``--overwrite``) and nothing else.

Used by ``train`` (checkpoints), ``sample``, ``evaluate`` and the latent-diffusion modules.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_write_npz",
    "sha256_file",
    "weights_and_sidecar",
    "save_safetensors",
    "safetensors_metadata",
    "read_sidecar",
    "MARKER",
    "LOCK_FILE",
    "MARKER_FORMAT",
    "read_marker",
    "write_marker",
    "forget_file",
]

MARKER = ".diffmath-run"
LOCK_FILE = ".diffmath.lock"
MARKER_FORMAT = "diffmath.folder/1"
# the name of a temp file of atomic_write_bytes: "." + target name + "." + mkstemp's 8 characters + ".tmp"
TEMP_RE = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


_UMASK = _umask()


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to a temp file in the same folder, fsync, then os.replace onto ``path``:
    readers see the old file or the new one, never a partial write. The file is then listed in
    the folder's marker (``MARKER``), if the folder has one."""
    path = Path(path)
    _write_atomically(path, data)
    if path.name not in (MARKER, LOCK_FILE):
        _record(path)


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj) -> None:
    """``obj`` as JSON (indent 2, keys in insertion order, a final newline), atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def atomic_write_text(path, lines) -> None:
    """The lines joined by newlines, with a final newline (UTF-8), atomically."""
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def atomic_write_npz(path, **arrays) -> None:
    """``numpy.savez(path, **arrays)`` (uncompressed), built in memory and written atomically."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def sha256_file(path) -> str:
    """The SHA-256 hex digest of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_and_sidecar(path) -> tuple[Path, Path]:
    """(the .safetensors path, the .json sidecar path) of a checkpoint given by either one."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return p, p.with_suffix(".json")
    return p.with_suffix(".safetensors"), p


def save_safetensors(path, tensors: dict, fmt: str, meta: dict) -> str:
    """Write ``tensors`` to ``path`` as safetensors with header metadata ``format=fmt`` and
    ``meta`` (as JSON), atomically; returns the SHA-256 of the bytes written (for the sidecar)."""
    from safetensors.torch import save

    blob = _canonical_header(save(tensors, metadata={"format": fmt, "meta": json.dumps(meta)}))
    atomic_write_bytes(path, blob)
    return hashlib.sha256(blob).hexdigest()


def _canonical_header(blob: bytes) -> bytes:
    """``blob`` with its safetensors header metadata in sorted key order, so that the same
    tensors and metadata give the same bytes (and SHA-256) in every run: the library writes the
    metadata from a Rust HashMap, whose order is random per map. The header is an 8-byte
    little-endian length n, then n bytes of JSON padded with spaces to a multiple of 8; the
    tensors' data_offsets count from the end of the header, so re-writing it keeps them valid."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + n :]


def safetensors_metadata(path, fmt: str, what: str, error=ValueError) -> dict:
    """The safetensors header metadata of ``path``, which must carry ``format=fmt``; ``error``
    naming the file otherwise (unreadable, or not a diffmath ``what``)."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise error(f"{str(path)!r} is not a readable safetensors file: {e}") from e
    if md.get("format") != fmt:
        raise error(f"{str(path)!r} is not a diffmath {what} (its safetensors metadata lacks format={fmt!r})")
    return md


def read_json(path, fmt: str, what: str, error=ValueError) -> dict:
    """A diffmath JSON file: readable, a JSON object, ``format == fmt``; ``error`` naming the
    file otherwise."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise error(f"{str(path)!r} is not a readable diffmath {what} (unreadable JSON: {e})") from e
    if not isinstance(d, dict) or d.get("format") != fmt:
        raise error(f"{str(path)!r} is not a diffmath {what} (expected a JSON object with format {fmt!r})")
    return d


def read_sidecar(js: Path, st: Path, fmt: str, what: str, error=ValueError, verify: bool = True) -> dict:
    """The JSON sidecar ``js`` of the weights ``st``: ``read_json`` with ``format == fmt`` and a
    ``weights_sha256`` (a hex SHA-256) that (with ``verify``) matches ``st``'s bytes; ``error``
    naming the file otherwise (a sidecar without the hash cannot vouch for the weights)."""
    meta = read_json(js, fmt, what, error)
    digest = meta.get("weights_sha256")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise error(
            f"{str(js)!r} lacks a valid 'weights_sha256' (a SHA-256 hex digest; got {digest!r:.100}), so the "
            f"weights {str(st)!r} cannot be verified"
        )
    if verify and digest != sha256_file(st):
        raise error(f"{str(st)!r} does not match {str(js)!r} (SHA-256 differs): the {what} is damaged")
    return meta


# ----------------------------------------------------------------------------- the folder marker
def _plain_name(n) -> bool:
    return isinstance(n, str) and n not in ("", ".", "..") and "/" not in n and "\\" not in n and "\0" not in n


def read_marker(folder) -> dict | None:
    """The marker (``MARKER``) of ``folder`` as a dict, or None if it has none. ``ValueError``
    naming the file if it is not a diffmath marker (unreadable, another format, or ``files`` /
    ``runs`` that are not lists of plain names: a marker never points outside its folder)."""
    p = Path(folder) / MARKER
    if not p.is_file() or p.is_symlink():
        return None
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{str(p)!r} is not a readable diffmath folder marker: {e}") from e
    if not isinstance(d, dict) or d.get("format") != MARKER_FORMAT:
        raise ValueError(
            f"{str(p)!r} is not a diffmath folder marker (expected a JSON object with format {MARKER_FORMAT!r})"
        )
    for key in ("files", "runs"):
        v = d.get(key)
        if not isinstance(v, list) or not all(_plain_name(n) for n in v):
            raise ValueError(f"{str(p)!r} is damaged: {key!r} must be a list of file names in that folder; got {v!r}")
    return d


def write_marker(folder, marker: dict) -> None:
    """Write ``marker`` as the marker of ``folder`` (atomically; the marker itself is not listed)."""
    _write_atomically(Path(folder) / MARKER, (json.dumps(marker, indent=2) + "\n").encode())


def _update_marker(folder: Path, key: str, name: str, add: bool) -> None:
    try:
        m = read_marker(folder)
    except ValueError:
        return  # a damaged marker is reported where it is used (rundir), never rewritten here
    if m is None or (name in m[key]) == add:
        return
    m[key] = sorted(set(m[key]) | {name}) if add else [n for n in m[key] if n != name]
    write_marker(folder, m)


def _record(path: Path) -> None:
    """List ``path`` in its folder's marker (if the folder has one and it is not listed yet)."""
    _update_marker(path.parent, "files", path.name, True)


def forget_file(path) -> None:
    """Delete ``path`` (if it exists) and drop it from its folder's marker."""
    path = Path(path)
    path.unlink(missing_ok=True)
    _update_marker(path.parent, "files", path.name, False)
