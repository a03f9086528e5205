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
