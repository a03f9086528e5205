"""A run folder's identity and ownership: what makes a mask file belong to a run, and one lock.

Every mask and checkpoint file of a run carries ``run_identity(config, data)``: a hash of the
settings that shape the masks, the seed, the model spec (inside those settings) and a fingerprint
of the training data, plus the task index. Loading a file into a run compares them and names the
first mismatch, so a file from another run is never evaluated or resumed as if it were its own.
Evaluation settings are not part of it: they may change on ``--resume`` and in ``evaluate``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch


# RunConfig fields that change what a task's mask is. Everything else (evaluation settings,
# the number of tasks, evaluation points, where data is read from, backend, device, launch
# mode) can change between an interrupted run and its --resume.
MASK_SETTINGS = ("benchmark", "model", "output_size", "iters", "epochs", "batch_size", "lr", "optimizer",
                 "weight_decay", "scheduler", "warmup_epochs", "image_size", "mask_fn", "density",
                 "er_multiplier", "init", "seed", "train_subset", "transfer", "mask_budget", "nns_epsilon",
                 "nns_check_every", "nns_score_cache")


class RunDirError(ValueError):
    """The output folder holds another run, or a run that cannot be resumed with this config."""


def mask_settings(config) -> dict:
    """The settings that decide the trained bits (their digest is a file's settings_sha256)."""
    values = config.to_dict()
    shaping = {k: values.get(k) for k in MASK_SETTINGS}
    shaping["allocates_masks"] = values.get("scenario") == "NNs"  # NNs masks differ from per-task masks
    shaping["hopfield"] = values.get("inference") == "hopfield"
    return shaping


def settings_digest(config) -> str:
    return hashlib.sha256(json.dumps(mask_settings(config), sort_keys=True).encode()).hexdigest()


def data_fingerprint(tasks) -> str:
    """A hash of the training data's arrays (MNIST, CIFAR) or file list (ImageNet): a resume on
    other data (another --data-root, the embedded subset) is refused."""
    h = hashlib.sha256()
    mnist = getattr(tasks, "mnist", None)
    data = getattr(tasks, "_data", None) or getattr(tasks, "data", None)
    if mnist is not None:
        arrays = [mnist.train_images, mnist.train_labels]
    elif isinstance(data, dict) and isinstance(data.get("train"), tuple):
        arrays = list(data["train"])
    else:
        arrays = []
        h.update(json.dumps(data.get("classes") if isinstance(data, dict) else str(type(tasks))).encode())
        train = data.get("train", {}) if isinstance(data, dict) else {}
        for cls in sorted(train):
            for f in train[cls]:
                h.update(f"{Path(f).name}:{Path(f).stat().st_size}".encode())
    for a in arrays:
        t = torch.as_tensor(a).contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def run_identity(config, data_sha256: str, task: Optional[int] = None) -> dict:
    # The settings themselves too: a refusal names the ones that differ.
    ident = {"settings_sha256": settings_digest(config), "data_sha256": data_sha256, "settings": mask_settings(config)}
    if task is not None:
        ident["task"] = task
    return ident


def check_identity(path: Path, extra: dict, expected: dict) -> None:
    """Refuse a mask file whose recorded identity differs from the run loading it."""
    found = extra.get("run_identity") if isinstance(extra, dict) else None
    if found is None:
        raise RunDirError(f"{path} carries no run identity (written by an older version or by hand); "
                          f"delete it to retrain, or start a new --out")
    if not isinstance(found, dict):
        raise RunDirError(f"{path} has a malformed run identity (a {type(found).__name__}, not a JSON object): "
                          f"the file was modified; delete it to retrain, or start a new --out")
    remedy = ("if this run's config.json was edited since, restore it; otherwise the file is another run's: move it "
              "away to retrain what it held, or choose another --out")
    if "settings_sha256" in expected and found.get("settings_sha256") != expected["settings_sha256"]:
        theirs, ours = found.get("settings"), expected.get("settings")
        if isinstance(theirs, dict) and isinstance(ours, dict):
            differ = "; ".join(f"{k} {theirs.get(k)!r} in the file, {ours.get(k)!r} in this run"
                               for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k))
        else:  # a file written before identities named their settings
            differ = f"settings_sha256 {found.get('settings_sha256')!r} in the file, {expected['settings_sha256']!r} in this run"
        raise RunDirError(f"{path} belongs to another run: the settings that shape the masks differ ({differ}); {remedy}")
    names = {"data_sha256": "the training data (another --data-root or the embedded subset) differs",
             "task": "the task index differs"}
    for key, what in names.items():
        if key in expected and found.get(key) != expected[key]:
            raise RunDirError(f"{path} belongs to another run: {what} ({key} {found.get(key)!r} in the file, "
                              f"{expected[key]!r} in this run); {remedy}")


def masks_digest(checksums) -> str:
    """Identifies the checkpoints an evaluation row was computed from."""
    return hashlib.sha256("\n".join(checksums).encode()).hexdigest()


def check_writable(out: Path) -> None:
    """Fail now, not after loading data, if ``out`` cannot become a run folder."""
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise RunDirError(f"--out {out}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunDirError(f"--out {out}: {probe} is not writable")
    if out.is_dir():  # an earlier run's folder: what the run will write into must be writable too
        checkpoints, lock = out / "checkpoints", out / ".lock"
        if checkpoints.exists() and not (checkpoints.is_dir() and os.access(checkpoints, os.W_OK | os.X_OK)):
            raise RunDirError(f"--out {out}: {checkpoints} is not a writable folder")
        if lock.exists() and not (lock.is_file() and os.access(lock, os.W_OK)):
            raise RunDirError(f"--out {out}: its lock file {lock} is not a writable file")


class RunLock:
    """An exclusive lock on a run folder for the run's lifetime (fcntl on POSIX, msvcrt on
    Windows). A second run on the same folder is refused with the holder's pid. Under torchrun only
    rank 0 takes it: the ranks share one run."""

    def __init__(self, out: Path):
        self.path = out / ".lock"
        self.fh = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            _lock(fh)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise RunDirError(f"{self.path.parent} is in use by another run (pid {holder}); wait for it to finish "
                              f"or choose another --out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self.fh = fh
        return self

    def release(self) -> None:
        if self.fh is not None:
            _unlock(self.fh)
            self.fh.close()
            self.fh = None


if os.name == "nt":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _lock(fh) -> None:
        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)

    def _unlock(fh) -> None:
        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _lock(fh) -> None:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(fh) -> None:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
