"""Q3, storage budget: is a 1-bit-per-weight SupSup mask a cheaper way to store a PermutedMNIST task
than a small dense network of its own? Accuracy against bytes per task, task identity given:

* SupSup GG masks on the frozen random LeNet / FC1024 (``supsup-fast run --scenario GG``, run
  in-process): the threshold mask function and top-k at several densities. Bytes per task: the
  packed bank (``mask_bytes / tasks``: 1 bit per weight, rows padded to 32-bit words) and
  entropy-coded (``mask_entropy_bytes / tasks``: n·H(density)/8 per layer).
* A small dense MLP 784-w-10 per task, stored in float32, float16 or int8
  (supsup_fast.bench.pertask: one training per width, the three precisions evaluated on it).
* Adapters on the same frozen random LeNet that SupSup masks (same seed, same weights): LoRA
  ΔW = B·A of rank r per layer, and BatchEnsemble rank-1 factors W ⊙ (s rᵀ); float32 and float16.

The frozen network's cost is paid once, not per task (SupSup and the adapters): its float32
weights if stored, or 8 bytes (a seed) if regenerated. Byte conventions: supsup_fast/bench/pertask.py.

    python benchmarks/questions_budget.py                        # full run (full MNIST in ../shared/data/mnist)
    python benchmarks/questions_budget.py --resume               # continue an interrupted run
    python benchmarks/questions_budget.py --quick --embedded --out /tmp/q3   # smoke run

Writes OUT/q3-budget.json, OUT/q3-budget.png, OUT/q3-budget.partial.json (finished (method, seed)
entries, for --resume); each SupSup run's folder and log go under --runs (runs/questions/q3).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from tqdm import tqdm

from supsup_fast.bench.pertask import (RECOMMENDED_LR, BatchEnsembleMLP, LoRAMLP, SmallMLP, accuracy,
                                       frozen_bytes, quantize_model, train_per_task)
from supsup_fast.data import PermutedMNIST, load_mnist
from supsup_fast.models import build_model
from supsup_fast.runs.loop import task_generator
from supsup_fast.runs.maskfile import atomic_write_bytes
from supsup_fast.bench.report import stamp
from supsup_fast.runs.results import machine_info, write_json

HERE = Path(__file__).resolve().parent
NAME = "q3-budget"
FULL = dict(tasks=3, seeds=[1, 2, 3], iters=1000, widths=[4, 8, 16, 32, 64, 128, 256], ranks=[1, 2, 4, 8],
            densities=[0.02, 0.05, 0.1, 0.25, 0.5], models=["lenet", "fc1024"])
QUICK = dict(tasks=1, seeds=[1], iters=30, widths=[8, 32], ranks=[1, 4], densities=[0.05, 0.5], models=["lenet"])
# Settings that shape every finished entry: a --resume under other values is refused.
SIGNATURE = ("tasks", "iters", "batch_size", "data", "lr_mlp", "lr_lora", "lr_be", "adapter_bias", "be_init")


@dataclass
class Job:
    """One (method, seed) entry: trains every task of the seed and yields one or more variants
    (precisions, byte accountings) of the method."""
    kind: str          # supsup | mlp | lora | batchensemble
    name: str
    seed: int
    params: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.name}/seed{self.seed}"


def jobs_for(cfg: dict) -> List[Job]:
    jobs = []
    for seed in cfg["seeds"]:  # seed-major: an interrupted run has whole seeds first
        for model in cfg["models"]:
            jobs.append(Job("supsup", f"supsup-{model}-threshold", seed, dict(model=model, mask_fn="threshold")))
            for d in cfg["densities"]:
                jobs.append(Job("supsup", f"supsup-{model}-topk-d{d:g}", seed, dict(model=model, mask_fn="topk", density=d)))
        for w in cfg["widths"]:
            jobs.append(Job("mlp", f"mlp-w{w}", seed, dict(width=w)))
        for r in cfg["ranks"]:
            jobs.append(Job("lora", f"lora-r{r}", seed, dict(rank=r)))
        jobs.append(Job("batchensemble", "batchensemble", seed, {}))
    return jobs


# -- SupSup: the package's own run, in-process ----------------------------------------------------

def supsup_argv(job: Job, cfg: dict, out: Path) -> List[str]:
    argv = ["run", "--scenario", "GG", "--benchmark", "permuted-mnist", "--model", job.params["model"],
            "--tasks", str(cfg["tasks"]), "--seed", str(job.seed), "--iters", str(cfg["iters"]),
            "--batch-size", str(cfg["batch_size"])]
    if job.params["mask_fn"] == "topk":
        argv += ["--mask-fn", "topk", "--density", f"{job.params['density']:g}"]
    if cfg["data_root"] is not None:
        argv += ["--data-root", cfg["data_root"]]
    return argv + ["--out", str(out), "--no-progress"]


def run_supsup(job: Job, cfg: dict, runs_dir: Path, resume: bool) -> dict:
    from supsup_fast.cli import main as cli_main
    run_dir = runs_dir / job.key.replace("/", "-")
    log = run_dir.parent / (run_dir.name + ".log")
    argv = supsup_argv(job, cfg, run_dir)
    results_path = run_dir / "results.json"
    if not (resume and results_path.exists()):
        if run_dir.exists() and not resume:
            shutil.rmtree(run_dir)  # this driver's own folder: a fresh run starts from nothing
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
            rc = cli_main(argv + (["--resume"] if resume else []))
        if rc != 0:
            raise RuntimeError(f"{job.key}: supsup-fast {' '.join(argv)} failed (rc {rc}); see {log}:\n"
                               + log.read_text()[-2000:])
    res = json.loads(results_path.read_text())
    want = dict(scenario="GG", model=job.params["model"], tasks=cfg["tasks"], seed=job.seed, iters=cfg["iters"],
                batch_size=cfg["batch_size"], density=job.params.get("density"),
                mask_fn=None if job.params["mask_fn"] == "threshold" else "topk")
    if res["data"] != cfg["data_source"] or any(res["config"].get(k) != v for k, v in want.items()):
        raise RuntimeError(f"{results_path} was made with other settings than {job.key} asks for "
                           f"(data {res['data']!r}, config {res['config']}); delete {run_dir} to retrain it")
    k = res["num_masks"]
    n_weights = _n_weights(job.params["model"], res["output_size"])
    common = dict(accuracy=res["per_task_accuracy"], train_seconds=res["timing"]["train"],
                  command="python -m supsup_fast " + " ".join(argv),
                  settings=dict({key: res["config"][key] for key in ("lr", "optimizer", "iters", "batch_size",
                                                                     "mask_fn", "density", "init")},
                                output_size=res["output_size"], mask_fn_used=job.params["mask_fn"]))
    return {
        f"{job.name}/packed": dict(common, bytes_per_task=res["mask_bytes"] / k,
                                   unpadded_bytes_per_task=n_weights / 8),
        f"{job.name}/entropy": dict(common, bytes_per_task=res["mask_entropy_bytes"] / k),
    }


def _n_weights(model: str, output_size: int) -> int:
    from supsup_fast.nn import supermask_layers
    return sum(layer.weight.numel() for layer in supermask_layers(build_model(model, output_size)).values())


# -- per-task baselines -------------------------------------------------------------------------------

def run_pertask(job: Job, cfg: dict, mnist) -> dict:
    seq = PermutedMNIST(mnist, cfg["tasks"], job.seed)
    variants: Dict[str, dict] = {}
    precisions = ("float32", "float16", "int8") if job.kind == "mlp" else ("float32", "float16")
    lr = {"mlp": cfg["lr_mlp"], "lora": cfg["lr_lora"], "batchensemble": cfg["lr_be"]}[job.kind]
    train_seconds = 0.0
    for t in range(cfg["tasks"]):
        data_gen = task_generator(job.seed, t)  # the generator a SupSup run derives for task t
        init_gen = torch.Generator().manual_seed(data_gen.initial_seed() + 2 ** 40)
        if job.kind == "mlp":
            model = SmallMLP(job.params["width"], generator=init_gen)
        elif job.kind == "lora":
            model = LoRAMLP(job.params["rank"], seed=job.seed, bias=cfg["adapter_bias"], generator=init_gen)
        else:
            model = BatchEnsembleMLP(seed=job.seed, factor_init=cfg["be_init"], bias=cfg["adapter_bias"],
                                     generator=init_gen)
        start = time.perf_counter()
        losses = train_per_task(model, seq.train(t), iters=cfg["iters"], batch_size=cfg["batch_size"], lr=lr,
                                generator=data_gen)
        train_seconds += time.perf_counter() - start
        test = seq.test(t)
        for p in precisions:
            q, nbytes = quantize_model(model, p)
            v = variants.setdefault(f"{job.name}/{p}", dict(accuracy=[], bytes_per_task=nbytes, final_loss=[]))
            v["accuracy"].append(accuracy(q, test))
            v["final_loss"].append(statistics.fmean(losses[-50:]))
    ctor = {"mlp": f"SmallMLP({job.params.get('width')}, generator=init_gen)",
            "lora": f"LoRAMLP({job.params.get('rank')}, seed={job.seed}, bias={cfg['adapter_bias']}, generator=init_gen)",
            "batchensemble": f"BatchEnsembleMLP(seed={job.seed}, factor_init={cfg['be_init']!r}, "
                             f"bias={cfg['adapter_bias']}, generator=init_gen)"}[job.kind]
    command = (f"for t in range({cfg['tasks']}): model = {ctor}; train_per_task(model, PermutedMNIST(mnist, "
               f"{cfg['tasks']}, {job.seed}).train(t), iters={cfg['iters']}, batch_size={cfg['batch_size']}, lr={lr:g}, "
               f"generator=task_generator({job.seed}, t)); accuracy(quantize_model(model, precision)[0], "
               f"PermutedMNIST(mnist, {cfg['tasks']}, {job.seed}).test(t)) "
               f"[init_gen = Generator seeded task_generator({job.seed}, t).initial_seed() + 2**40]")
    for v in variants.values():
        v.update(train_seconds=train_seconds, command=command, settings=dict(optimizer="adam", lr=lr))
    return variants


# -- aggregation, table, plot -------------------------------------------------------------------------

def _std(xs: List[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def family_of(method: str) -> str:
    """The plot series of a method variant: e.g. supsup-lenet-topk-d0.05/entropy -> supsup-lenet-topk/entropy."""
    base, variant = method.split("/")
    if base.startswith("supsup-"):  # supsup-lenet-topk-d0.05 -> supsup-lenet-topk
        return "-".join(base.split("-")[:3]) + "/" + variant
    if base.startswith("mlp-"):
        return "mlp/" + variant
    if base.startswith("lora-"):
        return "lora/" + variant
    return base + "/" + variant


def point_label(method: str) -> str:
    base = method.split("/")[0]
    if base.startswith("supsup-"):
        return "thr" if base.endswith("threshold") else base.rsplit("-d", 1)[1]
    if base.startswith("mlp-w"):
        return base[len("mlp-"):]
    if base.startswith("lora-r"):
        return base[len("lora-"):]
    return ""


def aggregate(done: Dict[str, dict], jobs: List[Job]) -> Dict[str, dict]:
    methods: Dict[str, dict] = {}
    for job in jobs:
        entry = done.get(job.key)
        if entry is None:
            continue
        for name, v in entry["variants"].items():
            m = methods.setdefault(name, dict(family=family_of(name), label=point_label(name), kind=job.kind,
                                              per_seed={}, commands={}))
            m["per_seed"][str(job.seed)] = dict(accuracy=v["accuracy"], bytes_per_task=v["bytes_per_task"],
                                                train_seconds=v["train_seconds"])
            m["commands"][str(job.seed)] = v["command"]
            m["settings"] = v["settings"]
            if "unpadded_bytes_per_task" in v:
                m["unpadded_bytes_per_task"] = v["unpadded_bytes_per_task"]
    for m in methods.values():
        seeds = list(m["per_seed"].values())
        allacc = [a for s in seeds for a in s["accuracy"]]
        seed_means = [statistics.fmean(s["accuracy"]) for s in seeds]
        m.update(bytes_per_task=statistics.fmean(s["bytes_per_task"] for s in seeds),
                 accuracy_mean=statistics.fmean(allacc), accuracy_std=_std(allacc),
                 accuracy_std_over_seeds=_std(seed_means), n_seeds=len(seeds), n_values=len(allacc))
    return methods


def frozen_costs(models: List[str]) -> dict:
    """One-off cost of each frozen random network (SupSup's, and the adapters' LeNet)."""
    out = {}
    for name in sorted(set(models) | {"lenet"}):
        n = _n_weights(name, 10)
        out[name] = dict(frozen_bytes(_Buffers(n)), used_by=("SupSup masks, LoRA, BatchEnsemble" if name == "lenet"
                                                            else "SupSup masks"))
    return out


class _Buffers(torch.nn.Module):
    """n frozen weights, for frozen_bytes (no memory needed: a zero-stride view)."""

    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("w", torch.zeros(1).expand(n))


def print_table(methods: Dict[str, dict]) -> None:
    rows = sorted(methods.items(), key=lambda kv: (kv[1]["family"], kv[1]["bytes_per_task"]))
    print(f"\n{'method':<34} {'bytes/task':>12} {'accuracy':>9} {'std':>7} {'std(seeds)':>10} {'n':>3}")
    for name, m in rows:
        print(f"{name:<34} {m['bytes_per_task']:>12,.0f} {m['accuracy_mean']:>9.4f} {m['accuracy_std']:>7.4f} "
              f"{m['accuracy_std_over_seeds']:>10.4f} {m['n_values']:>3}")


STYLE = {  # family -> (label, colour, linestyle, marker, filled)
    "supsup-lenet-topk/entropy": ("SupSup LeNet top-k mask (density d), entropy-coded", "C0", "-", "s", True),
    "supsup-lenet-topk/packed": ("SupSup LeNet top-k mask, packed 1 bit/weight", "C0", "none", "s", False),
    "supsup-lenet-threshold/entropy": ("SupSup LeNet threshold mask, entropy-coded", "C0", "none", "*", True),
    "supsup-lenet-threshold/packed": ("SupSup LeNet threshold mask, packed", "C0", "none", "*", False),
    "supsup-fc1024-topk/entropy": ("SupSup FC1024 top-k mask (density d), entropy-coded", "C1", "-", "D", True),
    "supsup-fc1024-topk/packed": ("SupSup FC1024 top-k mask, packed 1 bit/weight", "C1", "none", "D", False),
    "supsup-fc1024-threshold/entropy": ("SupSup FC1024 threshold mask, entropy-coded", "C1", "none", "*", True),
    "supsup-fc1024-threshold/packed": ("SupSup FC1024 threshold mask, packed", "C1", "none", "*", False),
    "mlp/float32": ("small MLP 784-w-10, float32", "C2", "-", "o", True),
    "mlp/float16": ("small MLP, float16", "C2", "--", "o", False),
    "mlp/int8": ("small MLP, int8 (+ fp32 row scales, fp32 biases)", "C2", ":", "v", True),
    "lora/float32": ("LoRA rank r on frozen LeNet, float32", "C3", "-", "^", True),
    "lora/float16": ("LoRA, float16", "C3", "--", "^", False),
    "batchensemble/float32": ("BatchEnsemble rank-1 factors on frozen LeNet, float32", "C4", "none", "P", True),
    "batchensemble/float16": ("BatchEnsemble, float16", "C4", "none", "X", False),
}


def plot(methods: Dict[str, dict], cfg: dict, frozen: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12.5, 7))
    families: Dict[str, List[dict]] = {}
    for name, m in methods.items():
        families.setdefault(m["family"], []).append(m)
    for fam in sorted(families, key=lambda f: list(STYLE).index(f) if f in STYLE else len(STYLE)):
        pts = sorted(families[fam], key=lambda m: m["bytes_per_task"])
        label, colour, ls, marker, filled = STYLE.get(fam, (fam, "k", "-", ".", True))
        ax.errorbar([m["bytes_per_task"] for m in pts], [m["accuracy_mean"] for m in pts],
                    yerr=[m["accuracy_std_over_seeds"] for m in pts], color=colour, linestyle=ls, marker=marker,
                    markerfacecolor=colour if filled else "white", capsize=3, label=label, markersize=6)
        if fam.endswith(("topk/entropy", "/float32")):
            for m in pts:
                if m["label"]:
                    ax.annotate(m["label"], (m["bytes_per_task"], m["accuracy_mean"]), textcoords="offset points",
                                xytext=(4, -10), fontsize=7, color=colour)
    ax.set_xscale("log")
    ax.set_xlabel("bytes per task (log)")
    ax.set_ylabel(f"test accuracy (mean over {len(cfg['seeds'])} seeds × {cfg['tasks']} tasks; bars: std over seeds)")
    ax.set_title(f"Q3: PermutedMNIST storage per task, task identity given ({cfg['iters']} iters/task, "
                 f"data: {cfg['data']})", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    note = "One-off cost of the shared frozen random network (not per task):\n" + "\n".join(
        f"  {name}: {c['n_weights']:,} weights = {c['stored_float32'] / 1e6:.2f} MB float32 stored, "
        f"or {c['regenerated_from_seed']} B regenerated from its seed ({c['used_by']})" for name, c in frozen.items())
    fig.text(0.01, 0.01, note, fontsize=7, va="bottom", bbox=dict(boxstyle="round", facecolor="white", alpha=0.85))
    for name, c in frozen.items():
        ax.axvline(c["stored_float32"], color="grey", linestyle="-.", linewidth=0.8)
        ax.text(c["stored_float32"], ax.get_ylim()[1], f" {name} frozen net\n (fp32, once)", fontsize=7,
                va="top", color="grey")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout(rect=(0, 0.03 + 0.025 * len(frozen), 1, 1))
    atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


# -- main ---------------------------------------------------------------------------------------------

def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default="../shared/data/mnist",
                   help="MNIST IDX folder (default ../shared/data/mnist); the embedded subset if it does not exist")
    p.add_argument("--embedded", action="store_true", help="use the embedded MNIST subset (smoke runs)")
    p.add_argument("--tasks", type=int, help="PermutedMNIST tasks per seed (3; --quick 1)")
    p.add_argument("--seeds", type=int, nargs="+", help="(1 2 3; --quick 1)")
    p.add_argument("--iters", type=int, help="training steps per task, every method (1000; --quick 30)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--widths", type=int, nargs="+", help="small-MLP hidden widths (4 8 16 32 64 128 256)")
    p.add_argument("--ranks", type=int, nargs="+", help="LoRA ranks (1 2 4 8)")
    p.add_argument("--densities", type=float, nargs="+", help="SupSup top-k densities (0.02 0.05 0.1 0.25 0.5)")
    p.add_argument("--models", nargs="+", choices=("lenet", "fc1024"), help="SupSup networks (lenet fc1024)")
    p.add_argument("--lr-mlp", type=float, default=RECOMMENDED_LR["mlp"], help="Adam lr, small MLP")
    p.add_argument("--lr-lora", type=float, default=RECOMMENDED_LR["lora"], help="Adam lr, LoRA")
    p.add_argument("--lr-be", type=float, default=RECOMMENDED_LR["batchensemble"], help="Adam lr, BatchEnsemble")
    p.add_argument("--adapter-bias", action="store_true", help="adapters also train a per-task bias per layer")
    p.add_argument("--be-init", choices=("ones", "signs"), default="ones", help="BatchEnsemble factor init")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "questions")
    p.add_argument("--runs", type=Path, default=Path("runs/questions/q3"),
                   help="folder for the SupSup runs' folders and logs (mask files: keep it out of the repository's results)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 task, 1 seed, 30 iters, fewer sizes, LeNet only")
    p.add_argument("--resume", action="store_true", help="skip the (method, seed) entries already in the partial JSON")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    base = QUICK if a.quick else FULL
    cfg = {k: (getattr(a, k) if getattr(a, k) is not None else v) for k, v in base.items()}
    data_root = None if a.embedded else a.data_root
    if data_root is not None and not Path(data_root).is_dir():
        print(f"--data-root {data_root} does not exist: using the embedded MNIST subset", file=sys.stderr)
        data_root = None
    cfg.update(batch_size=a.batch_size, lr_mlp=a.lr_mlp, lr_lora=a.lr_lora, lr_be=a.lr_be, adapter_bias=a.adapter_bias,
               be_init=a.be_init, quick=a.quick, data_root=None if data_root is None else str(Path(data_root).resolve()))
    mnist = load_mnist(cfg["data_root"])
    cfg["data"] = mnist.source if data_root is None else "full MNIST"
    cfg["data_source"] = mnist.source  # as a run's results.json names it
    cfg["train_images"], cfg["test_images"] = len(mnist.train_labels), len(mnist.test_labels)

    out: Path = a.out
    partial_path, json_path, png_path = out / f"{NAME}.partial.json", out / f"{NAME}.json", out / f"{NAME}.png"
    done: Dict[str, dict] = {}
    if a.resume and partial_path.exists():
        saved = json.loads(partial_path.read_text())
        diff = [k for k in SIGNATURE if saved["config"].get(k) != cfg.get(k)]
        if diff:
            print(f"cannot resume {partial_path}: settings differ: "
                  + ", ".join(f"{k} ({saved['config'].get(k)!r} -> {cfg.get(k)!r})" for k in diff), file=sys.stderr)
            return 2
        done = saved["done"]
    elif partial_path.exists():
        print(f"{partial_path} exists: pass --resume to continue it (starting afresh overwrites it)", file=sys.stderr)

    jobs = jobs_for(cfg)
    todo = [j for j in jobs if j.key not in done]
    command = " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv)
    started = time.perf_counter()
    bar = tqdm(todo, desc=NAME, unit="run")
    for job in bar:
        bar.set_postfix_str(job.key)
        t0 = time.perf_counter()
        if job.kind == "supsup":
            variants = run_supsup(job, cfg, a.runs, a.resume)
        else:
            variants = run_pertask(job, cfg, mnist)
        done[job.key] = dict(variants=variants, seconds=time.perf_counter() - t0)
        write_json(partial_path, dict(config=cfg, done=done))
    bar.close()

    methods = aggregate(done, jobs)
    frozen = frozen_costs(cfg["models"])
    report = dict(
        question="Is a 1-bit-per-weight SupSup mask a cheaper way to store a PermutedMNIST task than a small "
                 "dense network of its own? (task identity given: GG)",
        config=cfg, command=command, machine=dict(machine_info(torch.device("cpu")), python=platform.python_version()), **stamp(),
        conventions=dict(
            supsup_packed="mask_bytes / tasks from results.json: 1 bit per weight, each row padded to 32-bit words "
                          "(unpadded_bytes_per_task = weights / 8)",
            supsup_entropy="mask_entropy_bytes / tasks: sum over layers of n * H(layer density) / 8",
            per_task_models="trainable parameters only: float32 4 B, float16 2 B each; int8: 1 B per entry of a "
                            ">=2-dim parameter + one float32 scale per output row, 1-dim parameters (biases) "
                            "kept float32 (supsup_fast/bench/pertask.py)",
            frozen_network="paid once, not per task: n_weights * 4 B stored float32, or 8 B (a seed) regenerated",
            accuracy="per-task test accuracy (SupSup: per_task_accuracy of the GG run); accuracy_std: sample std "
                     "over seeds x tasks; accuracy_std_over_seeds: sample std of the per-seed means (plot error bars)"),
        frozen_network=frozen, methods=methods,
        timing=dict(seconds_by_entry={k: v["seconds"] for k, v in done.items()},
                    this_invocation_seconds=time.perf_counter() - started),
        complete=all(j.key in done for j in jobs))
    write_json(json_path, report)
    plot(methods, cfg, frozen, png_path)
    print_table(methods)
    print(f"\nwrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
