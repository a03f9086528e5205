import pytest
import torch

import supsup_fast as ss
from supsup_fast.optim import FusedRMSprop


@pytest.mark.parametrize("wd", [0.0, 1e-4])
def test_fused_rmsprop_follows_torch_rmsprop(wd):
    torch.manual_seed(0)
    p_ref = torch.randn(300, 77, requires_grad=True)
    p_fused = p_ref.detach().clone().requires_grad_()
    p_torch_path = p_ref.detach().clone().requires_grad_()
    ref = torch.optim.RMSprop([p_ref], lr=1e-3, weight_decay=wd)
    fused = FusedRMSprop([p_fused], lr=1e-3, weight_decay=wd)
    fallback = FusedRMSprop([p_torch_path], lr=1e-3, weight_decay=wd)
    fallback._kernel = None  # the torch-ops path (other devices and dtypes)
    for _ in range(6):
        g = torch.randn(300, 77)
        for p, opt in ((p_ref, ref), (p_fused, fused), (p_torch_path, fallback)):
            p.grad = g.clone()
            opt.step()
    assert torch.allclose(p_fused, p_ref, rtol=1e-6, atol=1e-7)
    assert torch.allclose(p_torch_path, p_ref, rtol=1e-6, atol=1e-7)
    assert torch.allclose(fused.state[p_fused]["square_avg"], ref.state[p_ref]["square_avg"], rtol=1e-5)


def test_fused_rmsprop_bad_settings():
    with pytest.raises(ValueError, match="invalid RMSprop"):
        FusedRMSprop([torch.zeros(2, requires_grad=True)], lr=-1)


def test_threshold_masked_weight_backends_agree():
    from tests.devices import backend_devices
    s, w = torch.randn(33, 70), torch.randn(33, 70)
    expect = w * (s >= 0)
    pairs = backend_devices()
    assert {"reference", "cpu"} <= {name for name, _ in pairs}
    for name, device in pairs:  # each backend on the devices it supports (GPU backends on the GPU)
        with ss.use_backend(name):
            assert torch.equal(ss.ops.threshold_masked_weight(s.to(device), w.to(device)).cpu(), expect), name
    with pytest.raises(ValueError, match="same shape"):
        ss.ops.threshold_masked_weight(s, w[:3])
