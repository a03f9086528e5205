"""``supsup-fast``: run, demo, evaluate, bench."""
from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import sys
from pathlib import Path
from typing import Callable, List, Optional

DEMO = dict(scenario="GNu", benchmark="permuted-mnist", model="lenet", tasks=10, output_size=100, iters=1000,
            lr=1e-4, optimizer="rmsprop", inference="oneshot", objective="entropy")


def _add_run_flags(p: argparse.ArgumentParser, preset: Optional[dict] = None, default_out: str = "runs/run") -> None:
    from .runs.config import SETTINGS
    p.add_argument("--config", help="YAML preset (configs/*.yaml); flags override it")
    for setting in SETTINGS:  # one flag per run setting, typed and described where the setting is declared
        p.add_argument(setting.flag, **setting.argparse_kwargs(preset))
    p.add_argument("--out", default=None, help=f"output folder [default: {default_out}]")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out; settings that no flag or --config gives are the run's own "
                        "(OUT/config.json)")
    p.add_argument("--retrain-corrupt", action="store_true",
                   help="with --resume: delete and retrain the tasks whose checkpoint is corrupt instead of stopping "
                        "(GG, GNs and GNu runs, whose tasks have a checkpoint each; not NNs or --inference hopfield)")
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
    from .distributed import init_from_env
    ctx, device = init_from_env(config.device)
    return ctx, config.replace(device=device) if device != config.device else config


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


def _interrupted_run_settings(args: argparse.Namespace, out: Path, base: Optional[dict]) -> Optional[dict]:
    """The settings ``out/config.json`` recorded, as the base of a resumed run. A folder without
    one holds no run yet: started from the settings given (a job that always passes --resume), or
    refused where none is given (a mistyped --out would start a default run)."""
    from .runs.config import FIELDS
    from .runs.results import read_json
    path = out / "config.json"
    if not path.exists():
        if base is None and not getattr(args, "config", None) and all(getattr(args, k, None) is None for k in FIELDS):
            raise ValueError(f"--resume: {out} holds no run to resume (no config.json); check --out, or give the "
                             f"run's settings (or --config) to start it there")
        print(f"supsup-fast: {out} holds no run yet; starting it", file=sys.stderr)
        return base
    saved = read_json(path, "run config", remedy="it is not a config.json this package wrote; pass --out of a run")
    unknown = sorted(set(saved) - FIELDS)
    if unknown:
        raise ValueError(f"cannot resume {out}: its config.json holds settings this version does not know: {unknown}")
    return saved


def cmd_run(args, base: Optional[dict] = None, default_out: str = "runs/run") -> int:
    from .runs import NNsRun, driver_for, run_experiment
    if getattr(args, "retrain_corrupt", False) and not args.resume:
        raise ValueError("--retrain-corrupt applies to a resumed run: pass --resume with it")
    out = Path(args.out or default_out)
    if args.resume:
        base = _interrupted_run_settings(args, out, base)
    config = _config_from(args, base)
    driver = driver_for(config)
    rolling = getattr(driver, "ROLLING_CHECKPOINT", None)  # one checkpoint for every task (NNs, HopSupSup)
    if getattr(args, "retrain_corrupt", False) and rolling:
        name = "NNs" if driver is NNsRun else "HopSupSup"
        raise ValueError(f"--retrain-corrupt retrains the tasks of a run that keeps each in its own checkpoint (GG, GNs, GNu); "
                         f"{name} keeps all its tasks in one, "
                         f"{out}/checkpoints/{rolling}: delete it to retrain the run from its first task")
    ctx, config = _launch(config)
    results = _then_shutdown(ctx, lambda: run_experiment(config, out, resume=args.resume, progress=not args.no_progress,
                                                         ctx=ctx, retrain_corrupt=bool(getattr(args, "retrain_corrupt", False))))
    if ctx.is_main:
        print(_summary(results, out))
    return 0


def cmd_evaluate(args) -> int:
    from .runs import evaluate_run
    from .distributed import init_from_env
    overrides = {k: getattr(args, k) for k in ("scenario", "inference", "objective", "calibration", "infer_images", "log_base",
                                               "test_batch_size", "data_root", "download", "device", "backend", "shard_bank")
                 if getattr(args, k) is not None}
    out = Path(args.out or (Path(args.run) / default_evaluation_folder(overrides)))
    ctx, device = init_from_env(overrides.get("device", "cpu"))
    if ctx.enabled:
        overrides["device"] = device
    results = _then_shutdown(ctx, lambda: evaluate_run(args.run, overrides, out, progress=not args.no_progress, ctx=ctx))
    if ctx.is_main:
        print(_summary(results, out))
    return 0


