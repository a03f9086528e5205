"""One continual-learning run: train a mask per task, evaluate under the scenario, write outputs.

Layout of ``out``: ``config.json``; ``checkpoints/task_NNNNN.safetensors`` (one verified mask file
per finished task, written atomically: an interrupted run resumes without retraining them);
``progress.json`` (evaluation rows done so far); at the end ``results.json``, ``per_task.csv``,
``accuracy.png`` and ``model.safetensors`` (all tasks in one file).
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import torch
from tqdm.auto import tqdm

from .. import storage
from ..config import RunConfig
from ..data import load_benchmark
from ..data.tasks import TaskSplit
from ..models import build_model
from ..nn import bn_bytes, enable_transfer, mask_bytes, mask_entropy_bytes, num_tasks, transfer_init_scores
from ..ops.registry import backend_for, use_backend
from .evaluation import EvalSettings, evaluate_task
from .metrics import average, cl_metrics
from .nns import AllocatorState, MaskAllocator
from .training import TrainSettings, train_task


class RunDirError(ValueError):
    """The output folder holds another run, or a run that cannot be resumed with this config."""


def _write_json(path: Path, data: dict) -> None:
    def writer(tmp):
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2)
    storage.atomic_write_bytes(path, writer)


def _subset(split: TaskSplit, n: Optional[int]) -> TaskSplit:
    if n is None or n >= len(split):
        return split
    return split.head(n)


def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class Experiment:
    """The data, model and settings of one run. ``model`` defaults to a fresh network."""

    def __init__(self, config: RunConfig, out: Union[str, Path], resume: bool = False, progress: bool = True,
                 model: Optional[torch.nn.Module] = None):
        self.config, self.out, self.resume, self.progress = config, Path(out), resume, progress
        self.ckpt_dir = self.out / "checkpoints"
        self.device = torch.device(config.device)
        self.tasks = load_benchmark(config.benchmark, config.tasks, config.seed, config.data_root, config.download,
                                    image_size=config.image_size)
        self.output_size = config.resolved_output_size(self.tasks.num_labels)
        if model is None:
            model = build_model(config.model, self.output_size, seed=config.seed, init=config.init,
                                mask_fn=config.mask_fn, density=config.density,
                                er_multiplier=config.er_multiplier, input_size=784, in_channels=3)
        self.model = model.to(self.device)
        if config.transfer:
            enable_transfer(self.model)
        self.train_settings = TrainSettings(iters=config.iters, epochs=config.epochs, batch_size=config.batch_size,
                                            lr=config.lr, optimizer=config.optimizer,
                                            weight_decay=config.weight_decay, scheduler=config.scheduler,
                                            warmup_epochs=config.warmup_epochs)
        self.eval_settings = EvalSettings(scenario=config.scenario, inference=config.inference,
                                          objective=config.objective, infer_images=config.infer_images,
                                          batch_size=config.test_batch_size, log_base=config.log_base)

    def prepare_out_dir(self) -> None:
        cfg_path = self.out / "config.json"
        if cfg_path.exists():
            if not self.resume:
                raise RunDirError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
            saved = json.loads(cfg_path.read_text())
            now = self.config.to_dict()
            diff = sorted(k for k in set(saved) | set(now)
                          if saved.get(k) != now.get(k) and k not in RunConfig.RESUMABLE_CHANGES)
            if diff:
                raise RunDirError(f"cannot resume {self.out}: settings differ from the interrupted run: "
                                  + ", ".join(f"{k} ({saved.get(k)!r} -> {now.get(k)!r})" for k in diff))
        self.out.mkdir(parents=True, exist_ok=True)
        _write_json(cfg_path, self.config.to_dict())

    def _task_file(self, t: int) -> Path:
        return self.ckpt_dir / f"task_{t:05d}.safetensors"

    def _expected_mask(self, t: int) -> Optional[int]:
        """Under NNs the mask that task inference should pick for true task t; else t."""
        if self.config.scenario != "NNs":
            return t
        m = self.nns_state.mask_for_task(t)
        return -1 if m is None else m

    def _evaluate_all(self, k: int, bar_desc: str) -> dict:
        start = time.perf_counter()
        accs, inferred = [], []
        total = sum(self.tasks.test(t).num_batches(self.config.test_batch_size) for t in range(k)) if self.progress else 0
        bar = tqdm(total=total, desc=bar_desc, unit="batch", leave=False, disable=not self.progress)
        for t in range(k):
            res = evaluate_task(self.model, self.tasks.test(t), t, self.eval_settings, device=self.device,
                                num_labels=self.tasks.num_labels, seed=self.config.seed, on_batch=bar.update,
                                expected=self._expected_mask(t))
            accs.append(res.accuracy)
            inferred.append(res.inferred_correctly)
        bar.close()
        gg = self.config.scenario == "GG"
        return {"tasks_learned": k, "accuracy": accs, "task_inference": None if gg else inferred,
                "average_accuracy": average(accs), "task_inference_accuracy": None if gg else average(inferred),
                "seconds": time.perf_counter() - start}

    def run(self) -> dict:
        if self.config.scenario == "NNs":
            return self._run_nns()
        if self.config.inference == "hopfield":
            from .hopsupsup_run import run_hopsupsup
            return run_hopsupsup(self)
        cfg = self.config
        self.prepare_out_dir()
        with use_backend(cfg.backend):
            backend_name = backend_for(self.device).name
            progress_path = self.out / "progress.json"
            state = json.loads(progress_path.read_text()) if (self.resume and progress_path.exists()) else {"rows": []}
            after, train_seconds = [], 0.0
            eval_points = sorted({k for k in cfg.eval_at if 1 <= k < cfg.tasks} | {cfg.tasks})
            resumed = 0
            task_bar = tqdm(range(cfg.tasks), desc=f"{cfg.scenario} {cfg.benchmark}", unit="task", disable=not self.progress)
            for t in task_bar:
                path = self._task_file(t)
                if self.resume and path.exists():
                    extra = storage.load_masks(self.model, path)
                    after.append(extra["accuracy_after_training"])
                    train_seconds += extra["train_seconds"]
                    resumed += 1
                    continue
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + t)
                split = _subset(self.tasks.train(t), cfg.train_subset)
                steps = cfg.iters if cfg.iters is not None else cfg.epochs * split.num_batches(cfg.batch_size)
                step_bar = tqdm(total=steps, desc=f"task {t}", unit="it", leave=False, disable=not self.progress)
                start = time.perf_counter()
                init = transfer_init_scores(self.model) if cfg.transfer else None
                train_task(self.model, split, self.train_settings, device=self.device, generator=gen, init_scores=init,
                           on_step=lambda s, loss: (step_bar.update(1), step_bar.set_postfix(loss=f"{loss:.3f}")) if s % 10 == 0 or s == steps else None)
                seconds = time.perf_counter() - start
                step_bar.close()
                own = evaluate_task(self.model, self.tasks.test(t), t, EvalSettings(scenario="GG", batch_size=cfg.test_batch_size),
                                    device=self.device, num_labels=self.tasks.num_labels, seed=cfg.seed)
                after.append(own.accuracy)
                train_seconds += seconds
                storage.save_masks(self.model, path, t, t + 1,
                                   extra={"accuracy_after_training": own.accuracy, "train_seconds": seconds})
                task_bar.set_postfix(acc=f"{own.accuracy:.4f}")
                k = t + 1
                if k in eval_points and not any(r["tasks_learned"] == k for r in state["rows"]):
                    state["rows"].append(self._evaluate_all(k, f"eval {k} tasks"))
                    _write_json(progress_path, state)
            for k in eval_points:  # rows due at tasks that were restored from checkpoints
                if not any(r["tasks_learned"] == k for r in state["rows"]):
                    state["rows"].append(self._evaluate_all(k, f"eval {k} tasks"))
                    _write_json(progress_path, state)
            task_bar.close()
        results = self._results(after, state["rows"], train_seconds, resumed, backend_name)
        self._write_outputs(results)
        return results

    def _run_nns(self) -> dict:
        """NNs: the model never sees the task index; masks are allocated by the rule of
        :mod:`.nns`. One checkpoint (all masks + allocator log) after each true task."""
        cfg = self.config
        self.prepare_out_dir()
        ckpt = self.ckpt_dir / "nns_latest.safetensors"
        done, after, train_seconds, state = 0, [], 0.0, None
        if self.resume and ckpt.exists():
            extra = storage.load_masks(self.model, ckpt)
            done, after, train_seconds = extra["true_tasks_done"], extra["accuracy_after_training"], extra["train_seconds"]
            state = AllocatorState.from_dict(extra["allocator"])
        allocator = MaskAllocator(self.model, cfg.nns_settings(), cfg.seed, state)
        self.nns_state = allocator.state
        with use_backend(cfg.backend):
            backend_name = backend_for(self.device).name
            progress_path = self.out / "progress.json"
            rows = json.loads(progress_path.read_text())["rows"] if (self.resume and progress_path.exists()) else []
            eval_points = sorted({k for k in cfg.eval_at if 1 <= k < cfg.tasks} | {cfg.tasks})
            task_bar = tqdm(range(cfg.tasks), desc=f"NNs {cfg.benchmark}", unit="true task", disable=not self.progress)
            task_bar.update(done)
            for t in range(done, cfg.tasks):
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + t)
                split = _subset(self.tasks.train(t), cfg.train_subset)
                steps = cfg.iters if cfg.iters is not None else cfg.epochs * split.num_batches(cfg.batch_size)
                step_bar = tqdm(total=steps, desc=f"true task {t}", unit="it", leave=False, disable=not self.progress)
                start = time.perf_counter()
                allocator.train_true_task(t, split, self.train_settings, device=self.device, generator=gen,
                                          on_step=lambda s, loss: step_bar.update(1))
                train_seconds += time.perf_counter() - start
                step_bar.close()
                trained = allocator.state.mask_for_task(t) is not None  # False only past the mask budget
                own = evaluate_task(self.model, self.tasks.test(t), t,
                                    EvalSettings(scenario="GG" if trained else "NNs", batch_size=cfg.test_batch_size),
                                    device=self.device, num_labels=self.tasks.num_labels, seed=cfg.seed,
                                    expected=self._expected_mask(t))
                after.append(own.accuracy)
                storage.save_model(self.model, ckpt, extra={
                    "true_tasks_done": t + 1, "accuracy_after_training": after, "train_seconds": train_seconds,
                    "allocator": allocator.state.to_dict()})
                task_bar.update(1)
                task_bar.set_postfix(masks=num_tasks(self.model), acc=f"{own.accuracy:.4f}")
                if t + 1 in eval_points and not any(r["tasks_learned"] == t + 1 for r in rows):
                    rows.append(self._evaluate_all(t + 1, f"eval {t + 1} true tasks"))
                    _write_json(progress_path, {"rows": rows})
            allocator.finish()
            for k in eval_points:
                if not any(r["tasks_learned"] == k for r in rows):
                    rows.append(self._evaluate_all(k, f"eval {k} true tasks"))
                    _write_json(progress_path, {"rows": rows})
            task_bar.close()
        results = self._results(after, rows, train_seconds, done, backend_name)
        self._write_outputs(results)
        return results

    def _results(self, after: List[float], rows: List[dict], train_seconds: float, resumed: int, backend_name: str) -> dict:
        cfg = self.config
        rows = sorted(rows, key=lambda r: r["tasks_learned"])
        final = rows[-1]
        history = [r["accuracy"] for r in rows[:-1]]
        results = {
            "average_accuracy": final["average_accuracy"],
            "per_task_accuracy": final["accuracy"],
            "task_inference_accuracy": final["task_inference_accuracy"],
            "per_task_inference_accuracy": final["task_inference"],
            "accuracy_after_training": after,
            "accuracy_matrix": rows,
            **cl_metrics(after, final["accuracy"], history),
            "num_masks": num_tasks(self.model),
            "mask_bytes": mask_bytes(self.model),
            "mask_entropy_bytes": mask_entropy_bytes(self.model),
            "bn_bytes": bn_bytes(self.model),
            "output_size": self.output_size,
            "num_labels": self.tasks.num_labels,
            "timing": {"train": train_seconds, "eval": final["seconds"],
                       "eval_by_tasks_learned": {str(r["tasks_learned"]): r["seconds"] for r in rows},
                       "tasks_resumed": resumed},
            "backend": backend_name,
            "machine": machine_info(self.device),
            "data": self.tasks.source,
            "config": cfg.to_dict(),
        }
        if cfg.scenario == "NNs":
            state = self.nns_state
            results["nns"] = {"mask_for_true_task": [state.mask_for_task(t) for t in range(len(after))],
                              "new_masks_per_true_task": [sum(d.new and d.mask is not None for d in state.decisions
                                                              if d.true_task == t) for t in range(len(after))],
                              **state.to_dict()}
        return results

    def _write_outputs(self, results: dict) -> None:
        from ..report import write_csv, write_plot
        extra = {"accuracy_after_training": results["accuracy_after_training"]}
        if "nns" in results:
            extra["allocator"] = {k: results["nns"][k] for k in ("decisions", "batches_per_mask")}
        storage.save_model(self.model, self.out / "model.safetensors", extra=extra)
        _write_json(self.out / "results.json", results)
        write_csv(results, self.out / "per_task.csv")
        write_plot(results, self.out / "accuracy.png")


def run_experiment(config: RunConfig, out: Union[str, Path], resume: bool = False, progress: bool = True) -> dict:
    return Experiment(config, out, resume, progress).run()


def evaluate_run(run_dir: Union[str, Path], overrides: dict, out: Union[str, Path], progress: bool = True) -> dict:
    """Re-evaluate a finished run's masks (its model.safetensors) under other evaluation settings,
    e.g. the masks of a GNu run under GG or GNs. Training settings stay those of the run."""
    run_dir = Path(run_dir)
    cfg_path, model_path = run_dir / "config.json", run_dir / "model.safetensors"
    if not cfg_path.is_file() or not model_path.is_file():
        raise RunDirError(f"{run_dir} is not a finished run (needs config.json and model.safetensors)")
    values = json.loads(cfg_path.read_text())
    values.update(overrides)
    values["download"] = False
    config = RunConfig(**values).validate()
    tensors, meta = storage.read_mask_file(model_path)
    extra = json.loads(meta["extra"])
    after = extra["accuracy_after_training"]
    exp = Experiment(config, out, progress=progress, model=storage.load_model(model_path))
    if config.scenario == "NNs":
        if "allocator" not in extra:
            raise RunDirError(f"--scenario NNs needs the masks of an NNs run; {run_dir} was trained as {values['scenario']}")
        exp.nns_state = AllocatorState.from_dict(extra["allocator"])
    Path(out).mkdir(parents=True, exist_ok=True)
    _write_json(Path(out) / "config.json", config.to_dict())
    with use_backend(config.backend):
        backend_name = backend_for(exp.device).name
        # NNs: the true tasks seen (one accuracy-after-training each), not the masks allocated.
        learned = len(after) if config.scenario == "NNs" else num_tasks(exp.model)
        row = exp._evaluate_all(learned, "evaluate")
    results = exp._results(after, [row], 0.0, 0, backend_name)
    results["evaluated_from"] = str(run_dir)
    exp._write_outputs(results)
    return results
