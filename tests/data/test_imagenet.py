"""SplitImageNet: the standard train/val class-folder layout, class split and transforms."""
import math

import numpy as np
import pytest
import torch

from supsup_fast.runs import run_experiment
from supsup_fast.algorithms.training import warmup_cosine_factor
from supsup_fast.runs.config import load_yaml, make_config
from supsup_fast.data import DataError, load_benchmark, load_imagenet
from supsup_fast.data.imagenet import eval_transform, random_resized_crop_box, train_transform

from .fake_imagenet import write_fake_imagenet


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    return write_fake_imagenet(tmp_path_factory.mktemp("imagenet"), classes=20)


def test_reads_class_folders_and_splits_with_seed_1(fake_root):
    tasks = load_benchmark("split-imagenet", 2, 1, fake_root, image_size=40)
    classes = sorted(p.name for p in (fake_root / "train").iterdir())
    perm = np.random.RandomState(1).permutation(20)
    np.random.seed(1)
    assert (np.random.permutation(20) == perm).all()  # the official np.random.seed(1) order
    assert tasks.classes(1) == [classes[i] for i in perm[10:20]]
    train = tasks.train(1)
    assert len(train) == 40 and train.y.tolist() == sorted(train.y.tolist()) and set(train.y.tolist()) == set(range(10))
    x, y = next(train.batches(16, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert x.shape == (16, 3, 40, 40) and x.dtype == torch.float32 and y.shape == (16,)
    test = tasks.test(1)
    xs = torch.cat([xb for xb, _ in test.batches(7, shuffle=False)])
    assert xs.shape == (20, 3, 40, 40)
    again = torch.cat([xb for xb, _ in test.batches(7, shuffle=False)])
    assert torch.equal(xs, again)  # the test transform is deterministic
    with pytest.raises(ValueError, match="--tasks 3 is out of range"):
        load_benchmark("split-imagenet", 3, 1, fake_root)


def test_transforms():
    from PIL import Image
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 80, 3), dtype=np.uint8))
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        left, top, w, h = random_resized_crop_box(80, 50, g)
        assert 0 <= left and left + w <= 80 and 0 <= top and top + h <= 50 and w > 0 and h > 0
        assert 0.08 * 4000 * 0.9 <= w * h <= 4000 or (w, h) == (80, 50) or w == 80 or h == 50
    assert train_transform(img, 32, g).shape == (3, 32, 32)
    x = eval_transform(img, 32)
    assert x.shape == (3, 32, 32)
    # Normalised with the ImageNet mean/std: a mid-grey image maps near (0.5 - mean) / std.
    grey = Image.fromarray(np.full((40, 40, 3), 128, dtype=np.uint8))
    torch.testing.assert_close(eval_transform(grey, 16)[:, 0, 0],
                               (torch.tensor([128 / 255] * 3) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))


def test_bad_roots_missing_classes_and_corrupt_files(tmp_path, fake_root):
    with pytest.raises(DataError, match="needs --data-root"):
        load_imagenet(None)
    with pytest.raises(DataError, match="is not a folder"):
        load_imagenet(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="split folder .*train does not exist"):
        load_imagenet(tmp_path / "empty")
    root = write_fake_imagenet(tmp_path / "miss", classes=3, train_per_class=1, val_per_class=1)
    import shutil
    shutil.rmtree(root / "val" / "n00000001")
    with pytest.raises(DataError, match=r"missing in val: \['n00000001'\]"):
        load_imagenet(root)
    (root / "val" / "n00000001").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load_imagenet(root)
    root = write_fake_imagenet(tmp_path / "bad", classes=10, train_per_class=1, val_per_class=1)
    (root / "train" / "n00000004" / "n00000004_0.JPEG").write_bytes(b"not a jpeg")
    tasks = load_benchmark("split-imagenet", 1, 1, root, image_size=16)
    with pytest.raises(DataError, match="cannot decode image .*n00000004_0.JPEG"):
        list(tasks.train(0).batches(4, shuffle=False))


