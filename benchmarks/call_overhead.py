"""What a batch-1 layer call costs beyond its kernel, in one process: dense ``F.linear`` on the
masked weight, the C++ op through the dispatcher (``torch.ops.supsup_cpu.masked_linear_small``) and
as the extension's plain function (``direct_masked_linear``, what ``ss.ops.masked_linear`` calls for
such a call), ``ss.ops.masked_linear`` (float W), ``ss.ops.signed_masked_linear``
(the weight as sign bits) and a signed-constant ``SupermaskLinear`` on one task, at a tiny layer
(where the Python around the kernel is most of the time) and at 1024 x 1024.

    python benchmarks/call_overhead.py [--sizes 32 1024] [--rounds 15]

Interleaved medians of loops of calls, without autograd. To compare two versions of the package,
run it alternately from each checkout (``PYTHONPATH=/path/to/other/checkout python ...``): the C++
kernels are the same build when csrc/ is unchanged. Prints a table; nothing is written.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import supsup_fast as ss
from supsup_fast.machine import host_record
from supsup_fast.ops.backends.cpu import cpu_isa, cpu_module, load_cpu_extension


def measure(n: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, n, generator=g)
    words = ss.pack_bits(torch.rand(n, n, generator=g) > 0.5)
    sign = ss.pack_bits(torch.rand(n, n, generator=g) > 0.5)
    dense_w = w * ss.unpack_bits(words, n)
    layer = ss.nn.SupermaskLinear(n, n)
    layer.append_packed(words)
    layer.set_mode_task(0)
    layer_w = layer.weight.detach() * ss.unpack_bits(words, n)
    x = torch.randn(1, n, generator=g)
    op = torch.ops.supsup_cpu.masked_linear_small
    direct = cpu_module().direct_masked_linear
    calls = {
        "dense F.linear": lambda: F.linear(x, dense_w),
        "C++ op (torch.ops)": lambda: op(x, w, words, None),
        "C++ op (direct function)": lambda: direct(x, w, words, None),
        "ss.ops.masked_linear": lambda: ss.ops.masked_linear(x, w, words),
        "ss.ops.signed_masked_linear": lambda: ss.ops.signed_masked_linear(x, sign, words, 0.05),
        "dense (layer's weight)": lambda: F.linear(x, layer_w),
        "SupermaskLinear, one task": lambda: layer(x),
    }
    per_loop = 200 if n >= 512 else 2000
    times = {name: [] for name in calls}
    with torch.no_grad():
        for f in calls.values():
            f()
        for _ in range(rounds):
            for name, f in calls.items():
                start = time.perf_counter()
                for _ in range(per_loop):
                    f()
                times[name].append((time.perf_counter() - start) / per_loop)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 1024], help="n of the n x n layers")
    p.add_argument("--rounds", type=int, default=15)
    a = p.parse_args()
    if a.rounds < 1 or any(n < 1 for n in a.sizes):
        raise SystemExit("--rounds and every --sizes value must be >= 1")
    load_cpu_extension()  # raises, saying why, where the C++ kernels cannot be built
    host = host_record()
    print(f"supsup_fast from {ss.__file__}; {host.get('cpu_model', 'CPU')} ({host.get('microarchitecture', '?')}), "
          f"kernels {cpu_isa()}, torch {host.get('torch_cpu_capability', '?')}, {torch.get_num_threads()} threads; "
          f"µs per call, median of {a.rounds} loops")
    for n in a.sizes:
        m = measure(n, a.rounds)
        print(f"\n{n} x {n}, batch 1")
        for name, t in m.items():
            print(f"  {name:30s} {t * 1e6:8.1f}")
        print(f"  masked_linear / dense: {m['dense F.linear'] / m['ss.ops.masked_linear']:.3f}x the speed;"
              f" the call adds {1e6 * (m['ss.ops.masked_linear'] - m['C++ op (direct function)']):.1f} µs to the direct function")


if __name__ == "__main__":
    main()