def default_evaluation_folder(overrides: dict) -> str:
    """``eval-`` and the settings that change what is evaluated, so that evaluations under other
    settings do not overwrite each other: ``eval-GNs``, ``eval-superfluous-binary``, ``eval-same``."""
    parts = [str(overrides[k]) for k in ("scenario", "objective", "inference", "calibration") if k in overrides]
    parts += [f"{flag}{overrides[k]}" for k, flag in (("infer_images", "i"), ("log_base", "b"), ("test_batch_size", "t"))
              if k in overrides]
    if overrides.get("data_root"):  # other test data: a folder of its own (a short digest of the absolute path)
        root = os.path.abspath(os.path.expanduser(str(overrides["data_root"])))
        parts.append("data-" + hashlib.sha256(root.encode()).hexdigest()[:8])
    return "eval-" + ("-".join(parts) if parts else "same")


def cmd_bench(args) -> int:
    from .bench import run_report
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {args.out}: cannot make that folder ({exc.strerror or exc})") from None
    run_report(out, quick=args.quick, backend=args.backend, progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="supsup-fast", description="Supermasks in Superposition, fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train masks on a task sequence and evaluate them")
    _add_run_flags(run)
    demo = sub.add_parser("demo", help="GNu PermutedMNIST, LeNet s=100, 10 tasks, on the embedded MNIST subset")
    _add_run_flags(demo, DEMO, default_out="runs/demo")
    ev = sub.add_parser("evaluate", help="evaluate a finished run's masks under another scenario or objective")
    ev.add_argument("run", help="folder of a finished `supsup-fast run`")
    from .algorithms.evaluation import SCENARIOS
    ev.add_argument("--scenario", choices=SCENARIOS,
                    help="evaluate the masks under this scenario (every setting not given here is the run's own)")
    ev.add_argument("--inference", choices=("oneshot", "binary"), help="task inference (GNs/GNu)")
    ev.add_argument("--objective", choices=("entropy", "superfluous"), help="the objective whose α-gradient infers the task")
    from .algorithms.calibration import CALIBRATIONS  # torch is already loaded: the run flags above import it
    ev.add_argument("--calibration", choices=CALIBRATIONS,
                    help="divide each mask's α-gradient by the size of its logits (GNs/GNu; default none)")
    ev.add_argument("--infer-images", type=int, help="images of each test batch used to infer its task (at most --test-batch-size)")
    ev.add_argument("--log-base", type=float, help="binary inference keeps 1/log_base of the candidates per round (> 1)")
    ev.add_argument("--test-batch-size", type=int, help="images per test batch (task inference reads up to --infer-images of each)")
    ev.add_argument("--data-root", help="the test data (default: the run's own; other data is not checked against the run's)")
    ev.add_argument("--download", action="store_true", default=None, help="fetch MNIST into --data-root if it is not there")
    ev.add_argument("--device", help="torch device (default: the run's)")
    ev.add_argument("--backend", help="reference, cpu, triton, cuda or auto (default: the run's)")
    ev.add_argument("--shard-bank", action="store_true", default=None,
                    help="under torchrun: each rank loads and holds only its own range of tasks' bits")
    ev.add_argument("--out", help="folder for the evaluation's files (default: RUN/eval-<the settings given>, "
                                   "e.g. RUN/eval-GNs or RUN/eval-superfluous-binary); never the run's own folder")
    ev.add_argument("--no-progress", action="store_true")
    bench = sub.add_parser("bench", help="benchmark the ops against float-stack and dense baselines")
    bench.add_argument("--out", default="benchmarks/results",
                       help="folder for cpu-<backend>[-quick].{json,png} (default: benchmarks/results under the current folder)")
    bench.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    bench.add_argument("--backend", default="auto", help="backend to measure (reference, cpu, triton, cuda or auto)")
    bench.add_argument("--no-progress", action="store_true", help="no line on stderr as each suite starts and ends")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "out", None) == "":
            raise ValueError("--out must name a folder, got an empty string")
        if args.command == "run":
            return cmd_run(args)
        if args.command == "demo":
            return cmd_run(args, base=DEMO, default_out="runs/demo")
        if args.command == "evaluate":
            return cmd_evaluate(args)
        return cmd_bench(args)
    except (ValueError, TypeError, OSError, RuntimeError) as exc:  # OSError: a full disk, a read-only folder
        # Under torchrun every rank reports: say which, in one write so that lines do not run together.
        rank = f" (rank {os.environ['RANK']})" if "RANK" in os.environ and os.environ.get("WORLD_SIZE", "1") != "1" else ""
        sys.stderr.write(f"supsup-fast: error{rank}: {exc}\n")
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt:
        out = Path(args.out or f"runs/{'demo' if args.command == 'demo' else 'run'}")
        if args.command in ("run", "demo") and (out / "config.json").exists():
            flag = f" --out {shlex.quote(args.out)}" if args.out else ""
            print(f"supsup-fast: interrupted; finished tasks are saved, continue with "
                  f"`supsup-fast {args.command}{flag} --resume`", file=sys.stderr)
        else:
            print("supsup-fast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
