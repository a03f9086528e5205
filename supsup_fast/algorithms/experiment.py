"""One continual-learning run: train a mask per task, evaluate under the scenario, write outputs.

Layout of ``out``: ``config.json``; ``checkpoints/task_NNNNN.safetensors`` (one verified mask file
per finished task, written atomically: an interrupted run resumes without retraining them);
``progress.json`` (evaluation rows done so far); at the end ``results.json``, ``per_task.csv``,
``accuracy.png`` and ``model.safetensors`` (all tasks in one file).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import torch
from tqdm.auto import tqdm

from .. import storage
from ..config import RunConfig
from ..data import load_benchmark
from ..models import build_model
from ..distributed import (SINGLE, DistContext, SharedCounter, TaskQueue, barrier, broadcast_object, gather_objects,
                           shard_range)
from ..nn import (bn_bytes, enable_transfer, mask_bytes, mask_entropy_bytes, num_tasks, task_modules,
                  transfer_init_scores)
from ..ops.registry import backend_for, use_backend
from .data_parallel import train_task_data_parallel
from .evaluation import EvalSettings, evaluate_task
from .rundir import (RunDirError, RunLock, check_identity, check_writable, data_fingerprint, machine_info, masks_digest,
                     read_json, run_identity, train_subset, write_json)
from .sharded import ShardedModel, evaluate_task_sharded
from .metrics import average, cl_metrics
from .nns import AllocatorState, MaskAllocator
from .training import TrainSettings, train_task


def parallel_mode(config: RunConfig, ctx: DistContext) -> str:
    """"single" (one process), "task" (each rank trains whole tasks) or "data" (DDP on one task)."""
    if not ctx.enabled:
        return "single"
    sequential = config.scenario == "NNs" or config.transfer
    if config.inference == "hopfield":
        raise ValueError("HopSupSup (--inference hopfield) runs in one process; launch it without torchrun")
    if config.parallel == "task" and sequential:
        what = "NNs" if config.scenario == "NNs" else "--transfer"
        raise ValueError(f"--parallel task cannot run {what}: each task depends on the ones before it; "
                         f"use --parallel data (the default for it under torchrun)")
    if config.parallel == "auto":
        return "data" if sequential else "task"
    return config.parallel


class Experiment:
    """The data, model and settings of one run. ``model`` defaults to a fresh network. ``ctx`` is
    the torch.distributed context (one process by default)."""

    def __init__(self, config: RunConfig, out: Union[str, Path], resume: bool = False, progress: bool = True,
                 model: Optional[torch.nn.Module] = None, ctx: DistContext = SINGLE, retrain_corrupt: bool = False):
        self.config, self.out, self.resume, self.ctx = config, Path(out), resume, ctx
        self.progress, self.retrain_corrupt = progress and ctx.is_main, retrain_corrupt
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"--device {config.device}: this torch ({torch.__version__}) sees no CUDA GPU; "
                               f"use --device cpu or install a CUDA build of torch")
        check_writable(self.out)
        self.parallel = parallel_mode(config, ctx)
        self.ckpt_dir = self.out / "checkpoints"
        self.device = torch.device(config.device)
        self.tasks = load_benchmark(config.benchmark, config.tasks, config.seed, config.data_root, config.download,
                                    image_size=config.image_size)
        self.output_size = config.resolved_output_size(self.tasks.num_labels)
        self.data_sha256 = data_fingerprint(self.tasks)
        if model is None:
            model = self._fresh_model()
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
        self.lock: Optional[RunLock] = None
        self.bank_bytes_per_rank: Optional[List[int]] = None

    def _fresh_model(self) -> torch.nn.Module:
        c = self.config
        return build_model(c.model, self.output_size, seed=c.seed, init=c.init, mask_fn=c.mask_fn, density=c.density,
                           er_multiplier=c.er_multiplier, input_size=784, in_channels=3)

    def identity(self, task: Optional[int] = None) -> dict:
        return run_identity(self.config, self.data_sha256, task)

    # -- the run folder (rank 0 owns it; the other ranks learn its verdict) -------------------
    def _on_main(self, fn: Callable[[], object]):
        """Run ``fn`` on rank 0 and give every rank its result, or its error."""
        value = error = None
        if self.ctx.is_main:
            try:
                value = fn()
            except (ValueError, RuntimeError, OSError) as exc:
                error = exc
        if not self.ctx.enabled:
            if error is not None:
                raise error
            return value
        shared = broadcast_object(self.ctx, (None if error is None else str(error), value))
        if error is not None:
            raise error
        if shared[0] is not None:
            raise RunDirError(shared[0])
        return shared[1]

    def prepare_out_dir(self) -> None:
        self._on_main(self._prepare_out_dir)

    def _prepare_out_dir(self) -> None:
        cfg_path = self.out / "config.json"
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock = RunLock(self.out).acquire()
        try:
            if cfg_path.exists():
                if not self.resume:
                    raise RunDirError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
                saved = read_json(cfg_path, "run config")
                now = self.config.to_dict()
                diff = sorted(k for k in set(saved) | set(now)
                              if saved.get(k) != now.get(k) and k not in RunConfig.RESUMABLE_CHANGES)
                if diff:
                    raise RunDirError(f"cannot resume {self.out}: settings differ from the interrupted run: "
                                      + ", ".join(f"{k} ({saved.get(k)!r} -> {now.get(k)!r})" for k in diff))
            write_json(cfg_path, self.config.to_dict())
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _task_file(self, t: int) -> Path:
        return self.ckpt_dir / f"task_{t:05d}.safetensors"

    def _expected_mask(self, t: int) -> Optional[int]:
        """Under NNs the mask that task inference should pick for true task t; else t."""
        if self.config.scenario != "NNs":
            return t
        m = self.nns_state.mask_for_task(t)
        return -1 if m is None else m

    def _load_task(self, model: torch.nn.Module, t: int, first_task: Optional[int] = None) -> tuple:
        """Append checkpoint t to ``model`` after checking it belongs to this run: (extra, checksum)."""
        path = self._task_file(t)
        tensors, meta = storage.read_mask_file(path)
        check_identity(path, storage.parse_metadata(path, meta)[4], self.identity(t))
        extra = storage.apply_mask_file(model, path, tensors, meta, first_task)
        return extra, meta["checksum"]

    def _scan(self, lo: int, hi: int) -> List[int]:
        """Tasks in [lo, hi) without a usable checkpoint. A corrupt one is refused with the file
        named, or deleted for retraining under --retrain-corrupt; one from another run is refused."""
        todo = []
        for t in range(lo, hi):
            path = self._task_file(t)
            if not (self.resume and path.exists()):
                todo.append(t)
                continue
            try:
                _, meta = storage.read_mask_file(path)
            except storage.MaskFileError as exc:
                if not self.retrain_corrupt:
                    raise RunDirError(f"checkpoint of task {t} is unusable: {exc}. Delete {path} or pass "
                                      f"--retrain-corrupt to retrain that task") from exc
                path.unlink()
                todo.append(t)
                continue
            check_identity(path, storage.parse_metadata(path, meta)[4], self.identity(t))
        return todo

    def _train_and_save(self, t: int, row: int) -> None:
        """Train task t (the model's bank holds ``row`` tasks before it) and write its checkpoint.
        Task t's randomness derives from (seed, t) alone, so its mask is the same bits whichever
        rank trains it, at any world size."""
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + t)
        split = train_subset(self.tasks.train(t), cfg.train_subset)
        steps = cfg.iters if cfg.iters is not None else cfg.epochs * split.num_batches(cfg.batch_size)
        show = self.progress and self.parallel != "task"
        step_bar = tqdm(total=steps, desc=f"task {t}", unit="it", leave=False, disable=not show)
        on_step = lambda s, loss: (step_bar.update(1), step_bar.set_postfix(loss=f"{loss:.3f}")) if s % 10 == 0 or s == steps else None
        start = time.perf_counter()
        init = transfer_init_scores(self.model) if cfg.transfer else None
        if self.parallel == "data":
            train_task_data_parallel(self.model, split, self.train_settings, self.ctx, device=self.device,
                                     generator=gen, init_scores=init, on_step=on_step)
        else:
            train_task(self.model, split, self.train_settings, device=self.device, generator=gen,
                       init_scores=init, on_step=on_step)
        seconds = time.perf_counter() - start
        step_bar.close()
        own = evaluate_task(self.model, self.tasks.test(t), t, EvalSettings(scenario="GG", batch_size=cfg.test_batch_size),
                            device=self.device, num_labels=self.tasks.num_labels, seed=cfg.seed, expected=row)
        if self.ctx.is_main or self.parallel == "task":
            storage.save_masks(self.model, self._task_file(t), row, row + 1, label=t,
                               extra={"accuracy_after_training": own.accuracy, "train_seconds": seconds,
                                      "run_identity": self.identity(t)})

    def _evaluate_all(self, k: int, bar_desc: str) -> dict:
        """Evaluate tasks [0, k). Under torchrun the tasks are spread over the ranks (or, with
        --shard-bank, every rank holds a range of the masks and all evaluate each query together);
        the rows are gathered on every rank and equal the single-process ones."""
        start = time.perf_counter()
        if self.config.shard_bank and self.config.scenario != "NNs":
            per_task = self._evaluate_sharded(k, bar_desc)
        else:
            mine = [t for t in range(k) if t % self.ctx.world_size == self.ctx.rank]
            total = sum(self.tasks.test(t).num_batches(self.config.test_batch_size) for t in mine) if self.progress else 0
            bar = tqdm(total=total, desc=bar_desc, unit="batch", leave=False, disable=not self.progress)
            local = {}
            for t in mine:
                res = evaluate_task(self.model, self.tasks.test(t), t, self.eval_settings, device=self.device,
                                    num_labels=self.tasks.num_labels, seed=self.config.seed, on_batch=bar.update,
                                    expected=self._expected_mask(t))
                local[t] = (res.accuracy, res.inferred_correctly, res.batches)
            bar.close()
            per_task = {t: r for part in gather_objects(self.ctx, local) for t, r in part.items()}
        accs = [per_task[t][0] for t in range(k)]
        inferred = [per_task[t][1] for t in range(k)]
        gg = self.config.scenario == "GG"
        return {"tasks_learned": k, "accuracy": accs, "task_inference": None if gg else inferred,
                "average_accuracy": average(accs), "task_inference_accuracy": None if gg else average(inferred),
                "queries": sum(per_task[t][2] for t in range(k)), "seconds": time.perf_counter() - start}

    def _evaluate_sharded(self, k: int, bar_desc: str) -> Dict[int, tuple]:
        if k < self.ctx.world_size:
            raise ValueError(f"--shard-bank needs at least one task per rank: {k} tasks on {self.ctx.world_size} ranks")
        own = shard_range(k, self.ctx)
        model = self._fresh_model().to(self.device)
        for t in own:  # only this rank's range is ever read
            self._load_task(model, t, first_task=t)
        sharded = ShardedModel(model, self.ctx, own.start, k)
        self.bank_bytes_per_rank = [int(b) for b in gather_objects(self.ctx, mask_bytes(model))]
        total = sum(self.tasks.test(t).num_batches(self.config.test_batch_size) for t in range(k)) if self.progress else 0
        bar = tqdm(total=total, desc=bar_desc + " (sharded)", unit="batch", leave=False, disable=not self.progress)
        out = {}
        for t in range(k):
            res = evaluate_task_sharded(sharded, self.tasks.test(t), t, self.eval_settings, device=self.device,
                                        num_labels=self.tasks.num_labels, seed=self.config.seed, on_batch=bar.update)
            out[t] = (res.accuracy, res.inferred_correctly, res.batches)
        bar.close()
        return out

    def run(self) -> dict:
        if self.config.scenario == "NNs":
            return self._run_nns()
        if self.config.inference == "hopfield":
            from .hopsupsup_run import run_hopsupsup
            try:
                return run_hopsupsup(self)
            finally:
                self.release()
        self.prepare_out_dir()
        try:
            with use_backend(self.config.backend):
                return self._run_tasks()
        finally:
            self.release()

    def _run_tasks(self) -> dict:
        """GG, GNs, GNu: one mask per task. The tasks are cut into segments at the evaluation
        points; within a segment the ranks pull tasks from a shared queue (task-parallel) or all
        train each task together (data-parallel); at a segment's end every rank loads the
        segment's checkpoints in order, and all evaluate together."""
        cfg, ctx = self.config, self.ctx
        backend_name = backend_for(self.device).name
        progress_path = self.out / "progress.json"
        state = self._on_main(lambda: read_json(progress_path, "progress file")
                              if self.resume and progress_path.exists() else {"rows": []})
        rows, train_wall = list(state.get("rows", [])), float(state.get("train_wall_seconds", 0.0))
        eval_points = sorted({k for k in cfg.eval_at if 1 <= k < cfg.tasks} | {cfg.tasks})
        after, task_seconds, checksums = [0.0] * cfg.tasks, [0.0] * cfg.tasks, [""] * cfg.tasks
        resumed, lo = 0, 0
        bar = tqdm(total=cfg.tasks, desc=f"{cfg.scenario} {cfg.benchmark}", unit="task", disable=not self.progress)
        finished = SharedCounter(ctx, "tasks_finished")
        # Task-parallel ranks with a sharded bank never hold all the masks: training needs none of
        # the finished ones, and each evaluation reads a rank's own range only.
        hold_all = not (cfg.shard_bank and self.parallel == "task")
        for hi in eval_points:
            todo = self._on_main(lambda: self._scan(lo, hi))
            resumed += (hi - lo) - len(todo)
            start = time.perf_counter()
            if self.parallel == "task":
                held = num_tasks(self.model)  # lo, or 0 with a sharded bank
                for t in TaskQueue(ctx, f"segment-{hi}", todo):
                    self._train_and_save(t, row=held)
                    for m in task_modules(self.model):  # keep the bank in task order: reloaded below
                        m.truncate_tasks(held)
                    done = finished.add(1)
                    if self.progress:
                        bar.n = resumed + done
                        bar.refresh()
                barrier(ctx)
            for t in range(lo, hi):
                if self.parallel != "task" and t in todo:
                    self._train_and_save(t, row=t)
                    barrier(ctx)  # rank 0 has written the checkpoint every rank reads below
                    for m in task_modules(self.model):
                        m.truncate_tasks(t)
                if hold_all:
                    extra, checksums[t] = self._load_task(self.model, t)
                else:  # the record only: each rank reads its own range of the bits when it evaluates
                    extra, checksums[t] = self._task_record(t)
                after[t], task_seconds[t] = extra["accuracy_after_training"], extra["train_seconds"]
                if self.progress and self.parallel != "task":
                    bar.update(1)
                    bar.set_postfix(acc=f"{after[t]:.4f}")
            train_wall += time.perf_counter() - start if todo else 0.0
            if self.progress:
                bar.n = hi
                bar.refresh()
            if hi == cfg.tasks:  # the masks are usable (evaluate) before the final evaluation runs
                self._on_main(lambda: self._save_whole_model(after, loaded=hold_all))
            digest = masks_digest(checksums[:hi])
            fresh = [r for r in rows if r["tasks_learned"] == hi and r.get("masks_sha256") == digest]
            if not fresh:  # missing, or computed from other checkpoints than the ones now there
                row = self._evaluate_all(hi, f"eval {hi} tasks")
                row["masks_sha256"] = digest
                rows = [r for r in rows if r["tasks_learned"] != hi] + [row]
            self._on_main(lambda: write_json(progress_path, {"rows": rows, "train_wall_seconds": train_wall}))
            lo = hi
        bar.close()
        rows = [r for r in rows if r["tasks_learned"] in eval_points]
        if not hold_all and not ctx.is_main:
            self._on_main(lambda: None)
            return {"rank": ctx.rank, **rows[-1]}
        results = self._results(after, rows, train_wall, resumed, backend_name)
        results["timing"]["train_task_seconds_sum"] = sum(task_seconds)
        self._on_main(lambda: self._write_outputs(results))
        return results

    def _task_record(self, t: int) -> tuple:
        """(extra, checksum) of checkpoint t from its header, after checking it is this run's."""
        path = self._task_file(t)
        meta = storage.read_metadata(path)
        extra = storage.parse_metadata(path, meta)[4]
        check_identity(path, extra, self.identity(t))
        return extra, meta.get("checksum", "")

    def _save_whole_model(self, after: List[float], loaded: bool) -> None:
        """model.safetensors, on rank 0. With a sharded bank the ranks hold no whole model, so
        rank 0 assembles it from the checkpoints for the file (and the results) alone."""
        if not loaded:
            self.model = self._fresh_model().to(self.device)
            for t in range(self.config.tasks):
                self._load_task(self.model, t)
        storage.save_model(self.model, self.out / "model.safetensors", extra=self._model_extra(after))

    def _model_extra(self, after: List[float]) -> dict:
        return {"accuracy_after_training": after, "run_identity": self.identity()}

    def _run_nns(self) -> dict:
        """NNs: the model never sees the task index; masks are allocated by the rule of
        :mod:`.nns`. One checkpoint (all masks + allocator log) after each true task."""
        self.prepare_out_dir()
        try:
            return self._run_nns_locked()
        finally:
            self.release()

    def _run_nns_locked(self) -> dict:
        cfg = self.config
        ckpt = self.ckpt_dir / "nns_latest.safetensors"
        done, after, train_seconds, state = 0, [], 0.0, None
        if self.resume and ckpt.exists():
            tensors, meta = storage.read_mask_file(ckpt)
            check_identity(ckpt, storage.parse_metadata(ckpt, meta)[4], self.identity())
            extra = storage.apply_mask_file(self.model, ckpt, tensors, meta)
            done, after, train_seconds = extra["true_tasks_done"], extra["accuracy_after_training"], extra["train_seconds"]
            state = AllocatorState.from_dict(extra["allocator"])
        allocator = MaskAllocator(self.model, cfg.nns_settings(), cfg.seed, state, ctx=self.ctx)
        self.nns_state = allocator.state
        with use_backend(cfg.backend):
            backend_name = backend_for(self.device).name
            progress_path = self.out / "progress.json"
            rows = self._on_main(lambda: read_json(progress_path, "progress file").get("rows", [])
                                 if (self.resume and progress_path.exists()) else [])
            eval_points = sorted({k for k in cfg.eval_at if 1 <= k < cfg.tasks} | {cfg.tasks})
            task_bar = tqdm(range(cfg.tasks), desc=f"NNs {cfg.benchmark}", unit="true task", disable=not self.progress)
            task_bar.update(done)
            for t in range(done, cfg.tasks):
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + t)
                split = train_subset(self.tasks.train(t), cfg.train_subset)
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
                self._on_main(lambda: storage.save_model(self.model, ckpt, extra={
                    "true_tasks_done": t + 1, "accuracy_after_training": after, "train_seconds": train_seconds,
                    "allocator": allocator.state.to_dict(), "run_identity": self.identity()}))
                task_bar.update(1)
                task_bar.set_postfix(masks=num_tasks(self.model), acc=f"{own.accuracy:.4f}")
                if t + 1 in eval_points and t + 1 < cfg.tasks and not any(r["tasks_learned"] == t + 1 for r in rows):
                    rows.append(self._evaluate_all(t + 1, f"eval {t + 1} true tasks"))
                    self._on_main(lambda: write_json(progress_path, {"rows": rows}))
            allocator.finish()
            self._on_main(lambda: storage.save_model(self.model, self.out / "model.safetensors",
                                                     extra={**self._model_extra(after), **self._nns_extra()}))
            for k in eval_points:
                if not any(r["tasks_learned"] == k for r in rows):
                    rows.append(self._evaluate_all(k, f"eval {k} true tasks"))
                    self._on_main(lambda: write_json(progress_path, {"rows": rows}))
            task_bar.close()
        results = self._results(after, rows, train_seconds, done, backend_name)
        self._on_main(lambda: self._write_outputs(results))
        return results

    def _nns_extra(self) -> dict:
        state = self.nns_state.to_dict()
        return {"allocator": {k: state[k] for k in ("decisions", "batches_per_mask")}}

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
                       "eval_queries": final.get("queries"),
                       "tasks_resumed": resumed},
            "backend": backend_name,
            "distributed": {"world_size": self.ctx.world_size, "backend": self.ctx.backend, "parallel": self.parallel,
                            "shard_bank": bool(cfg.shard_bank and self.ctx.enabled),
                            "bank_bytes_per_rank": self.bank_bytes_per_rank or [mask_bytes(self.model)] * self.ctx.world_size},
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
        if not (self.out / "model.safetensors").exists() or "evaluated_from" in results:
            extra = self._model_extra(results["accuracy_after_training"])
            if "nns" in results:
                extra.update(self._nns_extra())
            storage.save_model(self.model, self.out / "model.safetensors", extra=extra)
        write_json(self.out / "results.json", results)
        write_csv(results, self.out / "per_task.csv")
        write_plot(results, self.out / "accuracy.png")


