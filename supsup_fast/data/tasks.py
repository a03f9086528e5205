"""Continual-learning task sequences over MNIST: PermutedMNIST, RotatedMNIST, SplitMNIST, and the
sequences of tasks of controlled, unequal difficulty (label noise, training-set size, digit pairs)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .mnist import MNIST, DataError, normalise

Batch = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class TaskSplit:
    """One task's split: base inputs [N, 784] (normalised), labels, and a per-batch transform
    (e.g. a pixel permutation applied as one batched index_select)."""
    x: torch.Tensor
    y: torch.Tensor
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, idx: torch.Tensor) -> Batch:
        xb = self.x.index_select(0, idx)
        if self.transform is not None:
            xb = self.transform(xb)
        return xb, self.y.index_select(0, idx)

    def batches(self, batch_size: int, shuffle: bool, generator: Optional[torch.Generator] = None) -> Iterator[Batch]:
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for s in range(0, n, batch_size):
            yield self.batch(order[s: s + batch_size])

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self) / batch_size)

    def head(self, n: int) -> "TaskSplit":
        """The first ``n`` examples (smoke runs)."""
        return TaskSplit(self.x[:n], self.y[:n], self.transform)


class TaskSequence:
    """Base class: ``train(t)`` / ``test(t)`` give a task's splits; ``num_labels`` is ℓ."""
    name = "tasks"
    num_labels = 10
    input_shape = (784,)

    def __init__(self, mnist: MNIST, num_tasks: int, seed: int):
        if num_tasks < 1:
            raise ValueError(f"--tasks must be >= 1, got {num_tasks}")
        self.mnist, self.num_tasks, self.seed = mnist, num_tasks, seed
        self._train_x = normalise(mnist.train_images)
        self._test_x = normalise(mnist.test_images)

    @property
    def source(self) -> str:
        return self.mnist.source

    def _check(self, t: int) -> None:
        if not 0 <= t < self.num_tasks:
            raise ValueError(f"task must be in [0, {self.num_tasks}), got {t}")

    def task_name(self, t: int) -> str:
        """A short description of task t for reports (its difficulty or domain)."""
        self._check(t)
        return f"task {t}"

    def train(self, t: int) -> TaskSplit:
        raise NotImplementedError

    def test(self, t: int) -> TaskSplit:
        raise NotImplementedError


class PermutedMNIST(TaskSequence):
    """Task t permutes the 784 pixels with ``np.random.RandomState(seed + t).permutation(784)``
    (the official code's np.random.seed(i + args.seed); task 0 is permuted too)."""
    name = "permuted-mnist"

    def __init__(self, mnist: MNIST, num_tasks: int, seed: int = 1):
        super().__init__(mnist, num_tasks, seed)

    def permutation(self, t: int) -> torch.Tensor:
        self._check(t)
        return torch.from_numpy(np.random.RandomState(self.seed + t).permutation(784))

    def _split(self, x, y, t):
        perm = self.permutation(t)
        return TaskSplit(x, y, lambda xb: xb.index_select(1, perm))

    def train(self, t):
        return self._split(self._train_x, self.mnist.train_labels, t)

    def test(self, t):
        return self._split(self._test_x, self.mnist.test_labels, t)


def rotate_images(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate uint8/float images [N, 28, 28] counter-clockwise about the centre, nearest-neighbour,
    zero fill (torchvision.transforms.functional.rotate's defaults)."""
    if degrees % 360 == 0:
        return images.float()
    rad = math.radians(degrees)
    c, s = math.cos(rad), math.sin(rad)
    theta = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=torch.float32).unsqueeze(0)
    x = images.float().unsqueeze(1)
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False).squeeze(1)


class RotatedMNIST(TaskSequence):
    """Task t rotates every image by t · 10° (36 tasks cover the circle)."""
    name = "rotated-mnist"

    def __init__(self, mnist: MNIST, num_tasks: int, seed: int = 1, degrees_per_task: float = 10.0):
        distinct = math.ceil(360.0 / degrees_per_task) if degrees_per_task > 0 else 0
        if not 1 <= num_tasks <= distinct:
            raise ValueError(f"RotatedMNIST covers one turn: {distinct} tasks at {degrees_per_task:g}° each (task {distinct} "
                             f"would rotate by {distinct * degrees_per_task:g}°, past the full turn back to task 0's "
                             f"images), --tasks {num_tasks} asked for more")
        super().__init__(mnist, num_tasks, seed)
        self.degrees_per_task = degrees_per_task

    def angle(self, t: int) -> float:
        self._check(t)
        return t * self.degrees_per_task

    def _split(self, images, y, t):
        rotated = rotate_images(images, self.angle(t))
        return TaskSplit(((rotated.reshape(len(rotated), -1) / 255.0) - 0.1307) / 0.3081, y)

    def train(self, t):
        return self._split(self.mnist.train_images, self.mnist.train_labels, t)

    def test(self, t):
        return self._split(self.mnist.test_images, self.mnist.test_labels, t)


def check_classes_present(tasks, labels: torch.Tensor, split: str, num_classes: int) -> None:
    """Refuse a dataset that lacks a class one of the tasks is made of: the run would stop at that
    task, after training the ones before it."""
    counts = torch.bincount(labels.long().flatten(), minlength=num_classes)
    for t in range(tasks.num_tasks):
        missing = [c for c in tasks.classes(t) if counts[c] == 0]
        if missing:
            raise DataError(f"{tasks.source} has no {split} images of class{'es' if len(missing) > 1 else ''} "
                            f"{', '.join(map(str, missing))}, which task {t} of {tasks.name} is made of")


