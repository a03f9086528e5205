import pytest
import torch

import supsup_fast.nn as snn
from supsup_fast.models import build_model


@pytest.mark.parametrize("name,shape,weights", [
    ("fc1024", (2, 784), 784 * 1024 + 1024 * 1024 + 1024 * 500),
    ("lenet", (2, 784), 784 * 300 + 300 * 100 + 100 * 500),
    ("gemresnet18", (2, 3, 32, 32), 1_090_940 - 160 * 5 + 160 * 500),
])
def test_forward_and_weight_count(name, shape, weights):
    model = build_model(name, 500)
    assert sum(l.weight.numel() for l in snn.supermask_layers(model).values()) == weights
    snn.begin_task(model)
    model.train()
    assert model(torch.randn(*shape)).shape == (2, 500)


@pytest.mark.parametrize("name,size", [("resnet18", 32), ("resnet50", 64)])
def test_resnets_shapes(name, size):
    model = build_model(name, 10)
    snn.begin_task(model)
    model.train()
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 10)
    snn.finish_task(model)
    model.eval()
    snn.set_task(model, 0)
    assert model(torch.randn(1, 3, size, size)).shape == (1, 10)


def test_resnet50_weight_count_matches_paper():
    model = build_model("resnet50", 10)
    assert sum(l.weight.numel() for l in snn.supermask_layers(model).values()) == 23_475_392


def test_er_density_applied_per_layer():
    model = build_model("gemresnet18", 5, er_multiplier=2.0)
    layers = snn.supermask_layers(model)
    assert all(l.mask_fn == "topk" for l in layers.values())
    stem = layers["stem.0"]
    assert stem.density == snn.er_density(20, 3, 3, 3, 2.0)


def test_same_seed_same_weights_and_bad_args():
    a, b, c = build_model("lenet", 100, seed=5), build_model("lenet", 100, seed=5), build_model("lenet", 100, seed=6)
    la, lb, lc = (list(snn.supermask_layers(m).values()) for m in (a, b, c))
    assert all(torch.equal(x.weight, y.weight) for x, y in zip(la, lb))
    assert not torch.equal(la[0].weight, lc[0].weight)
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("vgg", 10)
    with pytest.raises(ValueError, match="output_size"):
        build_model("lenet", 0)
