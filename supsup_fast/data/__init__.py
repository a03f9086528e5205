"""Datasets and continual-learning task sequences."""
from .mnist import MNIST, DataError, download_mnist, load_embedded, load_mnist, read_idx
from .tasks import BENCHMARKS, PermutedMNIST, RotatedMNIST, SplitMNIST, TaskSequence, TaskSplit, rotate_images

__all__ = ["MNIST", "DataError", "download_mnist", "load_embedded", "load_mnist", "read_idx", "BENCHMARKS",
           "PermutedMNIST", "RotatedMNIST", "SplitMNIST", "TaskSequence", "TaskSplit", "rotate_images"]
