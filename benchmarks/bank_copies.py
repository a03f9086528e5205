"""The general-α ops of FC1024 s=500 read from the bank and from its copies, in one process (the ISA
is the one the process runs: cap it with SUPSUP_CPU_ISA=avx2 and torch's caps, as kernels2.py does).

    python benchmarks/bank_copies.py [--tasks 250 2500] [--repeats 7]

Per k, interleaved medians of:
- ``superpose`` of the three layers from the bank and given the weight-interleaved copies
  (``bank_w = ops.interleave_weights(bank, n)``), with the GB/s of bits each reads, and the time to
  build those copies;
- every task's output of the first layer for one image (``bank_linear``) from the bank and given its
  task-interleaved copy (``bank_t=``);
- the one-image α-gradient (``superposed_linear`` forward and backward, general α) from the bank,
  given the task-interleaved copies (``bank_t=``), and given both.
Prints a table; nothing is written. kernels2.py holds the issue's checks against their floors.
"""
from __future__ import annotations

import argparse
import time

import torch

import supsup_fast as ss
from supsup_fast import nn as snn
from supsup_fast.bench import interleaved_medians, ops_alpha_gradient, random_model_with_masks
from supsup_fast.ops.backends.cpu import cpu_isa


def measure(k: int, repeats: int) -> dict:
    model = random_model_with_masks("fc1024", 500, k)
    layers = list(snn.supermask_layers(model).values())
    x, alpha0 = torch.randn(1, 784), torch.rand(k) * (2.0 / k)
    bank_t = [l.bank.interleaved() for l in layers]
    start = time.perf_counter()
    bank_w = [ss.ops.interleave_weights(l.bank.words, l.n) for l in layers]
    build_s = time.perf_counter() - start
    packed = sum(l.bank.words.numel() * 4 for l in layers)

    def alpha_grad(use_t: bool, use_w: bool):
        return ops_alpha_gradient(layers, x, alpha0, bank_t if use_t else None, bank_w if use_w else None)

    t = interleaved_medians({
        "superpose": lambda: [ss.ops.superpose(l.bank.words, alpha0, l.n) for l in layers],
        "superpose_w": lambda: [ss.ops.superpose(l.bank.words, alpha0, l.n, c) for l, c in zip(layers, bank_w)],
        "bank_linear": lambda: ss.ops.bank_linear(x, layers[0].weight, layers[0].bank.words),
        "bank_linear_t": lambda: ss.ops.bank_linear(x, layers[0].weight, layers[0].bank.words, bank_t[0]),
        "grad": lambda: alpha_grad(False, False),
        "grad_t": lambda: alpha_grad(True, False),
        "grad_tw": lambda: alpha_grad(True, True),
    }, repeats=repeats)
    return dict(k=k, packed=packed, build_s=build_s, **t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, nargs="+", default=[250, 2500], help="numbers of tasks k")
    ap.add_argument("--repeats", type=int, default=7, help="samples per contender (medians)")
    args = ap.parse_args()
    if any(k < 1 for k in args.tasks) or args.repeats < 1:
        ap.error("--tasks and --repeats take positive integers")
    print(f"FC1024 s=500, kernels {cpu_isa()}, {torch.get_num_threads()} threads")
    for k in args.tasks:
        r = measure(k, args.repeats)
        gbs = lambda s: r["packed"] / s / 1e9
        print(f"k={k:5d}  superpose {r['superpose'] * 1e3:7.2f} ms ({gbs(r['superpose']):4.1f} GB/s) -> weight copy "
              f"{r['superpose_w'] * 1e3:7.2f} ms ({gbs(r['superpose_w']):4.1f} GB/s); copies built in {r['build_s']:.2f} s")
        print(f"         bank_linear, first layer, 1 image: bank {r['bank_linear'] * 1e3:7.2f} ms -> task copy "
              f"{r['bank_linear_t'] * 1e3:7.2f} ms")
        print(f"         α-gradient, 1 image: bank {r['grad'] * 1e3:7.2f} ms, task copy {r['grad_t'] * 1e3:7.2f} ms, "
              f"both copies {r['grad_tw'] * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
