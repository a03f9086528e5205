"""Files written whole or not at all: a temporary file in the same folder, flushed to disk, then
renamed over the target. A small leaf module (no package imports): the run folders, the results
and the compat checkpoints all write through it."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union

TEMPORARY_SUFFIX = ".tmp"


def atomic_write_bytes(path: Union[str, Path], writer) -> None:
    """Write through ``writer(tmp_path)`` to a temporary file in the same folder, flush it to disk,
    then rename it over ``path`` (and flush the folder), so that ``path`` is the old file or the
    whole new one, also after a crash. A failed write (a full disk, a read-only folder) is an
    OSError naming ``path``; the temporary file is removed."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=TEMPORARY_SUFFIX, dir=path.parent)
        os.close(fd)
        writer(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results and masks are meant to be shared
        with open(tmp, "r+b") as fh:  # write access: Windows' fsync (_commit) needs it
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":  # safetensors' own IO errors
            raise OSError(f"could not write {path}: {exc}") from exc
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Flush the rename to disk, where the file system can: best effort, as the file is in place
    already (Windows has no folder handles; some network file systems refuse a folder's fsync)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_temporaries(*folders: Path) -> None:
    """Delete the temporary files that ``atomic_write_bytes`` leaves when a process is killed
    mid-write (``NAME.<random>.tmp``). Call it only where no writer can be at work: the end of a run."""
    for folder in folders:
        if folder.is_dir():
            for tmp in folder.glob(f"*.*{TEMPORARY_SUFFIX}"):
                if tmp.is_file():
                    tmp.unlink(missing_ok=True)
