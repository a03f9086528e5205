import os

# Without a GPU the Triton kernels run in Triton's CPU interpreter. The flag must be set before any
# kernel is defined (at the import of supsup_fast.kernels), so it is set here, first.
try:
    import torch as _torch
    _gpu = _torch.cuda.is_available()
except Exception:  # pragma: no cover
    _gpu = False
if not _gpu:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def rng():
    g = torch.Generator()
    g.manual_seed(1234)
    return g
