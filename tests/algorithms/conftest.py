import pytest
import torch

import supsup_fast.nn as snn
from supsup_fast.models import build_model


@pytest.fixture(scope="module")
def model():
    """LeNet-300-100 with 10 outputs and three random masks, in eval mode (a module may define its own)."""
    m = build_model("lenet", 10, seed=1)
    for t in range(3):
        snn.begin_task(m, generator=torch.Generator().manual_seed(t))
        snn.finish_task(m)
    return m.eval()
