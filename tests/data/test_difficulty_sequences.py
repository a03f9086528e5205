"""The sequences of issue #18: tasks of controlled difficulty and a sequence of mixed domains."""
import numpy as np
import pytest
import torch

from supsup_fast.data import BENCHMARK_MODELS, BENCHMARKS, DOMAINS, MixedDomains, load_benchmark, load_embedded
from supsup_fast.data.tasks import NoisyPermutedMNIST, PermutedMNIST, SizedPermutedMNIST, SplitMNISTPairs


@pytest.fixture(scope="module")
def mnist():
    return load_embedded()


def test_label_noise_levels_train_only(mnist):
    noisy, clean = NoisyPermutedMNIST(mnist, 8, seed=3), PermutedMNIST(mnist, 8, seed=3)
    for t in range(8):
        a, b = noisy.train(t), clean.train(t)
        flipped = float((a.y != b.y).float().mean())
        assert abs(flipped - noisy.noise(t)) < 0.02, (t, flipped)
        assert torch.equal(a.x, b.x) and torch.equal(a.batch(torch.arange(5))[0], b.batch(torch.arange(5))[0])
        assert int(a.y.min()) >= 0 and int(a.y.max()) <= 9
        assert torch.equal(noisy.test(t).y, clean.test(t).y)  # test labels stay clean
    assert [noisy.noise(t) for t in range(5)] == [0.0, 0.2, 0.4, 0.6, 0.0]
    assert noisy.task_name(2) == "40% label noise"
    # Fixed per seed and task; another task with the same level flips other labels.
    assert torch.equal(noisy.train(1).y, NoisyPermutedMNIST(mnist, 8, seed=3).train(1).y)
    assert not torch.equal(noisy.train(1).y != clean.train(1).y, noisy.train(5).y != clean.train(5).y)


def test_training_set_sizes(mnist):
    seq = SizedPermutedMNIST(mnist, 4, seed=1)
    full = len(mnist.train_labels)
    assert [len(seq.train(t)) for t in range(4)] == [100, 1000, min(60000, full), 100]
    assert len(seq.test(0)) == len(mnist.test_labels)
    assert seq.task_name(1) == "1000 training images"
    assert torch.equal(seq.train(0).y, SizedPermutedMNIST(mnist, 4, seed=1).train(0).y)
    # The subset is random, not the first images of the set.
    assert not torch.equal(seq.train(0).y, mnist.train_labels[:100])


def test_split_pairs_map_labels_to_first_and_second_digit(mnist):
    seq = SplitMNISTPairs(mnist, 5)
    assert [seq.classes(t) for t in range(5)] == [(0, 1), (4, 9), (3, 5), (2, 7), (6, 8)]
    split = seq.test(1)
    digits = mnist.test_labels[(mnist.test_labels == 4) | (mnist.test_labels == 9)]
    assert torch.equal(split.y, (digits == 9).long()) and set(split.y.tolist()) == {0, 1}
    assert seq.task_name(2) == "3 vs 5"
    with pytest.raises(ValueError, match="5 tasks"):
        SplitMNISTPairs(mnist, 6)


def test_mixed_domains(mnist):
    seq = MixedDomains(mnist, 7, seed=1)
    assert [seq.task_name(t) for t in range(7)] == list(DOMAINS)
    for t in range(7):
        tr, te = seq.train(t), seq.test(t)
        x, y = te.batch(torch.arange(min(50, len(te))))
        assert x.shape[1] == 784 and torch.isfinite(x).all() and int(y.max()) <= 9
        assert len(tr) > len(te) > 0
    # Inverted MNIST is MNIST with 255 - pixel, under the same normalisation.
    m, inv = seq.test(0).x, seq.test(DOMAINS.index("inverted-mnist")).x
    torch.testing.assert_close(inv, (1 / 0.3081 - 2 * 0.1307 / 0.3081) - m, atol=1e-4, rtol=0)
    # The three permuted domains permute differently, and MNIST itself is not permuted.
    perms = [seq.test(DOMAINS.index(f"permuted-{j}")).batch(torch.arange(3))[0] for j in (1, 2, 3)]
    assert not torch.equal(perms[0], perms[1]) and not torch.equal(perms[1], perms[2])
    assert torch.equal(seq.test(0).batch(torch.arange(3))[0], m[:3])
    digits = seq.train(DOMAINS.index("sklearn-digits"))
    assert len(digits) == 1500 and sorted(set(digits.y.tolist())) == list(range(10))
    with pytest.raises(ValueError, match="7 tasks"):
        MixedDomains(mnist, 8)


def test_registered_as_benchmarks():
    for name in ("permuted-mnist-noisy", "permuted-mnist-sizes", "split-mnist-pairs", "mixed-domains"):
        assert name in BENCHMARKS and BENCHMARK_MODELS[name] == ("fc1024", "lenet", "bnnet")
    seq = load_benchmark("mixed-domains", 3, seed=2)
    assert isinstance(seq, MixedDomains) and seq.task_name(2) == "inverted-mnist"
    assert np.isclose(load_benchmark("permuted-mnist-noisy", 4, seed=1).noise(3), 0.6)


def test_mixed_domains_without_scikit_learn_is_refused_before_training(monkeypatch):
    import sys
    from supsup_fast.data import DataError
    mnist = load_embedded()
    monkeypatch.setitem(sys.modules, "sklearn", None)  # an import of it fails, as where it is not installed
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DataError, match=r"task 3 \(sklearn-digits\) needs scikit-learn.*or run --tasks 3"):
        MixedDomains(mnist, 5)
    MixedDomains(mnist, 3)  # its first three tasks need no scikit-learn
