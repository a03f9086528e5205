"""Timing helpers: medians after a warm-up, interleaved medians of alternatives measured side by
side in one process, and the read bandwidth that sets the memory floor."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

import torch


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, min_seconds: float = 0.0) -> float:
    for _ in range(warmup):
        fn()
    times = []
    while len(times) < repeats or sum(times) < min_seconds:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if len(times) >= 50 * repeats:
            break
    return statistics.median(times)


def interleaved_medians(fns: Dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 1,
                        min_seconds: float = 0.0, calls_per_sample: int = 1) -> Dict[str, float]:
    """Median time of one call of each function, taking one sample of each in turn, so that a slow
    phase of a shared, noisy machine hits every contender alike. A sample times ``calls_per_sample``
    calls back to back (as a loop runs them, each call finding what the last one left in cache)."""
    if calls_per_sample < 1:
        raise ValueError(f"calls_per_sample must be >= 1, got {calls_per_sample}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    rounds = 0
    while rounds < repeats or sum(samples[next(iter(fns))]) < min_seconds:
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls_per_sample):
                fn()
            samples[name].append((time.perf_counter() - start) / calls_per_sample)
        rounds += 1
        if rounds >= 50 * repeats:
            break
    return {name: statistics.median(ts) for name, ts in samples.items()}


def read_bandwidth(nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Bytes per second of a streaming read (sum over a buffer far larger than the caches)."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    t = median_time(lambda: buf.sum(), repeats=repeats)
    return nbytes / t
