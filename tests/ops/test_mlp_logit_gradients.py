"""ops.mlp_logit_gradients, task inference's forward through a ReLU MLP and its objective's logit
gradients: the cpu backend's one C++ call gives the floats of the Python way (the same ATen ops)."""
import pytest
import torch

import supsup_fast as ss
from supsup_fast.algorithms.objectives import get_objective

from tests.ops.isa_runner import needs_compiler


def _mlp(seed=0, sizes=(30, 21, 17, 12), q=4, bias=True):
    torch.manual_seed(seed)
    ws = [torch.randn(o, i) for i, o in zip(sizes[:-1], sizes[1:])]
    bs = [torch.randn(o) if bias and j != 1 else None for j, o in enumerate(sizes[1:])]
    return torch.randn(q, sizes[0]), ws, bs


@needs_compiler
@pytest.mark.parametrize("objective", ["entropy", "superfluous"])
def test_cpu_equals_the_python_way_and_autograd(objective):
    x, ws, bs = _mlp()
    x[0, :5] = 0  # zeros in the input count for nothing
    with ss.use_backend("cpu"):
        assert ss.ops.backend_for(x.device).mlp_logit_gradients(x, ws, bs, objective, 5) is not None  # the C++ call ran
        hs, g, nonzero = ss.ops.mlp_logit_gradients(x, ws, bs, objective, 5)
        assert ss.ops.mlp_logit_gradients(x, ws, bs, objective, 5, count_nonzero=False)[2] is None
    with ss.use_backend("reference"):
        hs_ref, g_ref, nonzero_ref = ss.ops.mlp_logit_gradients(x, ws, bs, objective, 5)
    assert len(hs) == 3 and all(torch.equal(a, b) for a, b in zip(hs, hs_ref))
    assert torch.equal(g, g_ref) and nonzero == nonzero_ref
    assert nonzero == [int(torch.count_nonzero(t)) for t in (*hs, g)]
    # the logits' gradient of each example's objective, as autograd gives it
    z = hs[-1] @ ws[-1].t() + bs[-1]
    z = z.detach().requires_grad_(True)
    (expect,) = torch.autograd.grad(get_objective(objective)(z, 5) * x.shape[0], z)
    torch.testing.assert_close(g, expect)
    if objective == "superfluous":
        assert not g[:, :5].any() and g[:, 5:].any()


@needs_compiler
def test_refusals_name_the_argument():
    x, ws, bs = _mlp()
    with pytest.raises(ValueError, match="objective must be one of"):
        ss.ops.mlp_logit_gradients(x, ws, bs, "cross_entropy", 5)
    with pytest.raises(ValueError, match=r"num_labels .* must be an int in \[1, "):
        ss.ops.mlp_logit_gradients(x, ws, bs, "superfluous", -1)
    with pytest.raises(ValueError, match="one weight and one bias"):
        ss.ops.mlp_logit_gradients(x, ws, bs[:2], "entropy", 5)
    with pytest.raises(ValueError, match=r"x must be \[q, n\]"):
        ss.ops.mlp_logit_gradients(x[0], ws, bs, "entropy", 5)
    with pytest.raises(ValueError, match=r"weights\[1\] must be \[out, "):
        ss.ops.mlp_logit_gradients(x, [ws[0], ws[0], ws[2]], bs, "entropy", 5)
    for i in range(3):  # a bias of [1] would broadcast; one of another size or dtype failed inside ATen
        for bad in (torch.ones(1), torch.ones(ws[i].shape[0] + 1), torch.ones(ws[i].shape[0], dtype=torch.float64)):
            with pytest.raises(ValueError, match=rf"biases\[{i}\] must be"):
                ss.ops.mlp_logit_gradients(x, ws, [bad if j == i else b for j, b in enumerate(bs)], "entropy", 5)
    with pytest.raises(ValueError, match=r"weights\[2\] must be torch.float32"):
        ss.ops.mlp_logit_gradients(x, ws[:2] + [ws[2].double()], bs, "entropy", 5)
