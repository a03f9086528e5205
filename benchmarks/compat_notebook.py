"""The official SupSup notebook (RAIVNLab/supsup, mnist.ipynb) run twice on the full MNIST: with
its float layer, and with only the layer class and its four helpers taken from supsup_fast.compat.

Cells reproduced: PermutedMNIST (per-task np.random.seed(i + seed) permutation, normalise
(0.1307, 0.3081), DataLoader batch 128, train shuffled), the training cell (per task:
set_model_task, RMSprop(lr=1e-4) over the parameters that require grad, 1 epoch, validation,
cache_masks, set_num_tasks_learned), the GG cell, the task-inference cell (50 trials × 5 tasks, one
image: the first of the unshuffled validation loader, as the notebook does) and the GNs cell.
Besides the notebook's cell we report one-shot inference on 200 different images per task.
torchvision is not a dependency here, so the dataset class is rebuilt on our IDX reader.

    python benchmarks/compat_notebook.py --data-root ../shared/data/mnist --out benchmarks/results/compat-notebook.json

The float and compat flows alternate (F C C F by default, ``--repeats 2``; times are medians) and
accuracies come from each variant's first run. Because these machines are shared and noisy, the
training-time check uses a second measurement: both variants' training steps interleaved on the
same batches, step by step (``lockstep_training``).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import supsup_fast as ss  # noqa: E402
from supsup_fast import compat  # noqa: E402
from supsup_fast.bench.report import stamp  # noqa: E402
from supsup_fast.data import load_mnist  # noqa: E402
from supsup_fast.data.mnist import normalise  # noqa: E402
from tests.nn.test_compat import FLOAT_API, MultitaskFC, tensor_bytes  # noqa: E402  (the float original)

COMPAT_API = dict(layer=compat.MultitaskMaskLinear, set_model_task=compat.set_model_task, cache_masks=compat.cache_masks,
                  set_num_tasks_learned=compat.set_num_tasks_learned, set_alphas=compat.set_alphas)


class PermutedImages(torch.utils.data.Dataset):
    """One MNIST split, normalised, each image's pixels permuted by the current task's permutation."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.x, self.y = normalise(images), labels.long()
        self.perm = torch.arange(784)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i][self.perm].view(1, 28, 28), self.y[i]


class MNISTPerm:
    def __init__(self, data_root: str, seed: int = 0):
        mnist = load_mnist(data_root)
        self.seed = seed
        self.train_set = PermutedImages(mnist.train_images, mnist.train_labels)
        self.val_set = PermutedImages(mnist.test_images, mnist.test_labels)
        self.train_loader = torch.utils.data.DataLoader(self.train_set, batch_size=128, shuffle=True)
        self.val_loader = torch.utils.data.DataLoader(self.val_set, batch_size=128, shuffle=False)

    def update_task(self, i: int) -> None:
        np.random.seed(i + self.seed)
        perm = torch.from_numpy(np.random.permutation(784))
        self.train_set.perm = self.val_set.perm = perm


