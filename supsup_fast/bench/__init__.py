"""Benchmark helpers and the report behind ``supsup-fast bench``.

Every measurement is a ratio taken side by side in one process against the real alternative
(docs/design.md, Performance): the float-stack SupSup of the official code, the dense matmul on the
materialised masked weight, and the memory floor (packed bytes ÷ read bandwidth measured here and
now). Times are medians of several runs after a warm-up. ``benchmarks/`` scripts import from here.
"""
from .baselines import FloatStackMLP, ops_alpha_gradient, random_model_with_masks
from .graphs import GraphedCall
from .report import machine, plot_report, print_table, run_report
from .suites import (bench_alpha_gradient, bench_gnu_evaluation, bench_memory, bench_single_task_forward,
                     bench_training_step)
from .timing import interleaved_medians, median_time, read_bandwidth

__all__ = ["FloatStackMLP", "ops_alpha_gradient", "random_model_with_masks", "GraphedCall", "machine", "plot_report", "print_table",
           "run_report", "bench_alpha_gradient", "bench_gnu_evaluation", "bench_memory", "bench_single_task_forward",
           "bench_training_step", "interleaved_medians", "median_time", "read_bandwidth"]
