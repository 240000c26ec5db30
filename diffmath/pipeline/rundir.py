"""Folders that diffmath writes into: the marker that lists what diffmath wrote, the lock that
keeps one writer per folder, and the rules of ``--overwrite``, ``--resume`` and temp files.

- **Marker.** ``.diffmath-run`` (``diffmath.pipeline.io.MARKER``) is JSON: the format, a random
  ``run_id``, the command that created the folder, when, and the lists ``files`` (every file that
  diffmath wrote there; ``diffmath.pipeline.io.atomic_write_bytes`` adds them as it writes) and ``runs``
  (sub-folders that diffmath created there, each with its own marker: ``unet/`` and ``vae/`` of a
  latent run, ``pixel/`` of a comparison). It is written when diffmath creates a folder or first
  writes into an empty one.
- **Lock.** ``.diffmath.lock``: an exclusive, non-blocking ``flock`` (``fcntl``; ``msvcrt`` on
  Windows) held while a command writes into the folder (train, demo, sample and evaluate into
  their ``--out``). The operating system drops it when the process ends, killed or not. A second
  writer gets ``RunError`` naming the holder. The lock is re-entrant within one process (the demo
  trains, samples and evaluates in one folder).
- **--overwrite** deletes exactly the files that the marker lists, the temp files of killed
  writes, and the listed sub-runs (recursively, by their own markers); every other file stays. A
  non-empty folder without a marker is refused and nothing in it is deleted.
- **Temp files** (``.NAME.XXXXXXXX.tmp`` of ``atomic_write_bytes``, for a NAME that diffmath
  writes) left by a killed write are deleted on ``--resume`` and ``--overwrite``, only in a
  marked folder.

Nothing here imports torch; ``RunError`` lives here (``diffmath.pipeline.checkpoint`` re-exports it).
"""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from pathlib import Path

from .io import LOCK_FILE, MARKER, MARKER_FORMAT, TEMP_RE, read_marker, write_marker

__all__ = [
    "RunError",
    "FolderLock",
    "lock_folder",
    "open_run",
    "claim_output",
    "clear_run",
    "clean_temp_files",
    "is_empty",
    "marker",
    "new_marker",
    "KNOWN_FILES",
]

# Every file name diffmath writes into a folder (train and latent runs, VAEs, comparisons): a temp
# file is recognised as ours only if its target has one of these names or is listed in the marker.
KNOWN_FILES = re.compile(
    r"^(config\.json|loss\.png|schedule\.png|samples\.npz|samples\.png|metrics\.json|report\.md"
    r"|step-\d{6,}\.(json|safetensors)|latent\.json|latents\.safetensors|latents\.json|vae\.json|vae\.safetensors"
    r"|recon\.png|comparison\.json|comparison\.md|classes\.npz|classes\.png|guidance\.png|guidance\.json|\.diffmath-run)$"
)


class RunError(ValueError):
    """A run directory or checkpoint that cannot be used as asked (message says why)."""


# ----------------------------------------------------------------------------- marker
def marker(folder) -> dict | None:
    """The folder's marker (None if it has none); ``RunError`` if it is damaged."""
    try:
        return read_marker(folder)
    except ValueError as e:
        raise RunError(f"{e}; diffmath will not delete or add files by it (remove or repair the marker)") from None


def new_marker(command: str, files=(), runs=()) -> dict:
    """A fresh marker: format, run_id, the command, the time, and the lists."""
    return {
        "format": MARKER_FORMAT,
        "run_id": uuid.uuid4().hex,
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "files": sorted(set(files)),
        "runs": sorted(set(runs)),
    }


def _ours_temp(folder: Path, name: str, listed: set) -> bool:
    m = TEMP_RE.match(name)
    return bool(m) and (m.group("target") in listed or bool(KNOWN_FILES.match(m.group("target"))))


def is_empty(folder) -> bool:
    """No entries but diffmath's marker, lock and (in a marked folder) its temp files."""
    folder = Path(folder)
    m = marker(folder)
    listed = set(m["files"]) if m else set()
    for p in folder.iterdir():
        if p.name in (MARKER, LOCK_FILE) or (m is not None and _ours_temp(folder, p.name, listed)):
            continue
        return False
    return True


