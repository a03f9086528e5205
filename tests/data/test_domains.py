import itertools
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from supsup_fast.data.domains import SHAPE_CLASSES, DomainData, shapes_28, sklearn_digits_28


@pytest.fixture(scope="module")
def shapes():
    return shapes_28(1000, 300, seed=0)


@pytest.fixture(scope="module")
def digits():
    return sklearn_digits_28()


@pytest.fixture
def one_thread():
    """Tiny matmuls run faster on one thread than two contending ones; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check_layout(d: DomainData, n_train: int, n_test: int):
    assert d.train_images.shape == (n_train, 28, 28) and d.test_images.shape == (n_test, 28, 28)
    assert d.train_labels.shape == (n_train,) and d.test_labels.shape == (n_test,)
    assert d.train_images.dtype == d.test_images.dtype == torch.uint8
    assert d.train_labels.dtype == d.test_labels.dtype == torch.int64
    for labels in (d.train_labels, d.test_labels):
        assert labels.min() >= 0 and labels.max() <= 9
    assert isinstance(d.source, str) and d.source


def test_shapes_layout_and_balance(shapes):
    check_layout(shapes, 1000, 300)
    assert len(SHAPE_CLASSES) == 10 and len(set(SHAPE_CLASSES)) == 10
    assert torch.bincount(shapes.train_labels, minlength=10).tolist() == [100] * 10
    assert torch.bincount(shapes.test_labels, minlength=10).tolist() == [30] * 10
    assert not torch.equal(shapes.train_labels[:10], torch.arange(10))  # shuffled, not in arange order
    d = shapes_28(13, 11, seed=3)  # not a multiple of 10: still every class present
    check_layout(d, 13, 11)
    assert (torch.bincount(d.train_labels, minlength=10) >= 1).all()
    assert (torch.bincount(d.test_labels, minlength=10) >= 1).all()


def test_shapes_pixels_white_on_black(shapes):
    x = shapes.train_images.float() / 255
    # Background dark (median pixel is noise around 0), every image has a clearly bright shape.
    assert x.median() < 0.1
    assert (x.flatten(1).amax(1) > 0.9).all()
    ink = (x > 0.5).flatten(1).float().mean(1)
    assert (ink > 0.02).all() and (ink < 0.6).all()  # neither blank nor saturated
    assert x.std() > 0.1


def test_shapes_deterministic_by_seed(shapes):
    again = shapes_28(1000, 300, seed=0)
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(again, field), getattr(shapes, field))
    other = shapes_28(1000, 300, seed=1)
    assert not torch.equal(other.train_images, shapes.train_images)
    assert not torch.equal(other.test_images, shapes.test_images)
    # Train and test come from one stream: the test split is not a copy of the start of train.
    assert not torch.equal(shapes.test_images, shapes.train_images[:300])


def test_shapes_classes_distinct_and_separable(shapes, one_thread):
    x = shapes.train_images.flatten(1).float() / 255
    xt = shapes.test_images.flatten(1).float() / 255
    g = torch.Generator().manual_seed(0)
    w = (0.01 * torch.randn(784, 10, generator=g)).requires_grad_()
    b = torch.zeros(10, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.01)
    for _ in range(200):  # logistic regression on raw pixels
        opt.zero_grad()
        F.cross_entropy(x @ w + b, shapes.train_labels).backward()
        opt.step()
    logits = (xt @ w + b).detach()
    acc = (logits.argmax(1) == shapes.test_labels).float().mean().item()
    assert acc >= 0.65, acc  # measured 0.78-0.83 over seeds 0-3; chance is 0.1
    # Every pair of classes is told apart (two identical classes would score ~0.5); measured min 0.72-0.80,
    # the hardest pair being disc vs filled square.
    for i, j in itertools.combinations(range(10), 2):
        m = (shapes.test_labels == i) | (shapes.test_labels == j)
        pair_acc = (torch.where(logits[m, i] >= logits[m, j], i, j) == shapes.test_labels[m]).float().mean()
        assert pair_acc >= 0.6, (SHAPE_CLASSES[i], SHAPE_CLASSES[j], pair_acc.item())


@pytest.mark.parametrize("kwargs, name", [({"num_train": 9}, "num_train"), ({"num_test": 5}, "num_test"),
                                          ({"num_train": 100.0}, "num_train"), ({"num_test": True}, "num_test"),
                                          ({"seed": -1}, "seed"), ({"seed": "0"}, "seed")])
def test_shapes_bad_args(kwargs, name):
    with pytest.raises(ValueError, match=name):
        shapes_28(**kwargs)


def test_digits_layout_and_centring(digits):
    check_layout(digits, 1500, 297)
    from sklearn.datasets import load_digits
    target = load_digits().target
    labels = torch.cat([digits.train_labels, digits.test_labels])
    assert torch.bincount(labels, minlength=10).tolist() == np.bincount(target, minlength=10).tolist()
    images = torch.cat([digits.train_images, digits.test_images])
    assert images.max() == 255  # 16 scales to 255
    border = images.clone()
    border[:, 4:24, 4:24] = 0
    assert border.max() == 0  # everything inside MNIST's central 20x20 box
    box = images[:, 4:24, 4:24].float()
    assert (box.flatten(1).amax(1) > 100).all()  # no blank digits
    assert (box[:, :, :10].sum((1, 2)) > 0).all() and (box[:, :, 10:].sum((1, 2)) > 0).all()


def test_digits_are_the_documented_upsampling_and_split(digits):
    from sklearn.datasets import load_digits
    raw = load_digits()
    perm = np.random.RandomState(0).permutation(len(raw.target))  # the last 297 are test
    for idx, images, labels in ((perm[:-297], digits.train_images, digits.train_labels),
                                (perm[-297:], digits.test_images, digits.test_labels)):
        assert labels.tolist() == raw.target[idx].tolist()
        src = torch.from_numpy(raw.images[idx]).float()[:, None] * (255 / 16)
        up = F.interpolate(src, size=(20, 20), mode="bilinear", align_corners=False)[:, 0]
        assert (images[:, 4:24, 4:24].float() - up).abs().max() <= 0.5 + 1e-3
        # Corners of the 20x20 box copy the 8x8 corners (bilinear, align_corners=False).
        assert torch.equal(images[:, 4, 4], (src[:, 0, 0, 0]).round().to(torch.uint8))


def test_digits_deterministic_and_split(digits):
    again = sklearn_digits_28()
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(again, field), getattr(digits, field))
    other = sklearn_digits_28(seed=1, test_size=100)
    check_layout(other, 1697, 100)
    assert not torch.equal(other.test_images, digits.test_images[:100])


@pytest.mark.parametrize("test_size", [0, -1, 1797, 5000, 10.0, True])
def test_digits_bad_test_size(test_size):
    with pytest.raises(ValueError, match="test_size"):
        sklearn_digits_28(test_size=test_size)


def test_digits_missing_sklearn_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        sklearn_digits_28()