class SplitMNIST(TaskSequence):
    """5 tasks of consecutive digit pairs (0,1), (2,3), ... Labels are remapped to 0/1 (ℓ = 2) unless
    ``remap_labels=False`` (then ℓ = 10, as HopSupSup)."""
    name = "split-mnist"

    def __init__(self, mnist: MNIST, num_tasks: int = 5, seed: int = 1, remap_labels: bool = True):
        if num_tasks > 5:
            raise ValueError(f"SplitMNIST has 5 tasks, --tasks {num_tasks} asked for more")
        super().__init__(mnist, num_tasks, seed)
        self.remap = remap_labels
        self.num_labels = 2 if remap_labels else 10
        for split, labels in (("training", mnist.train_labels), ("test", mnist.test_labels)):
            check_classes_present(self, labels, split, 10)

    def classes(self, t: int) -> Tuple[int, int]:
        self._check(t)
        return 2 * t, 2 * t + 1

    def _split(self, x, labels, t):
        a, b = self.classes(t)
        idx = torch.nonzero((labels == a) | (labels == b)).squeeze(1)
        y = labels.index_select(0, idx)
        return TaskSplit(x.index_select(0, idx), (y == b).long() if self.remap else y)

    def train(self, t):
        return self._split(self._train_x, self.mnist.train_labels, t)

    def test(self, t):
        return self._split(self._test_x, self.mnist.test_labels, t)


class SplitMNIST10(SplitMNIST):
    """SplitMNIST with the digit labels kept (10 outputs shared by all tasks): HopSupSup's setting."""
    name = "split-mnist-10"

    def __init__(self, mnist: MNIST, num_tasks: int = 5, seed: int = 1):
        super().__init__(mnist, num_tasks, seed, remap_labels=False)


class NoisyPermutedMNIST(PermutedMNIST):
    """PermutedMNIST whose tasks cycle through training-label noise 0 / 20 / 40 / 60 %: task t
    replaces a fraction ``noise(t)`` of its training labels by a uniformly drawn *other* label
    (fixed per seed and task). Test labels stay clean, so accuracy measures the true task."""
    name = "permuted-mnist-noisy"
    NOISE_LEVELS = (0.0, 0.2, 0.4, 0.6)

    def noise(self, t: int) -> float:
        self._check(t)
        return self.NOISE_LEVELS[t % len(self.NOISE_LEVELS)]

    def task_name(self, t: int) -> str:
        return f"{round(100 * self.noise(t))}% label noise"

    def train(self, t):
        split = super().train(t)
        rate = self.noise(t)
        if rate == 0:
            return split
        rs = np.random.RandomState((self.seed * 7919 + t) % 2 ** 32)
        y = split.y.numpy().copy()
        flip = rs.rand(len(y)) < rate
        y[flip] = (y[flip] + rs.randint(1, self.num_labels, size=int(flip.sum()))) % self.num_labels
        return TaskSplit(split.x, torch.from_numpy(y), split.transform)


class SizedPermutedMNIST(PermutedMNIST):
    """PermutedMNIST whose tasks cycle through 100 / 1,000 / 60,000 training images: task t trains on
    a fixed random subset of ``train_size(t)`` images (per seed and task). Test sets are whole."""
    name = "permuted-mnist-sizes"
    TRAIN_SIZES = (100, 1000, 60000)

    def train_size(self, t: int) -> int:
        self._check(t)
        return min(self.TRAIN_SIZES[t % len(self.TRAIN_SIZES)], len(self.mnist.train_labels))

    def task_name(self, t: int) -> str:
        return f"{self.train_size(t)} training images"

    def train(self, t):
        split = super().train(t)
        n = self.train_size(t)
        if n >= len(split):
            return split
        idx = torch.from_numpy(np.random.RandomState((self.seed * 7919 + t) % 2 ** 32).permutation(len(split))[:n])
        return TaskSplit(split.x.index_select(0, idx), split.y.index_select(0, idx), split.transform)


class SplitMNISTPairs(SplitMNIST):
    """SplitMNIST over digit pairs of known difficulty: 0 vs 1 (the easiest), 4 vs 9 and 3 vs 5 (the
    most confused MNIST pairs), then 2 vs 7 and 6 vs 8. Labels 0/1 (the pair's first/second digit)."""
    name = "split-mnist-pairs"
    PAIRS = ((0, 1), (4, 9), (3, 5), (2, 7), (6, 8))

    def classes(self, t: int) -> Tuple[int, int]:
        self._check(t)
        return self.PAIRS[t]

    def task_name(self, t: int) -> str:
        return "{} vs {}".format(*self.classes(t))


BENCHMARKS = {"permuted-mnist": PermutedMNIST, "rotated-mnist": RotatedMNIST, "split-mnist": SplitMNIST,
              "split-mnist-10": SplitMNIST10,
              "permuted-mnist-noisy": NoisyPermutedMNIST, "permuted-mnist-sizes": SizedPermutedMNIST,
              "split-mnist-pairs": SplitMNISTPairs}
