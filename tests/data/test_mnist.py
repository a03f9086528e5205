import gzip
import struct
import urllib.request
import warnings

import numpy as np
import pytest
import torch

from supsup_fast.data import (DataError, PermutedMNIST, RotatedMNIST, SplitMNIST, load_embedded, load_mnist,
                              read_idx, rotate_images)
from supsup_fast.data.mnist import FILES


def write_idx(path, arr, gz):
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 8, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    data = header + arr.tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def fake_mnist(folder, gz, n_train=20, n_test=10):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    arrays = {"train_images": rng.randint(0, 256, (n_train, 28, 28)), "train_labels": np.arange(n_train) % 10,
              "test_images": rng.randint(0, 256, (n_test, 28, 28)), "test_labels": np.arange(n_test) % 10}
    for key, stem in FILES.items():
        write_idx(folder / (stem + (".gz" if gz else "")), arrays[key], gz)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_reads_idx_layouts(tmp_path, gz, layout):
    folder = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    arrays = fake_mnist(folder, gz)
    m = load_mnist(tmp_path)
    assert torch.equal(m.train_images, torch.from_numpy(arrays["train_images"].astype(np.uint8)))
    assert m.test_labels.tolist() == list(arrays["test_labels"])


def test_bad_roots_and_files(tmp_path):
    with pytest.raises(DataError, match="--data-root"):
        load_mnist(tmp_path / "missing")
    with pytest.raises(DataError, match="--data-root.*train-images"):
        load_mnist(tmp_path)
    fake_mnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="expected"):
        load_mnist(tmp_path)
    path.write_bytes(b"garbage!")
    with pytest.raises(DataError, match="magic"):
        read_idx(path)


def test_download_offline_names_data_root(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="--data-root"):
        load_mnist(tmp_path / "dl", download=True)
    with pytest.raises(DataError, match="--download needs --data-root"):
        load_mnist(None, download=True)


def test_download_verifies_checksum(tmp_path, monkeypatch):
    class Resp:
        def __init__(self, blob): self.blob = blob
        def read(self): return self.blob
        def __enter__(self): return self
        def __exit__(self, *a): return False
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Resp(gzip.compress(b"not mnist")))
    with pytest.raises(DataError, match="checksum mismatch"):
        load_mnist(tmp_path, download=True)
    assert not list(tmp_path.glob("*.gz"))


def test_embedded_subset():
    m = load_embedded()
    assert m.train_images.shape == (10000, 28, 28) and m.test_images.shape == (2000, 28, 28)
    assert m.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]


def test_permuted_mnist_seeds_and_batched_permutation():
    m = load_embedded()
    p = PermutedMNIST(m, 3, seed=1)
    perm = p.permutation(0)
    assert torch.equal(perm, torch.from_numpy(np.random.RandomState(1).permutation(784)))
    assert not torch.equal(perm, torch.arange(784))  # task 0 is permuted too
    split = p.train(2)
    x, y = split.batch(torch.arange(4))
    base = ((m.train_images[:4].reshape(4, -1).float() / 255) - 0.1307) / 0.3081
    assert torch.allclose(x, base[:, p.permutation(2)])
    assert torch.equal(y, m.train_labels[:4])
    with pytest.raises(ValueError, match="task must be in"):
        p.permutation(3)


def test_rotated_and_split():
    m = load_embedded()
    r = RotatedMNIST(m, 36)
    assert r.angle(3) == 30
    img = torch.zeros(1, 28, 28)
    img[0, 2, 13] = 255
    assert torch.equal(rotate_images(rotate_images(img, 90), 270), img)
    assert torch.nonzero(rotate_images(img, 180)[0]).tolist() == [[25, 14]]
    s = SplitMNIST(m, 5)
    tr = s.train(3)
    assert set(tr.y.tolist()) == {0, 1} and s.num_labels == 2
    raw = SplitMNIST(m, 5, remap_labels=False)
    assert set(raw.test(3).y.tolist()) == {6, 7}
    with pytest.raises(ValueError, match="5 tasks"):
        SplitMNIST(m, 6)


def test_damaged_or_misnamed_files_are_data_errors(tmp_path):
    fake_mnist(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # a flipped byte inside the deflate stream
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="cannot read IDX file"):
        load_mnist(tmp_path)
    plain = tmp_path / "gzipped-without-suffix"
    plain.write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x01x"))
    with pytest.raises(DataError, match="gzip-compressed but not named .gz"):
        read_idx(plain)
    huge = tmp_path / "huge"
    huge.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">III", 2 ** 31, 2 ** 31, 2 ** 2) + b"x")
    with pytest.raises(DataError, match="expected 18446744073709551616"):
        read_idx(huge)


