"""A sequence of semantically different 28×28 domains: MNIST, permutations of it, inverted MNIST,
scikit-learn's 8×8 digits upsampled, and procedurally rendered shapes (:mod:`.domains`). Every
domain has 10 classes and goes through MNIST's normalisation, so one network sees them all."""
from __future__ import annotations

import importlib
from typing import Dict, Tuple

import numpy as np
import torch

from .mnist import MNIST, DataError, normalise
from .tasks import TaskSequence, TaskSplit

DOMAINS = ("mnist", "permuted-1", "inverted-mnist", "sklearn-digits", "permuted-2", "shapes", "permuted-3")


class MixedDomains(TaskSequence):
    """Task t is the domain ``DOMAINS[t]`` (at most 7 tasks). A permuted domain permutes MNIST's
    pixels with ``np.random.RandomState(seed + 1000 · j)``; the shapes are generated from ``seed``."""
    name = "mixed-domains"

    def __init__(self, mnist: MNIST, num_tasks: int = len(DOMAINS), seed: int = 1):
        if num_tasks > len(DOMAINS):
            raise ValueError(f"mixed-domains has {len(DOMAINS)} tasks ({', '.join(DOMAINS)}); --tasks {num_tasks} "
                             f"asked for more")
        super().__init__(mnist, num_tasks, seed)
        self._cache: Dict[str, Tuple[TaskSplit, TaskSplit]] = {}
        if "sklearn-digits" in DOMAINS[:num_tasks]:  # built when its task comes: say now what it needs
            try:
                importlib.import_module("sklearn.datasets")
            except ImportError as exc:
                raise DataError(f"mixed-domains task {DOMAINS.index('sklearn-digits')} (sklearn-digits) needs "
                                f"scikit-learn: pip install scikit-learn (or the package's test extra), or run "
                                f"--tasks {DOMAINS.index('sklearn-digits')}") from exc

    def task_name(self, t: int) -> str:
        self._check(t)
        return DOMAINS[t]

    def _splits(self, t: int) -> Tuple[TaskSplit, TaskSplit]:
        domain = self.task_name(t)
        if domain not in self._cache:
            self._cache[domain] = self._build(domain)
        return self._cache[domain]

    def _build(self, domain: str) -> Tuple[TaskSplit, TaskSplit]:
        m = self.mnist
        if domain == "mnist":
            return TaskSplit(self._train_x, m.train_labels), TaskSplit(self._test_x, m.test_labels)
        if domain.startswith("permuted-"):
            j = int(domain.split("-")[1])
            perm = torch.from_numpy(np.random.RandomState((self.seed + 1000 * j) % 2 ** 32).permutation(784))
            return (TaskSplit(self._train_x, m.train_labels, lambda xb: xb.index_select(1, perm)),
                    TaskSplit(self._test_x, m.test_labels, lambda xb: xb.index_select(1, perm)))
        if domain == "inverted-mnist":
            return (TaskSplit(normalise(255 - m.train_images), m.train_labels),
                    TaskSplit(normalise(255 - m.test_images), m.test_labels))
        from .domains import shapes_28, sklearn_digits_28
        data = sklearn_digits_28(seed=self.seed) if domain == "sklearn-digits" else shapes_28(seed=self.seed)
        return (TaskSplit(normalise(data.train_images), data.train_labels),
                TaskSplit(normalise(data.test_images), data.test_labels))

    def train(self, t):
        return self._splits(t)[0]

    def test(self, t):
        return self._splits(t)[1]