def run_experiment(config: RunConfig, out: Union[str, Path], resume: bool = False, progress: bool = True,
                   ctx: DistContext = SINGLE, retrain_corrupt: bool = False) -> dict:
    return Experiment(config, out, resume, progress, ctx=ctx, retrain_corrupt=retrain_corrupt).run()


def evaluate_run(run_dir: Union[str, Path], overrides: dict, out: Union[str, Path], progress: bool = True,
                 ctx: DistContext = SINGLE) -> dict:
    """Re-evaluate a finished run's masks (its model.safetensors) under other evaluation settings,
    e.g. the masks of a GNu run under GG or GNs. Training settings stay those of the run. With
    ``shard_bank`` under torchrun each rank reads only its own range of the task checkpoints."""
    run_dir = Path(run_dir)
    cfg_path, model_path = run_dir / "config.json", run_dir / "model.safetensors"
    if not cfg_path.is_file() or not model_path.is_file():
        raise RunDirError(f"{run_dir} is not a finished run (needs config.json and model.safetensors)")
    values = read_json(cfg_path, "run config")
    values.update(overrides)
    values["download"] = False
    try:
        config = RunConfig(**values).validate()
    except TypeError as exc:
        raise RunDirError(f"{cfg_path} is not a supsup_fast run config ({exc})") from exc
    meta = storage.read_metadata(model_path)
    extra = storage.parse_metadata(model_path, meta)[4]
    check_identity(model_path, extra, {"settings_sha256": run_identity(config, "")["settings_sha256"]})
    after = extra["accuracy_after_training"]
    held = int(meta["num_tasks"])
    if config.scenario != "NNs" and not (held == len(after) == config.tasks):
        raise RunDirError(f"{model_path} holds {held} tasks, but the run {run_dir} trained {config.tasks} "
                          f"({len(after)} with accuracies recorded): the file is incomplete or from an unfinished run")
    sharded = config.shard_bank and ctx.enabled
    if sharded and config.scenario == "NNs":
        raise ValueError("--shard-bank does not apply to NNs runs (one checkpoint holds all masks)")
    model = None if sharded else storage.load_model(model_path)
    exp = Experiment(config, run_dir if sharded else out, progress=progress, model=model, ctx=ctx)
    if sharded:
        exp.data_sha256 = extra["run_identity"].get("data_sha256", exp.data_sha256)  # the run's own checkpoints
        exp.output_size = json.loads(meta["model_spec"]).get("output_size", exp.output_size)
    if config.scenario == "NNs":
        if "allocator" not in extra:
            raise RunDirError(f"--scenario NNs needs the masks of an NNs run; {run_dir} was trained as {values['scenario']}")
        exp.nns_state = AllocatorState.from_dict(extra["allocator"])
    if ctx.is_main:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_json(Path(out) / "config.json", config.to_dict())
    with use_backend(config.backend):
        backend_name = backend_for(exp.device).name
        # NNs: the true tasks seen (one accuracy-after-training each), not the masks allocated.
        learned = len(after) if config.scenario == "NNs" else int(meta["num_tasks"])
        row = exp._evaluate_all(learned, "evaluate")
    if sharded:  # results describe the whole model: rank 0 reads it once, for the file outputs
        exp.out = Path(out)
        if not ctx.is_main:
            exp._on_main(lambda: None)
            return {"rank": ctx.rank, **row}
        exp.model = storage.load_model(model_path)
    results = exp._results(after, [row], 0.0, 0, backend_name)
    results["evaluated_from"] = str(run_dir)
    exp._on_main(lambda: exp._write_outputs(results))
    return results
