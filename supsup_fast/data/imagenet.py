"""SplitImageNet from the standard ImageNet folder layout (``train/<wnid>/*.JPEG`` and
``val/<wnid>/*.JPEG``), with the official code's class split and transforms in plain torch + PIL
(no torchvision): RandomResizedCrop + horizontal flip for training, Resize(256/224·size) +
CenterCrop(size) for validation, ImageNet mean/std. Images are decoded per batch on a thread pool."""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .mnist import DataError
from .tasks import Batch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
CLASSES_PER_TASK = 10


def scan_split(folder: Path) -> dict:
    """{class name: sorted image paths} of one split folder; every class folder must hold images."""
    if not folder.is_dir():
        raise DataError(f"ImageNet split folder {folder} does not exist (expected <data-root>/train and <data-root>/val "
                        f"with one folder per class)")
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{folder} has no class folders")
    files = {}
    for c in classes:
        imgs = sorted(p for p in c.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not imgs:
            raise DataError(f"class folder {c} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        files[c.name] = imgs
    return files


def load_imagenet(data_root: Union[str, Path, None]) -> dict:
    """Scan ``<root>/train`` and ``<root>/val`` (or ``<root>/imagenet/...``); both must hold the same classes."""
    if data_root is None:
        raise DataError("split-imagenet needs --data-root (a folder with train/ and val/ class folders)")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"--data-root {root} is not a folder")
    if not (root / "train").is_dir() and (root / "imagenet" / "train").is_dir():
        root = root / "imagenet"
    train, val = scan_split(root / "train"), scan_split(root / "val")
    missing_val, missing_train = sorted(set(train) - set(val)), sorted(set(val) - set(train))
    if missing_val or missing_train:
        raise DataError(f"{root}: train and val must hold the same class folders; missing in val: {missing_val[:5]}"
                        f"{'...' if len(missing_val) > 5 else ''}, missing in train: {missing_train[:5]}"
                        f"{'...' if len(missing_train) > 5 else ''}")
    return {"train": train, "val": val, "classes": sorted(train), "source": str(root)}


def decode(path: Path):
    from PIL import Image
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as exc:  # PIL raises several types for truncated / non-image files
        raise DataError(f"cannot decode image {path}: {exc}") from exc


def random_resized_crop_box(width: int, height: int, gen: torch.Generator, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """(left, top, w, h) as torchvision's RandomResizedCrop: 10 tries at a random area and aspect
    ratio, then a centre crop at the nearest allowed ratio."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(4, generator=gen, dtype=torch.float64).tolist()
        target = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_r[0] + u[1] * (log_r[1] - log_r[0]))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(u[2] * (width - w + 1)), int(u[3] * (height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def to_tensor(img) -> torch.Tensor:
    """uint8 PIL RGB → normalised float [3, H, W]."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def train_transform(img, size: int, gen: torch.Generator) -> torch.Tensor:
    from PIL import Image
    left, top, w, h = random_resized_crop_box(img.width, img.height, gen)
    img = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)  # as F.resized_crop
    if bool(torch.rand(1, generator=gen) < 0.5):
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensor(img)


def eval_transform(img, size: int) -> torch.Tensor:
    """Resize the short side to size·256/224, then centre-crop size×size (Resize(256) + CenterCrop(224)),
    with torchvision's arithmetic: the long side truncated, the crop's offsets rounded."""
    from PIL import Image
    target = int(round(size * 256 / 224))
    short, long = sorted((img.width, img.height))
    new_long = int(target * long / short)
    w, h = (target, new_long) if img.width <= img.height else (new_long, target)
    img = img.resize((w, h), Image.BILINEAR)
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return to_tensor(img.crop((left, top, left + size, top + size)))


class ImageFileSplit:
    """One task's split read from image files, with the same interface as ``TaskSplit``."""

    def __init__(self, files: Sequence[Path], labels: torch.Tensor, train: bool, size: int, seed: int, workers: int = 4):
        self.files, self.y, self.train, self.size, self.seed, self.workers = list(files), labels, train, size, seed, workers
        self._calls = 0

    def __len__(self) -> int:
        return len(self.files)

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self) / batch_size)

    def head(self, n: int) -> "ImageFileSplit":
        """``n`` images spread evenly over the split (files are grouped by class), for smoke runs."""
        idx = torch.linspace(0, len(self.files) - 1, max(1, min(n, len(self.files)))).round().long().unique()
        return ImageFileSplit([self.files[i] for i in idx.tolist()], self.y[idx], self.train, self.size, self.seed,
                              self.workers)

    def _load(self, i: int, seed: int) -> torch.Tensor:
        img = decode(self.files[i])
        if self.train:
            return train_transform(img, self.size, torch.Generator().manual_seed(seed))
        return eval_transform(img, self.size)

    def batches(self, batch_size: int, shuffle: bool, generator: Optional[torch.Generator] = None) -> Iterator[Batch]:
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        self._calls += 1
        base = 1_000_003 * self.seed + 7919 * self._calls  # fresh augmentation each epoch, reproducible
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for s in range(0, n, batch_size):
                idx = order[s: s + batch_size].tolist()
                xs = list(pool.map(lambda i: self._load(i, base + i), idx))
                yield torch.stack(xs), self.y[idx]


SPLIT_SEED = 1  # the official loader's np.random.seed(1), whatever the run's seed


class SplitImageNet:
    """100 tasks of 10 classes: the sorted class folders permuted with ``np.random.seed(1)`` (the
    official loader's fixed seed; the run's ``seed`` drives the augmentation), task t gets classes
    perm[10t:10t+10] with labels 0..9 in that order."""
    name = "split-imagenet"
    num_labels = CLASSES_PER_TASK

    def __init__(self, data: dict, num_tasks: int = 100, seed: int = 1, image_size: int = 224):
        most = len(data["classes"]) // CLASSES_PER_TASK
        if not 1 <= num_tasks <= most:
            raise ValueError(f"SplitImageNet over {len(data['classes'])} classes has {most} tasks of "
                             f"{CLASSES_PER_TASK}; --tasks {num_tasks} is out of range")
        if image_size < 8:
            raise ValueError(f"--image-size must be >= 8, got {image_size}")
        self.data, self.num_tasks, self.seed, self.image_size = data, num_tasks, seed, image_size
        self.input_shape = (3, image_size, image_size)
        self.perm = np.random.RandomState(SPLIT_SEED).permutation(len(data["classes"]))

    @property
    def source(self) -> str:
        return self.data["source"]

    def classes(self, t: int) -> List[str]:
        if not 0 <= t < self.num_tasks:
            raise ValueError(f"task must be in [0, {self.num_tasks}), got {t}")
        return [self.data["classes"][i] for i in self.perm[CLASSES_PER_TASK * t: CLASSES_PER_TASK * (t + 1)]]

    def task_name(self, t: int) -> str:
        """The task's classes (for reports)."""
        return "classes " + ", ".join(self.classes(t))

    def _split(self, split: str, t: int) -> ImageFileSplit:
        files, labels = [], []
        for label, c in enumerate(self.classes(t)):
            files += self.data[split][c]
            labels += [label] * len(self.data[split][c])
        return ImageFileSplit(files, torch.tensor(labels), split == "train", self.image_size, 10_007 * self.seed + t)

    def train(self, t: int) -> ImageFileSplit:
        return self._split("train", t)

    def test(self, t: int) -> ImageFileSplit:
        return self._split("val", t)