def test_warmup_cosine_schedule():
    f = [warmup_cosine_factor(e, 100, 5) for e in range(100)]
    assert f[:5] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert f[5] == 1.0 and math.isclose(f[5 + 95 // 2], 0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert all(a >= b for a, b in zip(f[5:], f[6:]))


def test_splitimagenet_resnet50_smoke_run(tmp_path, fake_root):
    from pathlib import Path
    preset = load_yaml(Path(__file__).parents[2] / "configs" / "gg_splitimagenet_resnet50_s4.yaml")
    cfg = make_config(preset, dict(data_root=str(fake_root), tasks=2, epochs=1, image_size=32, batch_size=16,
                                   test_batch_size=16, train_subset=16))
    assert cfg.model == "resnet50" and cfg.scheduler == "cosine_warmup" and cfg.er_multiplier == 4
    res = run_experiment(cfg, tmp_path / "inet", progress=False)
    assert res["num_masks"] == 2 and len(res["per_task_accuracy"]) == 2
    assert 2 * 23_475_392 / 8 <= res["mask_bytes"] < 2 * 23_475_392 / 8 * 1.01  # one bit per weight (+ row padding)
    assert 0 < res["mask_entropy_bytes"] < res["mask_bytes"] and res["bn_bytes"] > 0


@pytest.mark.parametrize("width,height,resized,offsets", [
    (640, 427, (383, 256), (80, 16)), (427, 640, (256, 383), (16, 80)), (1000, 667, (383, 256), (80, 16)),
    (259, 300, (256, 296), (16, 36)), (301, 257, (299, 256), (38, 16)), (500, 375, (341, 256), (58, 16))])
def test_eval_transform_has_torchvisions_arithmetic(width, height, resized, offsets):
    """Resize(256): the long side int(256 · long / short), truncated; CenterCrop(224): offsets
    int(round((size - 224) / 2)), as torchvision computes them (pinned here; rounding the long side
    gave 384 for 383 at 640 × 427)."""
    from PIL import Image
    from supsup_fast.data.imagenet import to_tensor
    img = Image.fromarray(np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8))
    (left, top), (w, h) = offsets, resized
    want = to_tensor(img.resize((w, h), Image.BILINEAR).crop((left, top, left + 224, top + 224)))
    assert torch.equal(eval_transform(img, 224), want)


def test_the_class_split_is_the_official_seed_1_whatever_the_runs_seed(fake_root):
    one, two = load_benchmark("split-imagenet", 2, 1, fake_root, image_size=16), \
        load_benchmark("split-imagenet", 2, 2, fake_root, image_size=16)
    assert one.classes(0) == two.classes(0) and one.classes(1) == two.classes(1)


def test_task_inference_that_would_normalise_one_value_per_channel_is_refused_before_training(tmp_path, fake_root):
    # resnet18 on 8-pixel images ends in a 1x1 map: a one-image query through the superposed per-task
    # BatchNorm cannot be normalised. The run stopped at its first evaluation, after training every
    # task; now it is refused before any, and two query images or larger images pass the same check.
    from supsup_fast.runs.config import make_config
    base = dict(scenario="GNu", benchmark="split-imagenet", model="resnet18", data_root=str(fake_root), tasks=2,
                iters=1, batch_size=8, test_batch_size=8)
    with pytest.raises(ValueError, match=r"leaves layer 'stages.3.0.bn1' one value per channel \(1, 512, 1, 1\) for a "
                                         r"query of 1 image\(s\): .*--infer-images 2 or more, or a larger --image-size"):
        run_experiment(make_config(overrides=dict(base, image_size=8)), tmp_path / "small", progress=False)
    assert not (tmp_path / "small" / "checkpoints").exists()
    from supsup_fast.runs.loop import Experiment
    # two query images, but a task's last test batch of one (20 test images a task, batches of 19)
    with pytest.raises(ValueError, match=r"for a query of 1 image\(s\) \(a task's last test batch holds 1"):
        Experiment(make_config(overrides=dict(base, image_size=8, infer_images=2, test_batch_size=19)), tmp_path / "last")
    for overrides in (dict(image_size=8, infer_images=2), dict(image_size=64), dict(image_size=8, scenario="GG")):
        Experiment(make_config(overrides=dict(base, **overrides)), tmp_path / "ok")  # refused by nothing


def test_evaluating_a_gg_run_as_gnu_refuses_one_value_per_channel_before_evaluating(tmp_path, fake_root):
    # A GG run on 8-pixel images is fine (no task inference); evaluating its masks under GNu with
    # one-image queries is the case the probe exists for. `evaluate` loads the run's model, and the
    # probe ran only for a fresh one: it failed at the first batch with the layer's own message.
    from supsup_fast.runs.evaluate import evaluate_run
    cfg = make_config(overrides=dict(scenario="GG", benchmark="split-imagenet", model="resnet18", data_root=str(fake_root),
                                     tasks=2, iters=1, batch_size=8, test_batch_size=8, image_size=8))
    run_experiment(cfg, tmp_path / "gg", progress=False)
    with pytest.raises(ValueError, match=r"leaves layer 'stages.3.0.bn1' one value per channel \(1, 512, 1, 1\) for a "
                                         r"query of 1 image\(s\): .*--infer-images 2 or more"):
        evaluate_run(tmp_path / "gg", {"scenario": "GNu"}, tmp_path / "as-gnu", progress=False)
    assert not (tmp_path / "as-gnu" / "results.json").exists()
    evaluate_run(tmp_path / "gg", {"scenario": "GNu", "infer_images": 2}, tmp_path / "as-gnu-2", progress=False)
