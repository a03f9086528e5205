"""``supsup-fast``: run, demo, evaluate, bench."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, List, Optional

DEMO = dict(scenario="GNu", benchmark="permuted-mnist", model="lenet", tasks=10, output_size=100, iters=1000,
            lr=1e-4, optimizer="rmsprop", inference="oneshot", objective="entropy")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    from .algorithms.evaluation import SCENARIOS
    from .runs.config import INFERENCE_METHODS as METHODS
    from .algorithms.objectives import OBJECTIVES
    from .algorithms.training import OPTIMIZERS, SCHEDULERS
    from .data import BENCHMARKS
    from .models import MODELS

    p.add_argument("--config", help="YAML preset (configs/*.yaml); flags override it")
    p.add_argument("--scenario", choices=SCENARIOS)
    p.add_argument("--benchmark", choices=sorted(BENCHMARKS))
    p.add_argument("--model", choices=MODELS)
    p.add_argument("--tasks", type=int, help="number of tasks")
    p.add_argument("--output-size", type=int, help="output neurons s (>= labels; extras are superfluous neurons)")
    p.add_argument("--iters", type=int, help="training batches per task")
    p.add_argument("--epochs", type=int, help="cap on epochs per task")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="learning rate, finite and > 0 (1e-4; HopSupSup: 0.1)")
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.add_argument("--weight-decay", type=float, help="finite and >= 0 (0; HopSupSup: 1e-4)")
    p.add_argument("--scheduler", choices=SCHEDULERS)
    p.add_argument("--warmup-epochs", type=int, help="cosine_warmup: epochs of linear warmup (5)")
    p.add_argument("--image-size", type=int, help="split-imagenet: training/test crop size (224)")
    p.add_argument("--inference", choices=METHODS,
                   help="task inference: oneshot, binary, or hopfield (HopSupSup, with --model bnnet). With hopfield, "
                        "settings that neither a preset nor a flag gives take configs/hopsupsup_split_mnist.yaml's "
                        "training values: --optimizer sgd --lr 0.1 --weight-decay 1e-4 --scheduler cosine, "
                        "full epochs (--epochs 1, no --iters), --batch-size 128, --test-batch-size 64")
    p.add_argument("--objective", choices=OBJECTIVES)
    p.add_argument("--infer-images", type=int, help="images of each test batch used to infer its task (1; at most --test-batch-size)")
    p.add_argument("--test-batch-size", type=int, help="test batch size (128; HopSupSup recovery: 64)")
    p.add_argument("--log-base", type=float, help="binary inference keeps 1/log_base of the tasks per round (> 1; 2)")
    p.add_argument("--eval-at", type=int, nargs="*", help="also evaluate all learned tasks after these many tasks (each in [1, --tasks])")
    p.add_argument("--data-root", help="folder with the MNIST IDX files (default: the embedded subset)")
    p.add_argument("--download", action="store_true", default=None, help="download MNIST into --data-root first")
    p.add_argument("--seed", type=int)
    p.add_argument("--backend", help="reference, cpu, triton, cuda or auto")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--mask-fn", choices=("threshold", "topk"), help="threshold (GNu default) or edge-popup top-k")
    p.add_argument("--density", type=float, help="top-k: fraction of weights kept per layer, in (0, 1] (refused with the threshold mask function)")
    p.add_argument("--er-multiplier", type=float, help="top-k: Erdős–Rényi per-layer density with multiplier S")
    p.add_argument("--train-subset", type=int, help="train on the first N >= 1 images of each task (smoke runs)")
    p.add_argument("--transfer", action="store_true", default=None,
                   help="Transfer: start each task's scores from the running mean of the previous tasks' scores")
    p.add_argument("--mask-budget", type=int, help="NNs: most masks ever allocated (paper: 2500)")
    p.add_argument("--nns-epsilon", type=float, help="NNs: allocate a mask when K·max softmax(-∇αH) < 1 + ε (2^-3)")
    p.add_argument("--nns-check-every", type=int, help="NNs: training batches between allocation decisions (100)")
    p.add_argument("--nns-score-cache", type=int, help="NNs: masks whose float scores are kept for further training (4)")
    p.add_argument("--hop-gamma", type=float, help="HopSupSup: weight γ of the Hopfield energy in recovery (1.5e-3)")
    p.add_argument("--hop-recovery-lr", type=float, help="HopSupSup: SGD learning rate of the recovery (500)")
    p.add_argument("--hop-recovery-trials", type=int, help="HopSupSup: recoveries per task, each over another test-batch order (1)")
    p.add_argument("--parallel", choices=("auto", "task", "data"),
                   help="under torchrun: task (each rank trains whole tasks; GG/GNs/GNu) or data (DDP on one task; "
                        "NNs, Transfer, large models); auto picks task where the scenario allows it")
    p.add_argument("--shard-bank", action="store_true", default=None,
                   help="under torchrun: each rank holds only its own range of tasks' bits during evaluation")
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--retrain-corrupt", action="store_true",
                   help="with --resume: delete and retrain the tasks whose checkpoint is corrupt instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config_from(args: argparse.Namespace, base: Optional[dict] = None):
    from .runs.config import FIELDS, load_yaml, make_config
    preset = dict(base or {})
    if getattr(args, "config", None):
        preset.update(load_yaml(args.config))
    overrides = {k: v for k, v in vars(args).items() if k in FIELDS}
    return make_config(preset, overrides)


def _summary(results: dict, out: Path) -> str:
    ti = results["task_inference_accuracy"]
    lines = [f"average accuracy      {results['average_accuracy']:.4f} over {len(results['per_task_accuracy'])} tasks"]
    if "hopsupsup" in results:
        hop = results["hopsupsup"]
        lines += [f"recovered exactly     {sum(hop['recovered_exactly']) / len(hop['recovered_exactly']):.4f} of "
                  f"{len(hop['recovered_exactly']) * hop['recovery_trials']} recoveries "
                  f"({ti:.4f} of test batches classified with the true masks)",
                  f"steps to true mask    {hop['first_exact_step']}",
                  f"Hopfield storage      {results['hopfield_bytes'] / 1e6:.1f} MB (fixed, any number of tasks)"]
    else:
        lines += [f"task inference        {'n/a (GG)' if ti is None else f'{ti:.4f}'}",
                  f"masks                 {results['num_masks']} ({results['mask_bytes'] / 1e6:.3f} MB packed)"]
        if "nns" in results:
            lines.append(f"NNs                   mask per true task {results['nns']['mask_for_true_task']}, "
                         f"new masks per true task {results['nns']['new_masks_per_true_task']}")
    lines += [
              f"time                  train {results['timing']['train']:.1f} s, eval {results['timing']['eval']:.1f} s",
              f"outputs               {out}/results.json, per_task.csv, accuracy.png, "
              f"{'hopfield' if 'hopsupsup' in results else 'model'}.safetensors"]
    return "\n".join(lines)


def _launch(config):
    """The torch.distributed context of this process (torchrun sets WORLD_SIZE > 1) and the
    config with its device resolved (cuda:LOCAL_RANK under torchrun)."""
    import dataclasses

    from .distributed import init_from_env
    ctx, device = init_from_env(config.device)
    return ctx, dataclasses.replace(config, device=device) if device != config.device else config


def _then_shutdown(ctx, work: Callable[[], dict]) -> dict:
    """``work()``, then the process group torn down: after waiting for the peers when it finished,
    at once when it failed."""
    from .distributed import shutdown
    try:
        results = work()
    except BaseException:
        shutdown(ctx, wait_for_peers=False)
        raise
    shutdown(ctx)
    return results


def cmd_run(args, base: Optional[dict] = None, default_out: str = "runs/run") -> int:
    from .runs import run_experiment
    config = _config_from(args, base)
    out = Path(args.out or default_out)
    ctx, config = _launch(config)
    results = _then_shutdown(ctx, lambda: run_experiment(config, out, resume=args.resume, progress=not args.no_progress,
                                                         ctx=ctx, retrain_corrupt=bool(getattr(args, "retrain_corrupt", False))))
    if ctx.is_main:
        print(_summary(results, out))
    return 0


def cmd_evaluate(args) -> int:
    from .runs import evaluate_run
    from .distributed import init_from_env
    overrides = {k: getattr(args, k) for k in ("scenario", "inference", "objective", "infer_images", "log_base",
                                               "data_root", "device", "backend", "shard_bank") if getattr(args, k) is not None}
    out = Path(args.out or (Path(args.run) / f"eval-{overrides.get('scenario', 'same')}"))
    ctx, device = init_from_env(overrides.get("device", "cpu"))
    if ctx.enabled:
        overrides["device"] = device
    results = _then_shutdown(ctx, lambda: evaluate_run(args.run, overrides, out, progress=not args.no_progress, ctx=ctx))
    if ctx.is_main:
        print(_summary(results, out))
    return 0


def cmd_bench(args) -> int:
    from .bench import run_report
    run_report(Path(args.out), quick=args.quick, backend=args.backend)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="supsup-fast", description="Supermasks in Superposition, fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train masks on a task sequence and evaluate them")
    _add_run_flags(run)
    demo = sub.add_parser("demo", help="GNu PermutedMNIST, LeNet s=100, 10 tasks, on the embedded MNIST subset")
    _add_run_flags(demo)
    ev = sub.add_parser("evaluate", help="evaluate a finished run's masks under another scenario or objective")
    ev.add_argument("run", help="folder of a finished `supsup-fast run`")
    from .algorithms.evaluation import SCENARIOS
    ev.add_argument("--scenario", choices=SCENARIOS)
    ev.add_argument("--inference", choices=("oneshot", "binary"))
    ev.add_argument("--objective", choices=("entropy", "superfluous"))
    ev.add_argument("--infer-images", type=int)
    ev.add_argument("--log-base", type=float)
    ev.add_argument("--data-root")
    ev.add_argument("--device")
    ev.add_argument("--backend")
    ev.add_argument("--shard-bank", action="store_true", default=None,
                    help="under torchrun: each rank loads and holds only its own range of tasks' bits")
    ev.add_argument("--out")
    ev.add_argument("--no-progress", action="store_true")
    bench = sub.add_parser("bench", help="benchmark the ops against float-stack and dense baselines")
    bench.add_argument("--out", default="benchmarks/results")
    bench.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    bench.add_argument("--backend", default="auto", help="backend to measure (reference, cpu, auto)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "demo":
            return cmd_run(args, base=DEMO, default_out="runs/demo")
        if args.command == "evaluate":
            return cmd_evaluate(args)
        return cmd_bench(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        print(f"supsup-fast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("supsup-fast: interrupted; finished tasks are saved, continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
