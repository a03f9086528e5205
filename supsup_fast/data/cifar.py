"""SplitCIFAR100 from the standard ``cifar-100-python`` folder (pickled ``train`` / ``test`` dicts),
with the official code's class split and augmentation, in plain torch (no torchvision)."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .mnist import DataError
from .tasks import TaskSequence, TaskSplit, check_classes_present

CIFAR100_MEAN = (0.491, 0.482, 0.447)
CIFAR100_STD = (0.247, 0.243, 0.262)


def _find_cifar100(root: Path) -> Path:
    for folder in (root, root / "cifar-100-python"):
        if (folder / "train").is_file() and (folder / "test").is_file():
            return folder
    raise DataError(f"--data-root {root} has no cifar-100-python/train and test files (the standard "
                    f"CIFAR-100 python version: unpack https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz "
                    f"into {root})")


def _read_split(path: Path) -> Tuple[torch.Tensor, torch.Tensor]:
    try:
        with open(path, "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
    except Exception as exc:  # a damaged or foreign pickle fails in many ways (naming classes it cannot find, too)
        raise DataError(f"cannot read CIFAR-100 file {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(d, dict):
        raise DataError(f"{path} is not a CIFAR-100 batch (expected a pickled dict)")
    data, labels = d.get(b"data", d.get("data")), d.get(b"fine_labels", d.get("fine_labels"))
    if data is None or labels is None:
        raise DataError(f"{path} lacks 'data' or 'fine_labels' (a CIFAR-10 batch has 'labels' instead)")
    try:  # as stored, before any cast: a cast would wrap pixels past 255, zero float pixels and truncate float labels
        data, labels = np.asarray(data), np.asarray(labels)
    except ValueError as exc:
        raise DataError(f"{path}: 'data' and 'fine_labels' must be arrays ({exc})") from exc
    if data.size == 0 or labels.size == 0:
        raise DataError(f"{path} holds no images")
    if data.dtype != np.uint8:
        raise DataError(f"{path}: data must be uint8 pixels (0..255), got {data.dtype}")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{path}: fine labels must be integers, got {labels.dtype}")
    if data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1 or len(data) != len(labels):
        raise DataError(f"{path}: data must be [N, 3072] with N labels, got {data.shape} and {labels.shape}")
    if labels.min() < 0 or labels.max() > 99:
        raise DataError(f"{path}: fine labels must be in 0..99")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels.astype(np.int64))


def load_cifar100(data_root: Union[str, Path]) -> dict:
    """uint8 images [N, 3, 32, 32] and fine labels for both splits."""
    if data_root is None:
        raise DataError("split-cifar100 needs --data-root (a folder holding cifar-100-python/)")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"--data-root {root} is not a folder")
    folder = _find_cifar100(root)
    xtr, ytr = _read_split(folder / "train")
    xte, yte = _read_split(folder / "test")
    if (len(ytr), len(yte)) == (10000, 50000):
        raise DataError(f"CIFAR-100 files in {folder}: 'train' holds the 10,000 test images and 'test' the 50,000 "
                        f"training images: they are swapped")
    return {"train": (xtr, ytr), "test": (xte, yte), "source": str(folder)}


def normalise_images(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """RandomCrop(32, padding=4) + RandomHorizontalFlip for a batch [N, C, H, W], per image, batched."""
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h))                   # [n, h]
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w))                   # [n, w]
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols)
    idx_n = torch.arange(n).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)]  # [n, h, w, c]
    return out.permute(0, 3, 1, 2).contiguous()


class SplitCIFAR100(TaskSequence):
    """20 tasks of 5 classes: ``np.random.seed(seed)``, a permutation of the 100 classes, task t gets
    classes perm[5t:5t+5] with labels 0..4 in that order (the official RandSplitCIFAR100). Training
    batches get RandomCrop(32, pad 4) + horizontal flip; all are normalised with the CIFAR-100 mean/std."""
    name = "split-cifar100"
    num_labels = 5
    input_shape = (3, 32, 32)

    def __init__(self, data: dict, num_tasks: int = 20, seed: int = 1):
        if not 1 <= num_tasks <= 20:
            raise ValueError(f"SplitCIFAR100 has 20 tasks, --tasks {num_tasks} is out of range")
        self.num_tasks, self.seed, self._source = num_tasks, seed, data["source"]
        np.random.seed(seed)
        self.perm = np.random.permutation(100)
        self._data = data
        for split, name in (("train", "training"), ("test", "test")):
            check_classes_present(self, data[split][1], name, 100)

    @property
    def source(self) -> str:
        return self._source

    def classes(self, t: int):
        self._check(t)
        return [int(c) for c in self.perm[5 * t: 5 * t + 5]]

    def task_name(self, t: int) -> str:
        return "classes " + ", ".join(map(str, self.classes(t)))

    def _split(self, split: str, t: int, augment: bool) -> TaskSplit:
        x, y = self._data[split]
        classes = torch.tensor(self.classes(t))
        keep = torch.isin(y, classes)
        xs, ys = x[keep], y[keep]
        relabel = torch.full((100,), -1, dtype=torch.long)
        relabel[classes] = torch.arange(5)
        gen = torch.Generator().manual_seed(10_007 * self.seed + t)
        transform = (lambda xb: normalise_images(random_crop_flip(xb, gen))) if augment else normalise_images
        return TaskSplit(xs, relabel[ys], transform)

    def train(self, t: int) -> TaskSplit:
        return self._split("train", t, augment=True)

    def test(self, t: int) -> TaskSplit:
        return self._split("test", t, augment=False)
