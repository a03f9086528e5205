"""Which (backend, device) pairs a test may run on here: each available backend on every device it
supports that this machine can really allocate on. Tests that loop over backends use this, so that
CPU tensors never go to a GPU-only backend and GPU backends are tested on the GPU."""
from typing import List, Tuple

import torch

import supsup_fast as ss
from supsup_fast.ops import registry


def real_devices() -> List[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        try:
            torch.empty(1, device="cuda")
            devices.append(torch.device("cuda"))
        except (RuntimeError, AssertionError):  # a simulated GPU (tests/test_gpu_simulated.py)
            pass
    return devices


def backend_devices() -> List[Tuple[str, torch.device]]:
    pairs = []
    for name in ss.backends.available():
        backend = registry._instance(name)
        pairs += [(name, d) for d in real_devices() if backend.supports(d)]
    return pairs


def ids(pairs):
    return [f"{n}-{d.type}" for n, d in pairs]
