"""Continual-learning task sequences over MNIST: PermutedMNIST, RotatedMNIST, SplitMNIST."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .mnist import MNIST, normalise

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

    def classes(self, t: int) -> Tuple[int, int]:
        self._check(t)
        return 2 * t, 2 * t + 1

    def _split(self, x, labels, t):
        a, b = self.classes(t)
        idx = torch.nonzero((labels == a) | (labels == b)).squeeze(1)
        y = labels.index_select(0, idx)
        return TaskSplit(x.index_select(0, idx), y - a if self.remap else y)

    def train(self, t):
        return self._split(self._train_x, self.mnist.train_labels, t)

    def test(self, t):
        return self._split(self._test_x, self.mnist.test_labels, t)


class SplitMNIST10(SplitMNIST):
    """SplitMNIST with the digit labels kept (10 outputs shared by all tasks): HopSupSup's setting."""
    name = "split-mnist-10"

    def __init__(self, mnist: MNIST, num_tasks: int = 5, seed: int = 1):
        super().__init__(mnist, num_tasks, seed, remap_labels=False)


BENCHMARKS = {"permuted-mnist": PermutedMNIST, "rotated-mnist": RotatedMNIST, "split-mnist": SplitMNIST,
              "split-mnist-10": SplitMNIST10}