def _note_subfolder(folder: Path) -> None:
    """List ``folder`` among the runs of its parent, if the parent is marked."""
    parent = folder.parent
    m = marker(parent) if parent.is_dir() else None
    if m is not None and folder.name not in m["runs"]:
        m["runs"] = sorted(set(m["runs"]) | {folder.name})
        write_marker(parent, m)


def _mkdir(folder: Path) -> None:
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    if created:
        _note_subfolder(folder)


# ----------------------------------------------------------------------------- lock
_HELD: dict[str, list] = {}  # realpath -> [fd, count]: the locks this process holds


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class FolderLock:
    """The exclusive lock of one folder held by this process; ``release()`` (or ``with``) lets it go."""

    def __init__(self, key: str, folder: Path):
        self.key, self.folder, self.released = key, folder, False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        entry = _HELD.get(self.key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[self.key]
            os.close(entry[0])  # closing the descriptor drops the flock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def lock_folder(folder, command: str) -> FolderLock:
    """Take the exclusive lock of ``folder`` (which must exist) for ``command``; ``RunError`` naming
    the holder if another process has it. Re-entrant within this process."""
    folder = Path(folder)
    key = os.path.realpath(folder)
    if key in _HELD:
        _HELD[key][1] += 1
        return FolderLock(key, folder)
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunError(f"cannot create the lock file {str(path)!r}: {e}") from e
    if not _try_lock(fd):
        try:
            holder = os.read(fd, 512).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise RunError(
            f"{str(folder)!r} is in use by another diffmath process ({holder}); wait for it to finish, or use "
            "another --out"
        )
    os.ftruncate(fd, 0)
    os.write(
        fd,
        f"{command}, pid {os.getpid()} on {socket.gethostname()}, "
        f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(),
    )
    _HELD[key] = [fd, 1]
    return FolderLock(key, folder)


# ----------------------------------------------------------------------------- clean-up
def clean_temp_files(folder) -> list[Path]:
    """Delete the temp files of killed writes (``.NAME.XXXXXXXX.tmp`` for a NAME diffmath writes or
    the marker lists) in a marked ``folder`` and its listed sub-runs; returns what was deleted.
    Call with the folder's lock held. An unmarked folder is left alone."""
    folder = Path(folder)
    m = marker(folder)
    if m is None:
        return []
    listed = set(m["files"])
    gone = []
    for p in folder.iterdir():
        if p.is_file() and not p.is_symlink() and _ours_temp(folder, p.name, listed):
            p.unlink(missing_ok=True)
            gone.append(p)
    for name in m["runs"]:
        sub = folder / name
        if sub.is_dir() and not sub.is_symlink() and marker(sub) is not None:
            gone += clean_temp_files(sub)
    return gone


def clear_run(folder, keep=(), command: str = "overwrite") -> list[Path]:
    """Delete what diffmath wrote in ``folder`` (call with its lock held): the files its marker
    lists, the temp files of killed writes, and the listed sub-runs (each cleared under its own
    lock, then removed if nothing else is left in it). Sub-folders in ``keep`` stay. Files that the
    marker does not list are never touched. Returns the deleted paths; the marker is kept with
    empty lists (plus the kept sub-runs)."""
    folder = Path(folder)
    m = marker(folder)
    if m is None:
        raise RunError(f"{str(folder)!r} has no diffmath marker ({MARKER}); nothing in it is deleted")
    keep = {os.path.realpath(k) for k in keep}
    gone = clean_temp_files(folder)
    for name in m["files"]:
        p = folder / name
        if p.is_symlink() or p.is_file():  # a link is removed, never what it points to
            p.unlink()
            gone.append(p)
    kept_runs = []
    for name in m["runs"]:
        sub = folder / name
        if os.path.realpath(sub) in keep:
            kept_runs.append(name)
            continue
        if not sub.is_dir() or sub.is_symlink() or marker(sub) is None:
            continue  # gone, replaced, or not ours
        with lock_folder(sub, command):
            gone += clear_run(sub, command=command)
            if is_empty(sub):
                for n in (MARKER, LOCK_FILE):
                    (sub / n).unlink(missing_ok=True)
                sub.rmdir()
            else:
                kept_runs.append(name)  # foreign files remain in it: keep the (emptied) marker
    write_marker(folder, {**m, "files": [], "runs": sorted(kept_runs)})
    return gone


# ----------------------------------------------------------------------------- opening a folder
def _check_open(out: Path, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise RunError("--resume and --overwrite contradict each other; pick one")
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {str(out)!r} exists and is a file, not a directory")
    empty = not out.exists() or is_empty(out)
    if resume:
        if empty:
            raise RunError(f"--resume: {str(out)!r} holds no run to resume (missing or empty)")
        return
    if empty:
        return
    if not overwrite:
        raise RunError(
            f"--out {str(out)!r} already exists and is not empty; pass --resume to continue that run or "
            "--overwrite to replace it"
        )
    if marker(out) is None:
        raise RunError(
            f"--overwrite: {str(out)!r} is not a folder that diffmath wrote (it has no {MARKER} marker listing "
            "diffmath's files), so nothing in it is deleted; choose another --out, or empty it yourself"
        )


def open_run(out, command: str, *, resume: bool = False, overwrite: bool = False, keep=(), adopt=None) -> FolderLock:
    """Open the run folder ``out`` for writing, after checking the flags, and return its lock:

    - new or empty: created, marked;
    - ``overwrite``: must be marked; ``clear_run`` (sub-folders in ``keep`` stay), a fresh marker;
    - ``resume``: must be non-empty (the caller checks its content); an unmarked folder (a run
      written before markers existed) is marked with the names ``adopt(out)`` returns, if it
      returns a list (files, and sub-runs as "name/", marked in turn with the diffmath file
      names they hold); then the temp files of killed writes are deleted;
    - anything else non-empty: ``RunError`` (pass --resume or --overwrite).

    Every check runs before anything is created or deleted, and again under the lock."""
    out = Path(out)
    _check_open(out, resume, overwrite)  # read-only: a refusal leaves no trace
    _mkdir(out)
    lock = lock_folder(out, command)
    try:
        _check_open(out, resume, overwrite)
        if resume:
            if marker(out) is None and adopt is not None:
                names = adopt(out)
                if names is not None:
                    _adopt(out, command, names)
            clean_temp_files(out)
        elif is_empty(out):
            write_marker(out, new_marker(command, runs=(marker(out) or {}).get("runs", ())))
        else:  # overwrite of a marked folder
            clear_run(out, keep, command)
            kept = marker(out)["runs"]
            write_marker(out, new_marker(command, runs=kept))
    except BaseException:
        lock.release()
        raise
    return lock


def _adopt(out: Path, command: str, names) -> None:
    """Mark ``out`` (a run written before markers existed) with ``names``: file names, and
    sub-run folders written as "name/", each marked in turn with the diffmath file names it holds."""
    files = [n for n in names if not n.endswith("/")]
    runs = [n[:-1] for n in names if n.endswith("/") and (out / n[:-1]).is_dir() and not (out / n[:-1]).is_symlink()]
    for r in runs:
        sub = out / r
        if marker(sub) is None:
            write_marker(
                sub,
                new_marker(
                    command,
                    [
                        p.name
                        for p in sub.iterdir()
                        if p.is_file() and not p.is_symlink() and KNOWN_FILES.match(p.name) and p.name != MARKER
                    ],
                ),
            )
    write_marker(out, new_marker(command, files, runs))


def _unlisted(out: Path, names, adopt) -> list[str]:
    if not out.is_dir():
        return []
    m = marker(out)
    if m is not None:
        listed = set(m["files"])
    else:
        listed = set((adopt(out) if adopt is not None else None) or ())
    return [n for n in names if os.path.lexists(out / n) and n not in listed]


def claim_output(out, command: str, names, adopt=None) -> FolderLock:
    """Lock the folder ``out`` to write the files ``names`` into it (sample, evaluate): created
    and marked if new; an existing folder without a marker is marked (with the files ``adopt(out)``
    returns for a run written before markers existed). ``RunError`` if one of ``names`` exists and
    diffmath did not write it (the marker does not list it): nothing is replaced."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {str(out)!r} exists and is a file, not a directory")

    def check(adopt_):
        bad = _unlisted(out, names, adopt_)
        if bad:
            raise RunError(
                f"--out {str(out)!r} already holds {', '.join(bad)}, which diffmath did not write (its {MARKER} "
                "marker does not list it); nothing is replaced: choose another --out or move the file"
            )

    check(adopt)
    _mkdir(out)
    lock = lock_folder(out, command)
    try:
        if marker(out) is None:
            _adopt(out, command, (adopt(out) if adopt is not None else None) or ())
        check(None)
    except BaseException:
        lock.release()
        raise
    return lock