def test_empty_or_swapped_splits_are_refused(tmp_path):
    fake_mnist(tmp_path / "empty", gz=False, n_test=0)
    with pytest.raises(DataError, match="test files .* hold no images"):
        load_mnist(tmp_path / "empty")
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    for stem, n in (("train", 10000), ("t10k", 60000)):  # the standard release, train- and t10k- swapped
        write_idx(swapped / f"{stem}-images-idx3-ubyte", np.zeros((n, 28, 28)), False)
        write_idx(swapped / f"{stem}-labels-idx1-ubyte", np.arange(n) % 10, False)
    with pytest.raises(DataError, match="they are swapped"):
        load_mnist(tmp_path / "swapped")
    arrays = fake_mnist(tmp_path / "labels-as-images", gz=False)
    write_idx(tmp_path / "labels-as-images" / "t10k-images-idx3-ubyte", arrays["test_labels"], False)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte is not an MNIST image file: .*\(10,\), expected \[N, 28, 28\]"):
        load_mnist(tmp_path / "labels-as-images")
    fake_mnist(tmp_path / "short", gz=False)
    write_idx(tmp_path / "short" / "train-labels-idx1-ubyte", np.arange(7) % 10, False)
    with pytest.raises(DataError, match="MNIST train files in .* do not match: 20 images, 7 labels"):
        load_mnist(tmp_path / "short")


def test_download_keeps_verified_raw_files_and_tries_the_next_mirror(tmp_path, monkeypatch):
    from supsup_fast.data import mnist
    arrays = fake_mnist(tmp_path / "raw-present" / "MNIST" / "raw", gz=False)
    md5 = {stem: mnist._md5_of(tmp_path / "raw-present" / "MNIST" / "raw" / stem) for stem in FILES.values()}
    monkeypatch.setattr(mnist, "MD5", md5)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("a verified file was fetched again"))
    m = load_mnist(tmp_path / "raw-present", download=True)
    assert m.train_labels.tolist() == list(arrays["train_labels"])

    class Resp:
        def __init__(self, blob): self.blob = blob
        def read(self): return self.blob
        def __enter__(self): return self
        def __exit__(self, *a): return False
    src = tmp_path / "raw-present" / "MNIST" / "raw"
    urls = []

    def mirrors(url, timeout):
        urls.append(url)
        if url.startswith(mnist.MIRRORS[0]):
            return Resp(b"<html>not found</html>")  # a first mirror's error page
        return Resp(gzip.compress((src / url.rsplit("/", 1)[1][:-3]).read_bytes()))
    monkeypatch.setattr(urllib.request, "urlopen", mirrors)
    m = load_mnist(tmp_path / "fresh", download=True)
    assert m.test_labels.tolist() == list(arrays["test_labels"])
    assert [u.startswith(mnist.MIRRORS[i % 2]) for i, u in enumerate(urls)] == [True] * 8  # each file: first, then second


def test_rotated_mnist_has_36_distinct_tasks():
    m = load_embedded()
    assert RotatedMNIST(m, 36).angle(35) == 350
    with pytest.raises(ValueError, match=r"covers one turn: 36 tasks at 10° each \(task 36 would rotate by 360°.* --tasks 37"):
        RotatedMNIST(m, 37)


def test_download_reads_the_verified_files_not_others_of_the_same_name(tmp_path, monkeypatch):
    # A folder holding other IDX files under MNIST's names (a subset, Fashion-MNIST): --download
    # fetches the verified .gz files beside them, and the run must read those, saying so.
    from supsup_fast.data import mnist
    real = fake_mnist(tmp_path / "src", gz=False)
    md5 = {stem: mnist._md5_of(tmp_path / "src" / stem) for stem in FILES.values()}
    monkeypatch.setattr(mnist, "MD5", md5)
    fake_mnist(tmp_path / "root", gz=False, n_train=7, n_test=5)  # other files, valid IDX, the same names

    class Resp:
        def __init__(self, blob): self.blob = blob
        def read(self): return self.blob
        def __enter__(self): return self
        def __exit__(self, *a): return False
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout: Resp(gzip.compress((tmp_path / "src" / url.rsplit("/", 1)[1][:-3]).read_bytes())))
    with pytest.warns(UserWarning, match="train-images-idx3-ubyte is not MNIST's train-images-idx3-ubyte"):
        m = load_mnist(tmp_path / "root", download=True)
    assert m.train_labels.tolist() == list(real["train_labels"]) and len(m.test_labels) == len(real["test_labels"])
    # fetched once: a second --download, and every read without it (a resume, `evaluate`), reads the
    # verified files again, naming the other each time, and fetches nothing
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("fetched again"))
    for download in (True, False):
        with pytest.warns(UserWarning, match="train-labels-idx1-ubyte is not MNIST's"):
            assert load_mnist(tmp_path / "root", download=download).train_labels.tolist() == list(real["train_labels"])


def test_split_mnist_refuses_files_lacking_a_tasks_digits(tmp_path):
    arrays = fake_mnist(tmp_path / "six", gz=False, n_train=30, n_test=12)
    write_idx(tmp_path / "six" / "train-labels-idx1-ubyte", np.arange(30) % 6, False)  # digits 0-5 only
    m = load_mnist(tmp_path / "six")
    assert len(arrays["train_labels"]) == 30
    SplitMNIST(m, 3)  # tasks of digits 0-5: accepted
    with pytest.raises(DataError, match=r"has no training images of classes 6, 7, which task 3 of split-mnist"):
        SplitMNIST(m, 5)


def test_an_idx_header_of_other_dimensions_than_its_name_is_named(tmp_path):
    fake_mnist(tmp_path / "d", gz=False)
    path = tmp_path / "d" / "train-images-idx3-ubyte"
    blob = bytearray(path.read_bytes())
    blob[3] = 4  # four dimensions: the sizes then run into the pixels
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: its header gives 4 dimensions where its name \(idx3\) promises 3"):
        load_mnist(tmp_path / "d")
