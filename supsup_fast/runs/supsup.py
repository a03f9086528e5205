"""GG, GNs and GNu: one mask per task, trained independently of the others (task-parallel under
torchrun), one verified checkpoint per finished task."""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import List, Optional

import torch
from tqdm.auto import tqdm

from ..algorithms.data_parallel import train_task_data_parallel
from ..algorithms.evaluation import EvalSettings, evaluate_task
from ..algorithms.training import train_task
from ..distributed import SharedCounter, TaskQueue, barrier
from ..nn import num_tasks, task_modules, transfer_init_scores
from ..ops.registry import backend_for, use_backend
from . import maskfile
from .loop import Experiment, bank_summary, evaluation_points, task_generator, train_subset, training_steps
from .rundir import RunDirError, check_identity, masks_digest


class SupSupRun(Experiment):
    def run(self) -> dict:
        self.prepare_out_dir()
        try:
            with use_backend(self.config.backend):
                return self._run_tasks()
        finally:
            self.release()

    def _scan(self, lo: int, hi: int) -> List[int]:
        """Tasks in [lo, hi) without a usable checkpoint. A corrupt one is refused with the file
        named, or deleted for retraining under --retrain-corrupt; one from another run is refused."""
        todo, here = [], self.training_environment()
        elsewhere = self.__dict__.setdefault("_trained_elsewhere", {})  # over every segment scanned so far
        for t in range(lo, hi):
            path = self._task_file(t)
            if not (self.resume and path.exists()):
                todo.append(t)
                continue
            try:
                _, meta = maskfile.read_mask_file(path)
            except maskfile.MaskFileError as exc:
                if not self.retrain_corrupt:
                    raise RunDirError(f"checkpoint of task {t} is unusable: {exc}. Delete {path} or pass "
                                      f"--retrain-corrupt to retrain that task") from exc
                path.unlink()
                todo.append(t)
                continue
            extra = maskfile.parse_metadata(path, meta)[4]
            check_identity(path, extra, self.identity(t))
            if extra.get("trained_on", here) != here:
                elsewhere.setdefault(extra["trained_on"], []).append(t)
        if elsewhere and todo and not self.__dict__.get("_said_elsewhere"):
            self._said_elsewhere = True
            said = "; ".join(f"{_task_list(ts)} on {env}" for env, ts in elsewhere.items())
            warnings.warn(f"this resume trains on {here}, and the run's finished tasks were trained "
                          f"{said}: kernels of another backend or instruction set sum in another order, so the tasks "
                          f"trained now may differ in a few bits from an uninterrupted run (results.json lists "
                          f"trained_on)", stacklevel=2)
        return todo

    def training_environment(self) -> str:
        """What a task's last bits depend on besides the run's settings: the backend and, on the cpu
        backend, the instruction set of its kernels, and torch's own (its GEMMs)."""
        name = backend_for(self.device).name
        if name == "cpu":
            from ..ops.backends.cpu import cpu_isa
            name += f"/{cpu_isa()}"
        return f"{name}, torch {torch.backends.cpu.get_cpu_capability()}" if self.device.type == "cpu" else \
            f"{name}, {torch.cuda.get_device_name(self.device)}"

    def _train_and_save(self, t: int, row: int) -> float:
        """Train task t (the model's bank holds ``row`` tasks before it) and write its checkpoint.
        Task t's randomness derives from (seed, t) alone, so its mask is the same bits whichever
        rank trains it, at any world size (with ``--parallel task``; a data-parallel step sums the
        gradient over ranks, in another order than one process, and takes the plain, unfused step:
        its masks agree but for the bits whose scores end within rounding of 0, a few with SGD, more
        with RMSprop, whose lr·g/|g| steps turn rounding near g = 0 into whole steps)."""
        cfg = self.config
        writes = self.ctx.is_main or self.parallel == "task"
        trained = self._trained_file(t)  # trained by an earlier attempt, then interrupted in its evaluation
        loaded = self._load_trained(t, trained)
        seconds, trained_on = loaded if loaded is not None else (self._train(t), self.training_environment())
        try:
            own = evaluate_task(self.model, self.tasks.test(t), t, EvalSettings(scenario="GG", batch_size=cfg.test_batch_size),
                                device=self.device, num_labels=self.tasks.num_labels, seed=cfg.seed, expected=row)
        except BaseException:  # unreadable test data, Ctrl-C: the training is kept; a resume only evaluates
            if writes and not trained.exists():
                maskfile.save_masks(self.model, trained, row, row + 1, label=t,
                                   extra={"train_seconds": seconds, "run_identity": self.identity(t),
                                          "trained_on": self.training_environment()})
            raise
        if writes:
            maskfile.save_masks(self.model, self._task_file(t), row, row + 1, label=t,
                               extra={"accuracy_after_training": own.accuracy, "train_seconds": seconds,
                                      "run_identity": self.identity(t), "trained_on": trained_on})
            trained.unlink(missing_ok=True)
        return seconds if loaded is not None else 0.0  # training time not spent in this attempt

    def _train(self, t: int) -> float:
        """Train task t into the model's bank; the seconds it took."""
        cfg = self.config
        gen = task_generator(cfg.seed, t)
        split = train_subset(self.tasks.train(t), cfg.train_subset)
        steps = training_steps(cfg, split)
        show = self.progress and self.parallel != "task"
        step_bar = tqdm(total=steps, desc=f"task {t}", unit="it", leave=False, disable=not show)
        # Drawn every 10 steps (a LeNet step is well under a millisecond), counting every step.
        on_step = (lambda s, loss: (step_bar.update(s - step_bar.n), step_bar.set_postfix(loss=f"{loss:.3f}"))
                   if s % 10 == 0 or s == steps else None)
        start = time.perf_counter()
        init = transfer_init_scores(self.model) if cfg.transfer else None
        if self.parallel == "data":
            train_task_data_parallel(self.model, split, self.train_settings, self.ctx, device=self.device,
                                     generator=gen, init_scores=init, on_step=on_step)
        else:
            train_task(self.model, split, self.train_settings, device=self.device, generator=gen,
                       init_scores=init, on_step=on_step)
        step_bar.close()
        return time.perf_counter() - start

    def _trained_file(self, t: int) -> Path:
        """Task t's mask, trained but not yet evaluated: written where its evaluation after training
        failed or was interrupted, so that the resume evaluates it instead of training it again."""
        return self.ckpt_dir / f"trained_{t:05d}.safetensors"

    def _load_trained(self, t: int, path: Path) -> Optional[tuple]:
        """Append task t's trained mask from ``path`` if it holds one of this run (its training
        seconds and where it trained), else None; one that is unusable is deleted (the task trains again)."""
        if not path.exists():
            return None
        try:
            extra, _ = self._load_task(self.model, t, first_task=t, path=path)
        except ValueError as exc:  # MaskFileError, RunDirError
            warnings.warn(f"{path} is unusable ({exc}); task {t} is trained again", stacklevel=2)
            if self.ctx.is_main or self.parallel == "task":
                path.unlink(missing_ok=True)
            return None
        return float(extra.get("train_seconds", 0.0)), extra.get("trained_on", "unrecorded")

    def _run_tasks(self) -> dict:
        """GG, GNs, GNu: one mask per task. The tasks are cut into segments at the evaluation
        points; within a segment the ranks pull tasks from a shared queue (task-parallel) or all
        train each task together (data-parallel); at a segment's end every rank loads the
        segment's checkpoints in order, and all evaluate together."""
        cfg, ctx = self.config, self.ctx
        backend_name = backend_for(self.device).name
        state = self.read_progress()
        rows, train_wall = list(state["rows"]), float(state.get("train_wall_seconds", 0.0))
        # The tasks whose training the saved wall time covers (a file from before this record: all). A task
        # finished after the last save, by an attempt that was then interrupted, adds its own training time.
        timed = set(state.get("timed_tasks", range(cfg.tasks) if "train_wall_seconds" in state else ()))
        eval_points = evaluation_points(cfg)
        after, task_seconds, checksums = [0.0] * cfg.tasks, [0.0] * cfg.tasks, [""] * cfg.tasks
        trained_on = [""] * cfg.tasks
        resumed, lo = 0, 0
        bar = tqdm(total=cfg.tasks, desc=f"{cfg.scenario} {cfg.benchmark}", unit="task", disable=not self.progress)
        finished = SharedCounter(ctx, "tasks_finished")
        # Task-parallel ranks with a sharded bank never hold all the masks: training needs none of
        # the finished ones, and each evaluation reads a rank's own range only.
        hold_all = not (cfg.shard_bank and self.parallel == "task")
        for hi in eval_points:
            todo = self._on_main(lambda: self._scan(lo, hi))
            self.commit_config()  # (the first segment's checkpoints belong to this run)
            resumed += (hi - lo) - len(todo)
            start, untimed = time.perf_counter(), 0.0
            if self.parallel == "task":
                held = num_tasks(self.model)  # lo, or 0 with a sharded bank
                for t in TaskQueue(ctx, f"segment-{hi}", todo):
                    untimed += self._train_and_save(t, row=held)
                    for m in task_modules(self.model):  # keep the bank in task order: reloaded below
                        m.truncate_tasks(held)
                    done = finished.add(1)
                    if self.progress:
                        bar.n = resumed + done
                        bar.refresh()
                barrier(ctx)
            for t in range(lo, hi):
                if self.parallel != "task" and t in todo:
                    untimed += self._train_and_save(t, row=t)
                    barrier(ctx)  # rank 0 has written the checkpoint every rank reads below
                    for m in task_modules(self.model):
                        m.truncate_tasks(t)
                if hold_all:
                    extra, checksums[t] = self._load_task(self.model, t)
                else:  # the record only: each rank reads its own range of the bits when it evaluates
                    extra, checksums[t] = self._task_record(t)
                after[t], task_seconds[t] = maskfile.require_extra(self._task_file(t), extra, "accuracy_after_training",
                                                                     "train_seconds")
                trained_on[t] = extra.get("trained_on", "unrecorded")
                if t not in todo and t not in timed:
                    untimed += task_seconds[t]
                timed.add(t)
                if self.progress and self.parallel != "task":
                    bar.update(1)
                    bar.set_postfix(acc=f"{after[t]:.4f}")
            train_wall += time.perf_counter() - start if todo else 0.0
            train_wall += untimed / (ctx.world_size if self.parallel == "task" else 1)  # ranks trained side by side
            if todo or untimed:  # the training time survives an interruption of the evaluation below
                self.save_progress(rows, train_wall_seconds=train_wall, timed_tasks=sorted(timed))
            if self.progress:
                bar.n = hi
                bar.refresh()
            if hi == cfg.tasks:  # the masks are usable (evaluate) before the final evaluation runs
                self._on_main(lambda: self._save_whole_model(after, loaded=hold_all))
            digest = masks_digest(checksums[:hi])
            fresh = [r for r in rows if r["tasks_learned"] == hi and r.get("masks_sha256") == digest
                     and r.get("eval_sha256") == self.eval_digest()]
            if not fresh:  # missing, or computed from other checkpoints than the ones now there
                row = self._evaluate_all(hi, f"eval {hi} tasks")
                row["masks_sha256"] = digest
                rows = [r for r in rows if r["tasks_learned"] != hi] + [row]
            elif hi == cfg.tasks and not hold_all and ctx.is_main:
                # no final evaluation (its row is kept): the summary its ranks would have added up
                self.bank_summary = self._summary_from_checkpoints()
            self.save_progress(rows, train_wall_seconds=train_wall, timed_tasks=sorted(timed))
            lo = hi
        bar.close()
        rows = [r for r in rows if r["tasks_learned"] in eval_points]
        if not hold_all and not ctx.is_main:
            self._on_main(lambda: None)
            return {"rank": ctx.rank, **rows[-1]}
        results = self._results(after, rows, train_wall, resumed, backend_name)
        results["timing"]["train_task_seconds_sum"] = sum(task_seconds)
        # where the tasks trained (one entry unless a resume ran elsewhere): {environment: tasks}
        results["trained_on"] = {env: _task_list([t for t, e in enumerate(trained_on) if e == env])
                                 for env in dict.fromkeys(trained_on)}
        self._on_main(lambda: self._write_outputs(results))
        return results

    def _task_record(self, t: int) -> tuple:
        """(extra, checksum) of checkpoint t from its header, after checking it is this run's."""
        path = self._task_file(t)
        meta = maskfile.read_metadata(path)
        extra = maskfile.parse_metadata(path, meta)[4]
        check_identity(path, extra, self.identity(t))
        return extra, meta.get("checksum", "")

    def _save_whole_model(self, after: List[float], loaded: bool) -> None:
        """model.safetensors, on rank 0. With a sharded bank no rank holds the whole model: the file
        is written from the task checkpoints (each verified), never assembled in memory."""
        path = self.out / "model.safetensors"
        if loaded:
            maskfile.save_model(self.model, path, extra=self._model_extra(after))
        else:
            maskfile.save_model_from_files(self._fresh_model(), [self._task_file(t) for t in range(self.config.tasks)],
                                           path, extra=self._model_extra(after))

    def _summary_from_checkpoints(self) -> dict:
        """The whole bank's summary, one checkpoint at a time (every field adds up over tasks)."""
        model, total = self._fresh_model(), {}
        for t in range(self.config.tasks):
            self._load_task(model, t, first_task=t)
            for key, value in bank_summary(model).items():
                total[key] = total.get(key, 0) + value
            for m in task_modules(model):
                m.truncate_tasks(0)
        return total



def _task_list(tasks: List[int]) -> str:
    """Task indices as ranges: [0, 1, 2, 5] -> "0-2, 5"."""
    parts, i = [], 0
    while i < len(tasks):
        j = i
        while j + 1 < len(tasks) and tasks[j + 1] == tasks[j] + 1:
            j += 1
        parts.append(str(tasks[i]) if i == j else f"{tasks[i]}-{tasks[j]}")
        i = j + 1
    return ", ".join(parts)