def train(model, loader, optimizer):
    model.train()
    for batch, labels in loader:
        loss = F.cross_entropy(model(batch), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@torch.no_grad()
def evaluate(model, loader) -> float:
    model.eval()
    correct = seen = 0
    for batch, labels in loader:
        correct += int((model(batch).argmax(-1) == labels).sum())
        seen += len(labels)
    return correct / seen


def oneshot_task_inference(api, model, batch, num_tasks):
    api["set_model_task"](model, -1, verbose=False)
    alphas = torch.ones(num_tasks, 1, 1) / num_tasks
    alphas.requires_grad_(True)
    api["set_alphas"](model, alphas, verbose=False)
    logits = model(batch)
    entropy = -(logits.softmax(dim=1) * logits.log_softmax(dim=1)).sum(1).mean()
    (g,) = torch.autograd.grad(entropy, alphas)
    return int((-g).squeeze().argmax())


def run_notebook(api, mnist: MNISTPerm, num_tasks: int, epochs: int, trials: int, per_image: int) -> dict:
    quiet = dict(verbose=False)
    torch.manual_seed(0)
    model = MultitaskFC(api["layer"], 300, num_tasks)
    train_s = 0.0
    t_cell = time.perf_counter()
    for task in range(num_tasks):  # the training cell
        api["set_model_task"](model, task, **quiet)
        mnist.update_task(task)
        optimizer = torch.optim.RMSprop([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for _ in range(epochs):
            t0 = time.perf_counter()
            train(model, mnist.train_loader, optimizer)
            train_s += time.perf_counter() - t0
            evaluate(model, mnist.val_loader)
        api["cache_masks"](model)
        api["set_num_tasks_learned"](model, task + 1)
    cell_s = time.perf_counter() - t_cell
    gg = []
    for task in range(num_tasks):  # GG cell
        api["set_model_task"](model, task, **quiet)
        mnist.update_task(task)
        gg.append(evaluate(model, mnist.val_loader))
    hits = seen = 0
    t0 = time.perf_counter()
    for _ in range(trials):  # task-inference cell (the same first validation image each trial)
        for task in range(num_tasks):
            mnist.update_task(task)
            batch = next(iter(mnist.val_loader))[0][:1]
            hits += oneshot_task_inference(api, model, batch, num_tasks) == task
            seen += 1
    infer_s = time.perf_counter() - t0
    img_hits = 0
    for task in range(num_tasks):  # one-shot on `per_image` different images per task
        mnist.update_task(task)
        for j in range(per_image):
            x, _ = mnist.val_set[j * (len(mnist.val_set) // per_image)]
            img_hits += oneshot_task_inference(api, model, x.unsqueeze(0), num_tasks) == task
    gns = []
    for task in range(num_tasks):  # GNs cell
        mnist.update_task(task)
        inferred = oneshot_task_inference(api, model, next(iter(mnist.val_loader))[0][:1], num_tasks)
        api["set_model_task"](model, inferred, **quiet)
        gns.append(evaluate(model, mnist.val_loader))
    return {"gg_accuracy": sum(gg) / len(gg), "gg_per_task": gg, "gns_accuracy": sum(gns) / len(gns),
            "task_inference_accuracy_notebook_cell": hits / seen,
            "task_inference_accuracy_per_image": img_hits / (per_image * num_tasks),
            "train_seconds": train_s, "training_cell_seconds": cell_s, "inference_cell_seconds": infer_s,
            "model_tensor_bytes": tensor_bytes(model)}


def lockstep_training_time(mnist: MNISTPerm, num_tasks: int, epochs: int) -> dict:
    """Both variants' training steps interleaved on the same batches (who goes first alternates),
    so the machine's load drifts over both alike: the training-time ratio to trust on a shared CPU."""
    apis = {"float": FLOAT_API, "compat": COMPAT_API}
    models = {}
    for name, api in apis.items():
        torch.manual_seed(0)
        models[name] = MultitaskFC(api["layer"], 300, num_tasks)
    spent = {name: 0.0 for name in apis}
    step = 0
    for task in range(num_tasks):
        mnist.update_task(task)
        opts = {}
        for name, api in apis.items():
            api["set_model_task"](models[name], task, verbose=False)
            models[name].train()
            opts[name] = torch.optim.RMSprop([p for p in models[name].parameters() if p.requires_grad], lr=1e-4)
        for _ in range(epochs):
            for batch, labels in mnist.train_loader:
                names = list(apis) if step % 2 == 0 else list(apis)[::-1]
                for name in names:
                    t0 = time.perf_counter()
                    loss = F.cross_entropy(models[name](batch), labels)
                    opts[name].zero_grad()
                    loss.backward()
                    opts[name].step()
                    spent[name] += time.perf_counter() - t0
                step += 1
        for name, api in apis.items():
            api["cache_masks"](models[name])
            api["set_num_tasks_learned"](models[name], task + 1)
    return {"float_seconds": spent["float"], "compat_seconds": spent["compat"], "steps_each": step,
            "compat_over_float": spent["compat"] / spent["float"]}


def machine() -> dict:
    cpu, flags = platform.processor(), ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name"))
        flags = next(l for l in info.splitlines() if l.startswith("flags"))
    except (OSError, StopIteration):
        pass
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"
    return {"platform": platform.platform(), "cpu": cpu, "isa": isa, "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "backends": ss.backends.available()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True, help="folder with the four MNIST IDX files")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/compat-notebook.json"))
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--per-image", type=int, default=200)
    p.add_argument("--repeats", type=int, default=2, help="runs per variant, alternating F C C F ...")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    mnist = MNISTPerm(args.data_root)
    order = []
    for r in range(args.repeats):
        order += [("float", FLOAT_API), ("compat", COMPAT_API)] if r % 2 == 0 else [("compat", COMPAT_API), ("float", FLOAT_API)]
    runs = {"float": [], "compat": []}
    for name, api in order:
        res = run_notebook(api, mnist, args.tasks, args.epochs, args.trials, args.per_image)
        runs[name].append(res)
        print(name, {k: v for k, v in res.items() if k != "gg_per_task"}, flush=True)
    summary = {}
    for name, rs in runs.items():
        s = dict(rs[0])
        for key in ("train_seconds", "training_cell_seconds", "inference_cell_seconds"):
            s[key + "_runs"] = [r[key] for r in rs]
            s[key] = statistics.median(s[key + "_runs"])  # median over the alternating runs
        summary[name] = s
    f, c = summary["float"], summary["compat"]
    lockstep = lockstep_training_time(mnist, args.tasks, args.epochs)
    print("lockstep", lockstep, flush=True)
    checks = {
        "gg_within_1pt": abs(c["gg_accuracy"] - f["gg_accuracy"]) <= 0.01,
        "task_inference_within_5pt": abs(c["task_inference_accuracy_notebook_cell"] - f["task_inference_accuracy_notebook_cell"]) <= 0.05,
        "training_time_not_higher": lockstep["compat_over_float"] <= 1.0,
        "model_bytes_at_most_25pct": c["model_tensor_bytes"] <= 0.25 * f["model_tensor_bytes"],
    }
    result = {"benchmark": "compat-notebook", "machine": machine(), **stamp(),
              "settings": {"model": "MultitaskFC 784-300-300-100, no bias", "benchmark": "PermutedMNIST (full MNIST)",
                           "tasks": args.tasks, "epochs": args.epochs, "batch_size": 128, "optimizer": "RMSprop lr 1e-4",
                           "trials": args.trials, "num_examples": 1, "per_image_queries_per_task": args.per_image,
                           "repeats": args.repeats, "order": [n for n, _ in order]},
              "float": f, "compat": c,
              "lockstep_training": lockstep,
              "ratios": {"train_time_compat_over_float_lockstep": lockstep["compat_over_float"],
                         "train_time_compat_over_float_median_of_runs": c["train_seconds"] / f["train_seconds"],
                         "inference_cell_time_compat_over_float": c["inference_cell_seconds"] / f["inference_cell_seconds"],
                         "bytes_compat_over_float": c["model_tensor_bytes"] / f["model_tensor_bytes"]},
              "checks": checks}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"ratios": result["ratios"], "checks": checks}, indent=2))
    return result


if __name__ == "__main__":
    main()
