"""Atomic checkpoint directories: write aside, then rename into place.

Owns where a save writes, how it replaces an older checkpoint, and how a load
(or the next save) finds the checkpoint after a crash at any point. It does
not know what is inside the directories beyond two file names: DCP's
``.metadata`` and our commit marker ``shardlib.json``, written last.

Protocol for ``save(path)`` (``name`` = the last part of ``path``; siblings
live in the same parent directory, so every rename is atomic):

1. ``prepare``: if ``path`` is missing but a complete sibling is left from a
   crash, rename that sibling into place (the one `resolve` would load);
   then remove stale ``name.tmp-*``, ``name.old-*`` and ``name.del-*`` siblings.
2. the data goes to ``name.tmp-<hex>``; DCP fsyncs each file and writes its
   ``.metadata``; then the marker is written (fsync, `os.replace`): from here
   on the temporary directory is *complete*.
3. ``commit``: rename ``path`` to ``name.old-<hex>`` (if it exists), rename
   the temporary directory to ``path``, fsync the parent; then the old one is
   renamed to ``name.del-<hex>`` and deleted.

A kill at any point leaves one of: ``path`` (old or new, complete; stale
siblings around it), or no ``path`` and a complete ``tmp`` (new) and/or
``old`` sibling. `resolve` picks ``path`` if present, else the newest complete
``tmp``, else the newest complete ``old``, so a load returns the whole old or
the whole new checkpoint, never a mix. Directories are only ever deleted
after being renamed to ``name.del-*``, which `resolve` never reads, so a
half-deleted directory is never mistaken for a checkpoint.

Invariants: only one writer saves to one path at a time; every process of a
distributed save sees the same filesystem; only the coordinator (rank 0)
calls `prepare` and `commit`.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._errors import CheckpointError, CheckpointNotFoundError

__all__ = ["MARKER", "commit", "not_found", "prepare", "resolve", "temporary", "write_marker"]

MARKER = "shardlib.json"  # written last into a temporary directory: it is complete
DCP_METADATA = ".metadata"

# Test seam: called with the name of each step of the protocol ("recovered", "data",
# "written", "aside", "committed", "trashed"); a test raises there to stand for a crash.
_STEP_HOOK: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if _STEP_HOOK is not None:
        _STEP_HOOK(name)


# == finding checkpoints =======================================================
def _siblings(path: Path, tag: str) -> list[Path]:
    pattern = f"{glob.escape(path.name)}.{tag}-*"
    return sorted(p for p in path.parent.glob(pattern) if p.is_dir())


def is_checkpoint(d: Path) -> bool:
    """A DCP checkpoint directory (ours or anyone's): it has DCP's ``.metadata``."""
    return d.is_dir() and (d / DCP_METADATA).is_file()


def _complete(d: Path) -> bool:
    return is_checkpoint(d) and (d / MARKER).is_file()


def _newest(dirs: list[Path]) -> Path | None:
    done = [d for d in dirs if _complete(d)]
    return max(done, key=lambda d: (d / MARKER).stat().st_mtime_ns) if done else None


def resolve(path: Path) -> Path | None:
    """The directory a load of `path` reads: `path`, or what a crash left beside it.

    Examples:
        >>> import tempfile, pathlib
        >>> resolve(pathlib.Path(tempfile.mkdtemp()) / "ckpt") is None
        True
    """
    if is_checkpoint(path):
        return path
    if path.exists():
        return None
    return _newest(_siblings(path, "tmp")) or _newest(_siblings(path, "old"))


def not_found(path: Path, where: str) -> CheckpointNotFoundError:
    """The error for a `path` that holds no checkpoint, naming what is next to it."""
    parent = path.parent
    what = (
        "is a file, not a checkpoint directory"
        if path.is_file()
        else "is a directory without DCP's .metadata (not a checkpoint, or one still being written)"
        if path.is_dir()
        else "does not exist"
    )
    near: list[str] = []
    if parent.is_dir():
        near = sorted(p.name for p in parent.iterdir() if is_checkpoint(p) and p != path)
    hint = (
        f"Checkpoints next to it in {str(parent)!r}: {', '.join(near[:10])}"
        + (f" (and {len(near) - 10} more)" if len(near) > 10 else "")
        + "."
        if near
        else f"There is no checkpoint in {str(parent)!r}"
        + ("" if parent.is_dir() else " (that directory does not exist either)")
        + "."
    )
    return CheckpointNotFoundError(
        f"{where}: looked for a checkpoint directory {str(path)!r}, which {what}; nor is "
        f"there a complete {path.name}.tmp-* or {path.name}.old-* left beside it by an "
        f"interrupted save. {hint} Save one with sl.checkpoint.save(path, tree), or pass "
        "the directory that sl.checkpoint.save or torch.distributed.checkpoint.save wrote."
    )


# == writing ===================================================================
def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(d: Path, path: Path) -> None:
    """Delete a sibling of `path`, first renaming it to ``name.del-*`` so no load reads it
    half gone."""
    if not d.name.startswith(f"{path.name}.del-"):
        trash = path.with_name(f"{path.name}.del-{uuid.uuid4().hex}")
        os.rename(d, trash)
        _step("trashed")
        d = trash
    shutil.rmtree(d, ignore_errors=True)


def prepare(path: Path, where: str) -> None:
    """Before a save: recover a checkpoint a crash left beside `path`, drop stale siblings."""
    if path.exists() and not is_checkpoint(path):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()  # an empty directory (tempfile.mkdtemp()) is taken as a free name
        else:
            kind = "file" if not path.is_dir() else "non-empty directory without DCP's .metadata"
            raise CheckpointError(
                f"{where}: {str(path)!r} exists and is a {kind}, not a checkpoint; a save "
                "replaces an older checkpoint at its path, never other data. Pass a new path, "
                "or remove that one yourself if it is meant to go."
            )
    if not path.exists():
        found = resolve(path)
        if found is not None:
            os.rename(found, path)
            _fsync_dir(path.parent)
            _step("recovered")
    for tag in ("tmp", "old", "del"):
        for d in _siblings(path, tag):
            _discard(d, path)


def temporary(path: Path) -> Path:
    """A fresh temporary sibling of `path` for the new checkpoint's files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")


def write_marker(tmp: Path, content: dict[str, Any]) -> None:
    """Write the commit marker last (fsync, then atomic rename): `tmp` is now complete."""
    for f in tmp.iterdir():  # DCP fsynced its files; make sure of every one
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    part = tmp / (MARKER + ".part")
    with open(part, "w") as fh:
        json.dump(content, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(part, tmp / MARKER)
    _fsync_dir(tmp)
    _step("written")


def commit(tmp: Path, path: Path) -> None:
    """Put the complete `tmp` at `path`, replacing an older checkpoint there."""
    aside = None
    if path.exists():
        aside = path.with_name(f"{path.name}.old-{uuid.uuid4().hex}")
        os.rename(path, aside)
        _step("aside")
    os.rename(tmp, path)
    _fsync_dir(path.parent)
    _step("committed")
    if aside is not None:
        _discard(aside, path)


def read_marker(d: Path) -> dict[str, Any] | None:
    """Our marker's content (layouts, meshes, kinds per key), or None for a foreign checkpoint."""
    f = d / MARKER
    if not f.is_file():
        return None
    with open(f) as fh:
        return json.load(fh)
