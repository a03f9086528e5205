"""HopSupSup's storage rule: the official code's Storkey-style update, which supsup_fast follows,
against the paper's plain Hebbian rule Ψ = (1/d) Σ zzᵀ (§3.5, with and without its diagonal),
recovering the same stored masks over the same test-batch orders as the run did.

A finished HopSupSup run keeps the true masks in its checkpoint (to measure recovery); this
rebuilds each layer's matrix from them under each rule and repeats the run's recoveries:

    supsup-fast run --config configs/hopsupsup_split_mnist.yaml --data-root ../shared/data/mnist --out runs/hop
    python benchmarks/hopfield_rule.py --run runs/hop --data-root ../shared/data/mnist

The Storkey row reproduces the run's own results.json (a check of the script).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
from tqdm import tqdm

from supsup_fast.algorithms.hopsupsup import accuracy, mask_layers, recover_masks
from supsup_fast.bench.report import stamp
from supsup_fast.data import load_benchmark
from supsup_fast.models import build_model
from supsup_fast.runs.config import make_config
from supsup_fast.runs.maskfile import load_hopfield_checkpoint
from supsup_fast.runs.results import machine_info, write_json
from supsup_fast.runs.rundir import data_fingerprint, run_identity


def hebbian(patterns: torch.Tensor, diagonal: bool) -> torch.Tensor:
    """The paper's rule over ±1 patterns [T, d]: Ψ = (1/d) Σₜ zₜzₜᵀ."""
    psi = patterns.T @ patterns / patterns.shape[1]
    if not diagonal:
        psi.fill_diagonal_(0)
    return psi


def recover_all(model, tasks, settings, true, seed: int, trials: int, bar) -> dict:
    """The run's recoveries (runs/hopsupsup.py: the same generators) under the matrices now in the model."""
    exact, accs, first, errors = [], [], [], []
    for t in range(len(true)):
        test = tasks.test(t)
        for trial in range(trials):
            order = torch.Generator().manual_seed(20_000 * seed + 100 * t + trial)
            rec = recover_masks(model, test, settings, device=torch.device("cpu"), generator=order, true_masks=true[t])
            accs.append(accuracy(model, test, settings.test_batch_size, device=torch.device("cpu"),
                                 generator=torch.Generator().manual_seed(10_000 * seed + t)))
            exact.append(rec.bit_errors == 0)
            first.append(rec.first_exact_step)
            errors.append(int(rec.bit_errors))
            bar.update(1)
    return {"exact": sum(exact), "recoveries": len(exact), "average_accuracy": sum(accs) / len(accs),
            "bit_errors": errors, "first_exact_step": first}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="folder of a finished HopSupSup run (hopfield.safetensors)")
    p.add_argument("--data-root", help="the run's data (default: its own --data-root)")
    p.add_argument("--out", default="benchmarks/results/reproduction/hopfield-rule.json")
    args = p.parse_args(argv)
    run = Path(args.run)
    saved = json.loads((run / "config.json").read_text())
    cfg = make_config(saved, {"data_root": args.data_root} if args.data_root else {})
    if cfg.inference != "hopfield":
        raise SystemExit(f"{run} is not a HopSupSup run (--inference {cfg.inference})")
    tasks = load_benchmark(cfg.benchmark, cfg.tasks, cfg.seed, cfg.data_root, False)
    model = build_model(cfg.model, cfg.resolved_output_size(tasks.num_labels), seed=cfg.seed, init=cfg.init)
    # the run's own data and settings, checked as a --resume checks them
    identity = run_identity(cfg, data_fingerprint(tasks))
    _, true = load_hopfield_checkpoint(run / "hopfield.safetensors", model, identity)
    layers = mask_layers(model)
    trials = json.loads((run / "results.json").read_text())["hopsupsup"]["recovery_trials"]
    patterns = [torch.stack([true[t][i].float() * 2 - 1 for t in range(len(true))]) for i in range(len(layers))]
    rules: Dict[str, List[torch.Tensor]] = {
        "storkey (official code, supsup_fast)": [layer.hopfield.psi.clone() for layer in layers],
        "hebbian (paper)": [hebbian(z, diagonal=True) for z in patterns],
        "hebbian (paper), zero diagonal": [hebbian(z, diagonal=False) for z in patterns]}
    settings = cfg.hop_settings()
    results = {}
    with tqdm(total=len(rules) * len(true) * trials, desc="recoveries", unit="recovery") as bar:
        for name, psis in rules.items():
            for layer, psi in zip(layers, psis):
                layer.hopfield.psi.copy_(psi)
            results[name] = recover_all(model, tasks, settings, true, cfg.seed, trials, bar)
    density = [[round(float(true[t][i].float().mean()), 3) for t in range(len(true))] for i in range(len(layers))]
    record = {"rules": results, "mask_density_per_layer_and_task": density, "run": str(run), "config": cfg.to_dict(),
              "command": " ".join(["python", "benchmarks/hopfield_rule.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": dict(machine_info(torch.device("cpu")), python=platform.python_version()), **stamp()}
    write_json(Path(args.out), record)
    for name, r in results.items():
        print(f"{name:32s} exact {r['exact']}/{r['recoveries']}  average accuracy {r['average_accuracy']:.4f}  "
              f"wrong bits of the misses {[e for e in r['bit_errors'] if e]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
