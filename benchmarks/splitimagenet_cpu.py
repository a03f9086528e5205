"""SplitImageNet on the CPU: training time per epoch of one task (ResNet-50, 224×224 crops, batch
32, timed on a few batches of JPEGs in the real ImageNet folder layout and scaled to a task's
12,812 training images) and the bytes one task's masks take at ER S = 4, 8, 16, beside the paper's
Fig. 2 table (195.18 M / 100.98 M / 65.50 M bytes for 100 tasks).

    python benchmarks/splitimagenet_cpu.py [--out FILE] [--batches N]   # default FILE: benchmarks/results/splitimagenet-cpu.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository root: the fake-ImageNet writer of the tests

from tests.data.fake_imagenet import write_fake_imagenet  # noqa: E402

from supsup_fast.bench.report import machine, stamp  # noqa: E402
from supsup_fast.algorithms.training import TrainSettings, make_optimizer  # noqa: E402
from supsup_fast.data import load_benchmark  # noqa: E402
from supsup_fast.models import build_model  # noqa: E402
from supsup_fast.nn import begin_task, finish_task, kept_count, supermask_layers, task_parameters  # noqa: E402
from supsup_fast.nn.batchnorm import MultitaskBatchNorm  # noqa: E402

TRAIN_IMAGES_PER_TASK = 12_812   # 1,281,167 ImageNet training images / 1000 classes × 10
PAPER_BYTES_100_TASKS = {16: 195.18e6, 8: 100.98e6, 4: 65.50e6}  # inferred S mapping (reference doc §1.12)


def bytes_per_task(er: float) -> dict:
    model = build_model("resnet50", 10, er_multiplier=er)
    n_weights = nnz = 0
    entropy_bits = 0.0
    bitmap = 0
    for layer in supermask_layers(model).values():
        n = layer.weight.numel()
        keep = kept_count(n, layer.density)
        n_weights += n
        nnz += keep
        p = keep / n
        entropy_bits += 0 if p in (0, 1) else n * -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
        bitmap += layer.bank.row_shape[0] * layer.bank.row_shape[1] * 4
    bn = sum(2 * m.num_features * 4 for m in model.modules() if isinstance(m, MultitaskBatchNorm))
    return {"er_multiplier": er, "weights": n_weights, "kept": nnz, "density": nnz / n_weights,
            "bitmap_bytes": bitmap, "int16_index_bytes": 2 * nnz, "entropy_coded_bytes": entropy_bits / 8,
            "bn_bytes": bn, "paper_bytes_per_task": PAPER_BYTES_100_TASKS.get(int(er), float("nan")) / 100}


WARMUP_BATCHES = 2  # the first steps include one-time setup and the allocator's growth


def time_training(batches: int = 4, batch_size: int = 32) -> dict:
    steps = WARMUP_BATCHES + batches
    with tempfile.TemporaryDirectory() as tmp:
        # every step a full batch: one short batch timed among few would pull the figure down
        root = write_fake_imagenet(Path(tmp), classes=10, train_per_class=-(-steps * batch_size // 10), val_per_class=1)
        # The fake JPEGs are small; decoding a real ~110 KB ImageNet JPEG costs more (reported separately).
        tasks = load_benchmark("split-imagenet", 1, 1, root, image_size=224)
        model = build_model("resnet50", 10, er_multiplier=4)
        begin_task(model, generator=torch.Generator().manual_seed(0))
        model.train()
        opt = make_optimizer(task_parameters(model), TrainSettings(optimizer="adam", lr=1e-3))
        times, loads = [], []
        it = tasks.train(0).batches(batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
        for step in range(steps):
            t0 = time.perf_counter()
            x, y = next(it)
            if x.shape[0] != batch_size:
                raise RuntimeError(f"step {step}: a batch of {x.shape[0]} images, expected {batch_size}")
            t1 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            t2 = time.perf_counter()
            if step >= WARMUP_BATCHES:
                times.append(t2 - t1)
                loads.append(t1 - t0)
        finish_task(model)
    per_image = statistics.median(times) / batch_size
    return {"batch_size": batch_size, "warmup_batches": WARMUP_BATCHES, "timed_batches": len(times), "seconds_per_batch": statistics.median(times),
            "seconds_each_batch": times, "data_seconds_per_batch": statistics.median(loads),
            "seconds_per_epoch_projected": per_image * TRAIN_IMAGES_PER_TASK,
            "hours_per_task_100_epochs_projected": per_image * TRAIN_IMAGES_PER_TASK * 100 / 3600,
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "splitimagenet-cpu.json", help="JSON report to write")
    parser.add_argument("--batches", type=int, default=4, help="training batches to time (after two warm-up batches); the report gives their median")
    args = parser.parse_args(argv)
    if args.batches < 1:
        parser.error("--batches must be >= 1")
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)  # a bad --out fails now, not after the measurement
    if out.is_dir() or not os.access(out.parent, os.W_OK):
        parser.error(f"--out {out}: not a writable file path")
    report = {"machine": machine(), **stamp(), "bytes": [bytes_per_task(s) for s in (4, 8, 16)],
              "training": time_training(args.batches)}
    out.write_text(json.dumps(report, indent=2))
    for b in report["bytes"]:
        print(f"S={b['er_multiplier']:>2}: density {b['density']:.4f}; per task: bitmap {b['bitmap_bytes'] / 1e6:.2f} MB, "
              f"16-bit indices {b['int16_index_bytes'] / 1e6:.2f} MB, entropy-coded {b['entropy_coded_bytes'] / 1e6:.2f} MB, "
              f"BN {b['bn_bytes'] / 1e3:.0f} KB; paper {b['paper_bytes_per_task'] / 1e6:.2f} MB")
    t = report["training"]
    print(f"training: {t['seconds_per_batch']:.2f} s per batch of {t['batch_size']} -> {t['seconds_per_epoch_projected'] / 60:.0f} min "
          f"per epoch of one task ({TRAIN_IMAGES_PER_TASK} images), {t['hours_per_task_100_epochs_projected']:.0f} h for 100 epochs")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
