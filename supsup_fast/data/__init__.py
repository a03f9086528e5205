"""Datasets and continual-learning task sequences."""
from .mnist import MNIST, DataError, download_mnist, load_embedded, load_mnist, read_idx
from .tasks import BENCHMARKS as _MNIST_TASKS
from .mixed import DOMAINS, MixedDomains
from .tasks import PermutedMNIST, RotatedMNIST, SplitMNIST, TaskSequence, TaskSplit, rotate_images
from .cifar import SplitCIFAR100, load_cifar100
from .imagenet import SplitImageNet, load_imagenet

# The sequences built on MNIST (28×28 inputs, MNIST's normalisation; mixed-domains adds other domains).
MNIST_BENCHMARKS = dict(_MNIST_TASKS, **{"mixed-domains": MixedDomains})
BENCHMARKS = dict(MNIST_BENCHMARKS, **{"split-cifar100": SplitCIFAR100, "split-imagenet": SplitImageNet})
# The models each benchmark's inputs fit: flat 784-pixel MNIST images or 3×32×32 CIFAR images.
BENCHMARK_MODELS = {**{name: ("fc1024", "lenet", "bnnet") for name in MNIST_BENCHMARKS},
                    "split-cifar100": ("gemresnet18", "resnet18"),
                    "split-imagenet": ("resnet50", "resnet18")}


def load_benchmark(name: str, num_tasks: int, seed: int, data_root=None, download: bool = False,
                   image_size: int = 224) -> TaskSequence:
    """The task sequence ``name`` with its data (MNIST embedded subset when no data root is given)."""
    if name not in BENCHMARKS:
        raise ValueError(f"--benchmark must be one of {sorted(BENCHMARKS)}, got {name!r}")
    if name in MNIST_BENCHMARKS:
        return MNIST_BENCHMARKS[name](load_mnist(data_root, download), num_tasks, seed)
    if download:
        raise DataError(f"--download fetches MNIST only; put the {name} data in --data-root")
    if name == "split-imagenet":
        return SplitImageNet(load_imagenet(data_root), num_tasks, seed, image_size)
    return SplitCIFAR100(load_cifar100(data_root), num_tasks, seed)

__all__ = ["DOMAINS", "MixedDomains", "MNIST_BENCHMARKS", "BENCHMARK_MODELS", "SplitCIFAR100", "SplitImageNet", "load_imagenet", "load_benchmark", "load_cifar100", "MNIST", "DataError", "download_mnist", "load_embedded", "load_mnist", "read_idx", "BENCHMARKS",
           "PermutedMNIST", "RotatedMNIST", "SplitMNIST", "TaskSequence", "TaskSplit", "rotate_images"]
