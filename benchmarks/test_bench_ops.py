"""pytest-benchmark suites: each op beside its baseline, same shapes, same process.

    python -m pytest benchmarks/ --benchmark-only --benchmark-group-by=group
    python -m pytest benchmarks/ --benchmark-only --benchmark-json benchmarks/results/ops.json
"""
import pytest
import torch
import torch.nn.functional as F

import supsup_fast as ss
from supsup_fast.algorithms.inference import alpha_gradient
from supsup_fast.bench import FloatStackMLP, random_model_with_masks

SIZE = 1024


@pytest.fixture(scope="module")
def layer():
    w = torch.randn(SIZE, SIZE)
    mask = torch.rand(SIZE, SIZE) > 0.5
    return w, mask, ss.pack_bits(mask)


@pytest.mark.parametrize("batch", [1, 16, 128, 1024])
def test_masked_linear_packed(benchmark, layer, batch):
    w, _, words = layer
    x = torch.randn(batch, SIZE)
    benchmark.group = f"single-task forward b={batch}"
    benchmark(ss.ops.masked_linear, x, w, words)


@pytest.mark.parametrize("batch", [1, 16, 128, 1024])
def test_masked_linear_dense_baseline(benchmark, layer, batch):
    w, mask, _ = layer
    dense = w * mask
    x = torch.randn(batch, SIZE)
    benchmark.group = f"single-task forward b={batch}"
    benchmark(F.linear, x, dense)


@pytest.mark.parametrize("k", [10, 100])
def test_superpose_and_mask_dot(benchmark, k):
    bank = ss.pack_bits(torch.rand(k, SIZE, SIZE) > 0.5)
    v = torch.randn(SIZE, SIZE)
    benchmark.group = f"mask_dot k={k}"
    benchmark(ss.ops.mask_dot, bank, v)


@pytest.mark.parametrize("k", [10, 100])
def test_float_stack_mask_dot_baseline(benchmark, k):
    stack = (torch.rand(k, SIZE, SIZE) > 0.5).float()
    v = torch.randn(SIZE, SIZE)
    benchmark.group = f"mask_dot k={k}"
    flat, vec = stack.view(k, -1), v.view(-1)
    benchmark(lambda: flat @ vec)  # one matrix-vector product over the float stack (no k x n temporary)


@pytest.mark.parametrize("k", [10, 50])
def test_alpha_gradient_packed(benchmark, k):
    model = random_model_with_masks("fc1024", 500, k)
    x = torch.randn(1, 784)
    benchmark.group = f"alpha-gradient FC1024 s=500 k={k}"
    benchmark(alpha_gradient, model, x, "entropy", 10)


@pytest.mark.parametrize("k", [10, 50])
def test_alpha_gradient_float_stack_baseline(benchmark, k):
    fs = FloatStackMLP(random_model_with_masks("fc1024", 500, k))
    x = torch.randn(1, 784)
    benchmark.group = f"alpha-gradient FC1024 s=500 k={k}"
    benchmark(fs.alpha_gradient, x)


@pytest.mark.parametrize("k", [10, 100])
def test_superpose_packed(benchmark, k):
    bank = ss.pack_bits(torch.rand(k, SIZE, SIZE) > 0.5)
    alpha = torch.rand(k)
    benchmark.group = f"superpose k={k}"
    benchmark(ss.ops.superpose, bank, alpha, SIZE)


@pytest.mark.parametrize("k", [10, 100])
def test_superpose_float_stack_baseline(benchmark, k):
    stack = (torch.rand(k, SIZE, SIZE) > 0.5).float()
    alpha = torch.rand(k)
    benchmark.group = f"superpose k={k}"
    benchmark(lambda: (alpha[:, None, None] * stack).sum(0))


@pytest.fixture(scope="module")
def conv_layer():
    w = torch.randn(64, 64, 3, 3)
    mask = torch.rand(64, 64 * 9) > 0.5
    return w, mask, ss.pack_bits(mask)


def test_masked_conv2d_packed(benchmark, conv_layer):
    w, _, words = conv_layer
    x = torch.randn(32, 64, 16, 16)
    benchmark.group = "masked conv2d 64->64 3x3, 32x16x16"
    benchmark(ss.ops.masked_conv2d, x, w, words, None, 1, 1)


def test_masked_conv2d_dense_baseline(benchmark, conv_layer):
    w, mask, _ = conv_layer
    dense = w * mask.view_as(w)
    x = torch.randn(32, 64, 16, 16)
    benchmark.group = "masked conv2d 64->64 3x3, 32x16x16"
    benchmark(F.conv2d, x, dense, None, 1, 1)


def test_training_step_ours_and_plain(benchmark):
    from supsup_fast.bench import bench_training_step
    benchmark.group = "training step FC1024 b128 (ours / plain STE / 3 GEMMs, ratios in extra_info)"
    result = benchmark.pedantic(bench_training_step, kwargs={"repeats": 3}, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
