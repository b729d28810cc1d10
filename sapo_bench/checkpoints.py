"""Crash-safe checkpoint files: how a run's checkpoint is published, checked and chosen for resume.

A checkpoint is written whole to `last.ckpt.tmp`, flushed to disk, and only then renamed over
`last.ckpt`; the one it replaces becomes `last.prev.ckpt`. A kill at any moment therefore leaves
at least one complete checkpoint. Resuming checks `last.ckpt` and then `last.prev.ckpt` and takes
the first that is intact; one that is not is named in the log and moved aside to `*.bad`.

No Lightning import here: `sapo-sweep` reads these names without paying for it
(the callback that writes checkpoints this way is `sapo_bench.train.SafeCheckpoint`).
"""

from __future__ import annotations

import logging
import os
import shutil
import zipfile
from pathlib import Path

from sapo_bench.io import fsync_dir, fsync_tree

log = logging.getLogger("sapo_bench")

LAST = "last.ckpt"
PREVIOUS = "last.prev.ckpt"
RESUMABLE = (LAST, PREVIOUS)  # in the order resume tries them


class CheckpointError(RuntimeError):
    """No checkpoint of a run can be resumed from."""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Make the complete checkpoint `tmp` the new `path`, keeping the one it replaces as
    `last.prev.ckpt` beside it. Each step is a rename, so a crash between them leaves the old or
    the new file under each name, never a partial one."""
    tmp, path = Path(tmp), Path(path)
    fsync_tree(tmp)  # the data is on disk before any name points at it
    if path.exists():
        prev = path.with_name(PREVIOUS)
        if prev.is_dir():  # sharded checkpoints (DeepSpeed) are folders; a rename cannot replace one
            _remove(prev)
        os.replace(path, prev)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be resumed from, or None if it is intact.

    A file checkpoint is a torch zip archive: its central directory must be readable (a truncated
    or zero-filled file has none) and every member must match the CRC written with it (a flipped
    byte that torch.load would not notice). That reads the whole file once, which is what the
    resume then does anyway. A sharded checkpoint (a folder) is only checked for being non-empty.
    """
    path = Path(path)
    try:
        if path.is_dir():
            return None if any(path.iterdir()) else "it is an empty folder"
        size = path.stat().st_size
        if size == 0:
            return "it is empty (0 bytes)"
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            broken = z.testzip()
    except zipfile.BadZipFile as e:
        return f"it is truncated or corrupt: not a complete zip archive ({e}; {size} bytes)"
    except Exception as e:  # noqa: BLE001 - whatever else a damaged archive raises, it is unusable
        return f"it cannot be read ({type(e).__name__}: {e})"
    if broken is not None:
        return f"it is corrupt: {broken} fails its CRC check"
    if not any(n.endswith("data.pkl") for n in names):
        return "it is a zip archive but not a torch checkpoint (no data.pkl)"
    return None


def resume_checkpoint(ckpt_dir: str | os.PathLike, *, move_bad: bool = True) -> Path | None:
    """The checkpoint to resume from: `last.ckpt` if intact, else `last.prev.ckpt`; None if there
    is neither (a fresh start). A damaged one is logged and, once an intact one is found, moved
    aside to `<name>.bad` (with `move_bad`; only one process of a run should) so that the next save
    does not rotate it over the good one. Raises CheckpointError naming every damaged file, and
    what to do, when none is usable."""
    ckpt_dir = Path(ckpt_dir)
    found = [ckpt_dir / name for name in RESUMABLE if (ckpt_dir / name).exists()]
    bad: list[tuple[Path, str]] = []
    for path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            for b, why in bad:
                aside = b.with_name(b.name + ".bad")
                if move_bad:
                    try:
                        _remove(aside)
                        os.replace(b, aside)
                    except FileNotFoundError:  # another process of this run moved it first
                        pass
                log.warning("checkpoint %s is unusable (%s); resuming from the previous one, %s%s", b, why,
                            path, f" (the bad file is kept as {aside})" if move_bad else "")
            return path
        bad.append((path, problem))
    if not bad:
        return None
    details = "; ".join(f"{p}: {why}" for p, why in bad)
    raise CheckpointError(
        f"cannot resume the run in {ckpt_dir.parent}: no usable checkpoint ({details}). Either restore a good "
        f"copy as {ckpt_dir / LAST}, or move the checkpoints away to restart the run from step 0 "
        f"(mv {ckpt_dir} {ckpt_dir}.broken); its metrics.jsonl is then started afresh")
