import pytest
import torch

import supsup_fast as ss
from supsup_fast.ops.registry import get_backend_name


def test_available_has_reference():
    assert "reference" in ss.backends.available()


def test_use_backend_scopes_and_set_backend():
    assert get_backend_name() == "auto"
    with ss.use_backend("reference"):
        assert get_backend_name() == "reference"
        assert ss.backends.backend_for(torch.device("cpu")).name == "reference"
    assert get_backend_name() == "auto"
    ss.set_backend("reference")
    try:
        assert get_backend_name() == "reference"
    finally:
        ss.set_backend("auto")
    with ss.use_backend("auto"):
        assert get_backend_name() == "auto"


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        ss.set_backend("nope")
    with pytest.raises(ValueError, match="unknown backend"):
        with ss.use_backend("nope"):
            pass
