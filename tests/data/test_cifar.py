import pickle

import numpy as np
import pytest
import torch

from supsup_fast.runs.config import make_config
from supsup_fast.data import DataError, SplitCIFAR100, load_benchmark, load_cifar100
from supsup_fast.data.cifar import random_crop_flip


def write_fake_cifar100(root, n_train=400, n_test=200):
    """Tiny CIFAR-100 in the real on-disk format: pickled dicts with bytes keys, uint8 [N, 3072]."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name, n in (("train", n_train), ("test", n_test)):
        d = {b"data": rng.randint(0, 256, (n, 3072)).astype(np.uint8),
             b"fine_labels": [i % 100 for i in range(n)], b"coarse_labels": [i % 20 for i in range(n)],
             b"filenames": [b"x.png"] * n, b"batch_label": b"fake"}
        with open(folder / name, "wb") as fh:
            pickle.dump(d, fh, protocol=2)
    return folder


def test_reads_real_format_and_splits_classes(tmp_path):
    write_fake_cifar100(tmp_path)
    data = load_cifar100(tmp_path)
    assert data["train"][0].shape == (400, 3, 32, 32) and data["train"][0].dtype == torch.uint8
    tasks = SplitCIFAR100(data, 20, seed=1)
    np.random.seed(1)
    perm = np.random.permutation(100)
    assert tasks.classes(3) == [int(c) for c in perm[15:20]]
    split = tasks.test(3)
    assert set(split.y.tolist()) <= set(range(5)) and len(split) == 10  # 2 test images per class
    x, y = split.batch(torch.arange(len(split)))
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32
    xb, _ = tasks.train(0).batch(torch.arange(4))
    assert xb.shape == (4, 3, 32, 32)


def test_bad_cifar_roots(tmp_path):
    with pytest.raises(DataError, match="--data-root"):
        load_cifar100(tmp_path / "nope")
    with pytest.raises(DataError, match="cifar-100-python"):
        load_cifar100(tmp_path)
    folder = write_fake_cifar100(tmp_path)
    (folder / "train").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cannot read"):
        load_cifar100(tmp_path)
    with pytest.raises(DataError, match="MNIST only"):
        load_benchmark("split-cifar100", 2, 1, tmp_path, download=True)
    with pytest.raises(ValueError, match="20 tasks"):
        SplitCIFAR100({"source": "x"}, 21)


def test_random_crop_flip_is_a_shifted_or_mirrored_crop():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    out = random_crop_flip(x, g)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(2):
        found = any(torch.equal(out[i], crop) or torch.equal(out[i], crop.flip(-1))
                    for dy in range(9) for dx in range(9) for crop in [padded[i, :, dy:dy + 32, dx:dx + 32]])
        assert found


def test_split_cifar100_smoke_run_with_transfer(tmp_path):
    from supsup_fast.runs import run_experiment
    from supsup_fast.runs.maskfile import load_model
    import supsup_fast.nn as snn
    write_fake_cifar100(tmp_path / "data")
    cfg = make_config(overrides=dict(scenario="GG", benchmark="split-cifar100", model="gemresnet18", tasks=2,
                                     iters=3, batch_size=16, optimizer="adam", lr=1e-3, weight_decay=1e-4,
                                     er_multiplier=2.0, transfer=True, data_root=str(tmp_path / "data"),
                                     test_batch_size=32))
    r = run_experiment(cfg, tmp_path / "run", progress=False)
    assert r["num_masks"] == 2 and r["output_size"] == 5 and len(r["per_task_accuracy"]) == 2
    model = load_model(tmp_path / "run" / "model.safetensors")
    layers = snn.supermask_layers(model)
    assert all(l.score_mean is not None for l in layers.values())
    stem = layers["stem.0"]
    per_task = ss_unpack(stem).flatten(1).sum(1)  # edge-popup keeps exactly kept_count weights per task
    assert per_task.tolist() == [snn.kept_count(stem.weight.numel(), stem.density)] * 2
    assert stem.density == snn.er_density(20, 3, 3, 3, 2.0)
    with pytest.raises(ValueError, match="does not fit"):
        make_config(overrides=dict(benchmark="split-cifar100", model="fc1024"))


def ss_unpack(layer):
    import supsup_fast as ss
    return ss.unpack_bits(layer.bank.words, layer.n)


def test_a_dataset_lacking_a_tasks_classes_is_refused_before_training(tmp_path):
    folder = write_fake_cifar100(tmp_path)
    data = load_cifar100(tmp_path)
    SplitCIFAR100(data, 20, seed=1)  # every class present: accepted
    lacking = int(SplitCIFAR100(data, 20, seed=1).classes(1)[2])
    with open(folder / "test", "rb") as fh:
        d = pickle.load(fh)
    keep = [i for i, c in enumerate(d[b"fine_labels"]) if c != lacking]
    d[b"data"], d[b"fine_labels"] = d[b"data"][keep], [d[b"fine_labels"][i] for i in keep]
    with open(folder / "test", "wb") as fh:
        pickle.dump(d, fh, protocol=2)
    with pytest.raises(DataError, match=rf"has no test images of class {lacking}, which task 1 of split-cifar100"):
        SplitCIFAR100(load_cifar100(tmp_path), 20, seed=1)
    SplitCIFAR100(load_cifar100(tmp_path), 1, seed=1)  # a run of task 0 alone needs none of task 1's classes


@pytest.mark.parametrize("name,value,message", [
    (b"data", lambda d: d[b"data"].astype(np.int64) * 2, "data must be uint8 pixels"),  # would wrap past 255
    (b"data", lambda d: d[b"data"] / 255.0, "data must be uint8 pixels"),                 # would become zeros
    (b"fine_labels", lambda d: [c + 0.5 for c in d[b"fine_labels"]], "fine labels must be integers"),  # truncated
    (b"fine_labels", lambda d: [str(c) for c in d[b"fine_labels"]], "fine labels must be integers"),
    (b"data", lambda d: [row[: 3072 - (i % 2)] for i, row in enumerate(d[b"data"])], "must be arrays"),
    (b"data", lambda d: d[b"data"][:0], "holds no images"),
])
def test_a_malformed_cifar_batch_is_refused_by_name(tmp_path, name, value, message):
    folder = write_fake_cifar100(tmp_path)
    with open(folder / "train", "rb") as fh:
        d = pickle.load(fh)
    d[name] = value(d)
    with open(folder / "train", "wb") as fh:
        pickle.dump(d, fh, protocol=2)
    with pytest.raises(DataError, match=f"{folder / 'train'}.*{message}"):
        load_cifar100(tmp_path)


def test_swapped_cifar_files_are_refused(tmp_path):
    write_fake_cifar100(tmp_path, n_train=10000, n_test=50000)
    with pytest.raises(DataError, match="they are swapped"):
        load_cifar100(tmp_path)
