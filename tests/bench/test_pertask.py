"""Per-task storage baselines (supsup_fast.bench.pertask): byte counts, precision round trips,
frozen weights that stay frozen, and training that learns on the embedded MNIST subset."""
import pytest
import torch

from supsup_fast.bench.pertask import (BatchEnsembleMLP, FrozenMLP, LoRAMLP, SmallMLP, accuracy, frozen_bytes,
                                       frozen_weights, int8_round_trip, quantize_model, storage_bytes,
                                       train_per_task)
from supsup_fast.data import PermutedMNIST, load_mnist
from supsup_fast.models import build_model
from supsup_fast.nn import supermask_layers


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is as fast, and far faster when the machine is busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def task():
    seq = PermutedMNIST(load_mnist(None), 2, seed=1)
    return seq.train(1), seq.test(1)


def test_small_mlp_bytes_match_hand_count():
    m = SmallMLP(16)
    # 784·16 + 16 + 16·10 + 10 parameters
    assert sum(p.numel() for p in m.parameters()) == 12730
    assert storage_bytes(m, "float32") == 12730 * 4 == 50920
    assert storage_bytes(m, "float16") == 12730 * 2
    # int8: weights 1 B + a float32 scale per output row; biases float32
    assert storage_bytes(m, "int8") == (784 * 16 + 16 * 4) + 16 * 4 + (16 * 10 + 10 * 4) + 10 * 4 == 12912
    for p in ("float32", "float16", "int8"):
        assert quantize_model(m, p)[1] == storage_bytes(m, p)


def test_adapter_bytes_match_hand_count():
    # LeNet 784-300-100-10: rank r costs r·(in + out) per layer
    lora = LoRAMLP(2, seed=1)
    n = 2 * (784 + 300) + 2 * (300 + 100) + 2 * (100 + 10)
    assert n == 3188
    assert storage_bytes(lora, "float32") == 4 * n and storage_bytes(lora, "float16") == 2 * n
    assert storage_bytes(LoRAMLP(2, seed=1, bias=True)) == 4 * (n + 300 + 100 + 10)
    be = BatchEnsembleMLP(seed=1)
    assert storage_bytes(be) == 4 * (784 + 300 + 300 + 100 + 100 + 10) == 6376
    # the frozen network is paid once: 266,200 float32 weights or an 8-byte seed
    for model in (lora, be, FrozenMLP(seed=1)):
        assert frozen_bytes(model) == {"n_weights": 266200, "stored_float32": 1064800, "regenerated_from_seed": 8}
    assert frozen_bytes(SmallMLP(4))["stored_float32"] == 0
    with pytest.raises(ValueError):
        storage_bytes(lora, "int4")


def test_int8_round_trip_error_at_most_half_a_step(rng):
    w = torch.randn(7, 33, generator=rng) * torch.logspace(-3, 1, 7)[:, None]
    w[3] = 0.0
    deq, scale = int8_round_trip(w)
    assert scale.shape == (7,) and scale.dtype == torch.float32
    assert torch.equal(scale, (w.abs().amax(1) / 127).float())
    err = (deq - w).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-5) + 1e-12).all())
    q = deq.double() / torch.where(scale > 0, scale, torch.ones_like(scale)).double()[:, None]
    assert bool(((q - q.round()).abs() < 1e-3).all()) and q.abs().max() <= 127 + 1e-3
    assert torch.equal(deq[3], torch.zeros(33))
    # the largest entry of each row is exactly representable (±127 steps)
    assert torch.allclose(deq.abs().amax(1), w.abs().amax(1), rtol=1e-6)


def test_quantize_model_round_trips_copy_only(rng):
    m = SmallMLP(8, generator=rng)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    half, _ = quantize_model(m, "float16")
    q8, _ = quantize_model(m, "int8")
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])  # the original is untouched
    for name, p in m.named_parameters():
        h = dict(half.named_parameters())[name]
        assert torch.equal(h, p.half().float())
        assert float((h - p).detach().abs().max()) <= float(p.detach().abs().max()) * 2 ** -11
        i8 = dict(q8.named_parameters())[name]
        if p.dim() == 1:
            assert torch.equal(i8, p)  # int8 convention: biases stay float32
        else:
            scale = p.abs().amax(1, keepdim=True) / 127
            assert bool(((i8 - p).abs() <= scale / 2 * (1 + 1e-5)).all())
    assert torch.equal(quantize_model(m, "float32")[0].fc1.weight, m.fc1.weight)


def test_frozen_weights_are_supsups_network():
    model = build_model("lenet", 10, seed=5)
    ours = frozen_weights(5)
    for w, layer in zip(ours, supermask_layers(model).values()):
        assert torch.equal(w, layer.weight)
    assert not torch.equal(ours[0], frozen_weights(6)[0])


@pytest.mark.parametrize("make", [lambda g: LoRAMLP(2, seed=3, generator=g), lambda g: BatchEnsembleMLP(seed=3)],
                         ids=["lora", "batchensemble"])
def test_adapters_train_only_their_own_parameters(make, task, rng):
    model = make(rng)
    frozen = [w.clone() for w in model.frozen()]
    assert all(not w.requires_grad for w in model.frozen())
    assert not any(p is w for p in model.parameters() for w in model.frozen())
    x = task[0].x[:5]
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert torch.allclose(model(x), FrozenMLP(seed=3)(x))  # starts as the frozen network
    train_per_task(model, task[0], iters=20, batch_size=64, lr=1e-2, generator=rng)
    for w0, w in zip(frozen, model.frozen()):
        assert torch.equal(w0, w) and not w.requires_grad
    for n, p in model.named_parameters():
        assert not torch.equal(start[n], p), n  # every adapter tensor moved


def test_train_per_task_cycles_over_epochs(task, rng):
    small = task[0].head(200)  # 2 batches of 128 per epoch
    losses = train_per_task(SmallMLP(4, generator=rng), small, iters=5, batch_size=128, generator=rng)
    assert len(losses) == 5 and all(l > 0 for l in losses)


def test_training_beats_chance_on_the_embedded_subset(task):
    train, test = task
    g = torch.Generator().manual_seed(0)
    mlp = SmallMLP(64, generator=g)
    losses = train_per_task(mlp, train, iters=100, generator=g)
    assert losses[-1] < losses[0]
    assert accuracy(mlp, test) > 0.5
    lora = LoRAMLP(4, seed=1, generator=g)
    train_per_task(lora, train, iters=100, lr=3e-3, generator=g)
    assert accuracy(lora, test) > 0.4
    be = BatchEnsembleMLP(seed=1)
    train_per_task(be, train, iters=100, lr=1e-2, generator=g)
    assert accuracy(be, test) > 0.4
