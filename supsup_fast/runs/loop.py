"""The run layer's shared core: one run folder, its data and model, resume checks, per-task
seeds, evaluation points and rows, and the output files. The scenario drivers build on it:
:mod:`.supsup` (GG, GNs, GNu), :mod:`.nns` (NNs) and :mod:`.hopsupsup` (HopSupSup).

Layout of ``out``: ``config.json``; ``checkpoints/`` (one verified file per finished task or a
rolling checkpoint, written atomically: an interrupted run resumes without retraining);
``progress.json`` (evaluation rows done so far); at the end ``results.json``, ``per_task.csv``,
``accuracy.png`` and ``model.safetensors`` (all tasks in one file).
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import torch
from tqdm.auto import tqdm

from ..algorithms.calibration import alpha_scale, mask_baselines
from ..algorithms.evaluation import evaluate_task
from ..algorithms.metrics import average, cl_metrics
from ..algorithms.sharded import ShardedModel, evaluate_task_sharded
from ..atomic_files import atomic_write_bytes, remove_temporaries
from ..data import load_benchmark
from ..data.tasks import TaskSplit
from ..distributed import SINGLE, DistContext, broadcast_object, gather_objects, shard_range
from ..models import build_model
from ..nn import MultitaskBatchNorm, begin_task, bn_bytes, enable_transfer, mask_bytes, mask_entropy_bytes, num_tasks
from ..ops.registry import backend_for, use_backend
from . import maskfile
from .config import RunConfig
from .results import machine_info, read_json, write_csv, write_json, write_plot
from .rundir import RunDirError, RunLock, check_identity, check_writable, data_fingerprint, run_identity


def task_generator(seed: int, task: int) -> torch.Generator:
    """Task ``task``'s randomness (score init, data order) derives from (seed, task) alone, so its
    mask is the same bits whichever rank trains it, at any world size."""
    return torch.Generator().manual_seed(seed * 1_000_003 + task)


def train_subset(split: TaskSplit, n: Optional[int]) -> TaskSplit:
    """The first n training images of a task (``--train-subset``), or all of them."""
    if n is None or n >= len(split):
        return split
    return split.head(n)


def training_steps(config: RunConfig, split: TaskSplit) -> int:
    """The optimisation steps one task takes: --iters batches, at most --epochs passes over its
    training set (algorithms.training.run_steps)."""
    per_epochs = config.epochs * split.num_batches(config.batch_size)
    return per_epochs if config.iters is None else min(config.iters, per_epochs)


def confusions(inferred: Optional[List[int]], expected: int) -> Dict[str, int]:
    """The queries whose task was inferred wrong, counted by the task inferred: {str(task): count}."""
    out: Dict[str, int] = {}
    for chosen in inferred or []:
        if chosen != expected:
            out[str(chosen)] = out.get(str(chosen), 0) + 1
    return out


def unusable_checkpoint(path: Path, exc: Exception) -> RunDirError:
    """The error for a rolling checkpoint (NNs, HopSupSup) that cannot be resumed from."""
    return RunDirError(f"checkpoint {path} is unusable: {exc}. Delete it to retrain this run from its first task, "
                       f"or choose another --out")


def bank_summary(model: torch.nn.Module) -> dict:
    """The mask count and bytes that results.json reports for a model's bank."""
    return {"num_masks": num_tasks(model), "mask_bytes": mask_bytes(model),
            "mask_entropy_bytes": mask_entropy_bytes(model), "bn_bytes": bn_bytes(model)}


def evaluation_points(config: RunConfig) -> List[int]:
    """The task counts at which every task learned so far is evaluated; the last is all tasks."""
    return sorted({k for k in config.eval_at if 1 <= k < config.tasks} | {config.tasks})


def progress_digest(data: dict) -> str:
    """The checksum a progress file carries over its other fields."""
    body = {k: v for k, v in data.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_progress_file(path: Path) -> dict:
    """A progress file's content, refused (naming the file) where it is damaged, edited or not of
    this package: its evaluation rows are then recomputed once it is deleted."""
    data = read_json(path, "progress file")
    remedy = ("delete it: the finished tasks are kept and the evaluation rows recomputed (an NNs run cannot "
              "recompute the rows of points it has passed: restore the file instead)")
    # A file of a version before the checksum has none; one that has it must match.
    if "sha256" in data and data["sha256"] != progress_digest(data):
        raise RunDirError(f"progress file {path} failed its checksum (modified after it was written); {remedy}")
    rows = data.get("rows")
    shape_ok = isinstance(rows, list) and all(
        isinstance(r, dict) and isinstance(r.get("tasks_learned"), int) and isinstance(r.get("accuracy"), list)
        for r in rows)
    timed = data.get("timed_tasks", [])
    if not shape_ok or not isinstance(data.get("train_wall_seconds", 0.0), (int, float)) or \
            not (isinstance(timed, list) and all(isinstance(t, int) for t in timed)):
        raise RunDirError(f"progress file {path} is malformed (rows must be evaluation rows); {remedy}")
    return data


def parallel_mode(config: RunConfig, ctx: DistContext) -> str:
    """"single" (one process), "task" (each rank trains whole tasks) or "data" (DDP on one task)."""
    if not ctx.enabled:
        return "single"
    if config.shard_bank and config.scenario == "NNs":
        raise ValueError("--shard-bank does not apply to NNs runs (one checkpoint holds all masks); "
                         "launch without --shard-bank")
    if config.shard_bank:
        first = evaluation_points(config)[0]
        if first < ctx.world_size and first == config.tasks:  # no earlier point: too few tasks for the ranks
            raise ValueError(f"--shard-bank needs at least one task per rank: {first} task{'s' if first > 1 else ''} "
                             f"(--tasks) for {ctx.world_size} ranks; launch at most {first} rank{'s' if first > 1 else ''}")
        if first < ctx.world_size:
            raise ValueError(f"--shard-bank needs at least one task per rank at every evaluation, and the first one "
                             f"(after {first} task{'s' if first > 1 else ''}: --eval-at / --tasks) has {first} for "
                             f"{ctx.world_size} ranks; drop the --eval-at points below {ctx.world_size} or launch "
                             f"fewer ranks")
    sequential = config.scenario == "NNs" or config.transfer
    if config.inference == "hopfield":
        raise ValueError("HopSupSup (--inference hopfield) runs in one process; launch it without torchrun")
    if config.parallel == "auto":
        return "data" if sequential else "task"
    return config.parallel


def refuse_existing_run(out: Path) -> None:
    """A run that is not resumed must not write into another run's folder."""
    if (out / "config.json").exists():
        raise RunDirError(f"{out} already holds a run; pass --resume to continue it or choose another --out")


def refuse_evaluation_folder(out: Path) -> None:
    """A resume must not train into the output folder of ``supsup-fast evaluate``."""
    results = out / "results.json"
    if results.exists():
        try:
            source = read_json(results, "results").get("evaluated_from")
        except (RunDirError, ValueError, OSError):
            return  # an unreadable results.json is the run's own business (it is rewritten at the end)
        if source is not None:
            raise RunDirError(f"{out} holds an evaluation (supsup-fast evaluate) of the run in {source}, not a run: "
                              f"resume that run, or choose another --out")


class Experiment:
    """The data, model, settings and folder of one run; a scenario driver subclasses it and
    defines ``run``. ``model`` defaults to a fresh network. ``ctx`` is
    the torch.distributed context (one process by default)."""

    def __init__(self, config: RunConfig, out: Union[str, Path], resume: bool = False, progress: bool = True,
                 model: Optional[torch.nn.Module] = None, ctx: DistContext = SINGLE, retrain_corrupt: bool = False):
        config.validate()  # also when the config was built directly, not through make_config / the CLI
        self.config, self.out, self.resume, self.ctx = config, Path(out), resume, ctx
        self.progress, self.retrain_corrupt = progress and ctx.is_main, retrain_corrupt
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"--device {config.device}: this torch ({torch.__version__}) sees no CUDA GPU; "
                               f"use --device cpu or install a CUDA build of torch")
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and (self.device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device {config.device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        check_writable(self.out)
        self.parallel = parallel_mode(config, ctx)
        self.ckpt_dir = self.out / "checkpoints"
        self.tasks = load_benchmark(config.benchmark, config.tasks, config.seed, config.data_root, config.download,
                                    image_size=config.image_size)
        with use_backend(config.backend):  # after the data (a wrong --data-root fails before a first-use compile)
            backend_for(self.device)
        self.output_size = config.resolved_output_size(self.tasks.num_labels)
        self.data_sha256 = data_fingerprint(self.tasks)
        self._check_superposed_batchnorm()  # a given model too: `evaluate` of a GG run's masks under GNu
        if model is None:
            model = self._fresh_model()
        self.model = model.to(self.device)
        if config.shard_bank and ctx.enabled and any(isinstance(m, MultitaskBatchNorm) for m in self.model.modules()):
            raise ValueError("--shard-bank needs an MLP of supermask layers without BatchNorm (fc1024 or lenet); "
                             f"--model {config.model} has per-task BatchNorm")
        if config.transfer:
            enable_transfer(self.model)
        self.train_settings = config.train_settings()
        # HopSupSup recovers the task by its own Hopfield loop, under its own settings (hop_settings).
        self.eval_settings = config.eval_settings() if config.inference != "hopfield" else None
        self.lock: Optional[RunLock] = None
        self.bank_bytes_per_rank: Optional[List[int]] = None
        self.bank_summary: Optional[dict] = None  # of the whole bank, where this rank does not hold it

    def eval_digest(self) -> str:
        """Identifies the evaluation settings a progress row was computed under: rows computed
        under other settings (changed on --resume) are recomputed, never reported as these."""
        e = self.eval_settings
        shaping = [e.scenario, e.inference, e.objective, e.infer_images, e.batch_size, e.log_base]
        if e.calibration != "none":  # rows computed before the setting existed keep their digest
            shaping.append(e.calibration)
        return hashlib.sha256(json.dumps(shaping).encode()).hexdigest()

    def _check_superposed_batchnorm(self) -> None:
        """Task inference superposes per-task BatchNorm, which then normalises with the query batch's
        own statistics: a feature map of one value per channel (a deep net on small images, one image
        a query) cannot be normalised, and the run would stop at its first evaluation, after training.
        Found now by a forward of the smallest query's shape through the model on meta tensors (the
        weights are drawn, then dropped; no activation is computed)."""
        c = self.config
        if c.scenario not in ("GNs", "GNu") or c.inference == "hopfield":
            return
        with torch.device("meta"):
            probe = self._fresh_model()
        norms = {name: m for name, m in probe.named_modules() if isinstance(m, MultitaskBatchNorm)}
        if not norms:
            return
        shapes: Dict[str, tuple] = {}

        def record(name):
            def hook(module, args):
                shapes.setdefault(name, tuple(args[0].shape))
            return hook
        hooks = [m.register_forward_pre_hook(record(name)) for name, m in norms.items()]
        # A query is the first --infer-images images of a test batch: of a task's last batch, maybe fewer.
        last = [len(self.tasks.test(t)) % c.test_batch_size for t in range(c.tasks)]
        query = min([c.infer_images] + [r for r in last if r])
        begin_task(probe, generator=torch.Generator())  # not torch's global generator
        probe.eval()  # running statistics: a probe of one image is not refused by BatchNorm's own check
        with torch.no_grad():
            probe(torch.empty(query, *self.tasks.input_shape, device="meta"))
        for hook in hooks:
            hook.remove()
        for name, shape in shapes.items():
            if len(shape) >= 2 and math.prod(shape) == shape[1]:
                cut = "" if query == c.infer_images else \
                    f" (a task's last test batch holds {query}: choose a --test-batch-size that leaves none so small)"
                raise ValueError(f"--model {c.model} on images of {tuple(self.tasks.input_shape)} leaves layer {name!r} "
                                 f"one value per channel {shape} for a query of {query} image(s){cut}: task inference "
                                 f"superposes the per-task BatchNorm, which then normalises with the query's own "
                                 f"statistics; use --infer-images 2 or more"
                                 + (", or a larger --image-size" if c.benchmark == "split-imagenet" else ""))

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
            now = self.config.to_dict()
            if cfg_path.exists():
                if not self.resume:
                    refuse_existing_run(self.out)
                refuse_evaluation_folder(self.out)
                saved = read_json(cfg_path, "run config")
                diff = sorted(k for k in set(saved) | set(now)
                              if saved.get(k) != now.get(k) and k not in RunConfig.RESUMABLE_CHANGES)
                if diff:
                    raise RunDirError(f"cannot resume {self.out}: settings differ from the interrupted run: "
                                      + ", ".join(f"{k} ({saved.get(k)!r} -> {now.get(k)!r})" for k in diff))
                # A resume's changed settings (--data-root, --eval-at, ...) are written once the driver has
                # checked the folder's files against them (commit_config): a refused resume changes nothing.
                self._pending_config = now if saved != now else None
            elif self.resume:  # (e.g. deleted to be rebuilt): written, too, once the driver has checked the files
                self._pending_config = now
            else:
                write_json(cfg_path, now)
        except BaseException:
            self.release()
            raise

    def commit_config(self) -> None:
        """Write a resumed run's changed settings to config.json, after the scenario's driver has
        checked the folder's checkpoints against them. Called on every rank at the same point (a
        collective the first time: only rank 0, which prepared the folder, holds the settings)."""
        if getattr(self, "_config_committed", False):
            return
        self._config_committed = True
        pending = getattr(self, "_pending_config", None)
        self._on_main(lambda: None if pending is None else write_json(self.out / "config.json", pending))

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

    def _load_task(self, model: torch.nn.Module, t: int, first_task: Optional[int] = None,
                   path: Optional[Path] = None) -> tuple:
        """Append checkpoint t (or task t's mask in ``path``) to ``model`` after checking it belongs to
        this run: (extra, checksum)."""
        path = self._task_file(t) if path is None else path
        tensors, meta = maskfile.read_mask_file(path)
        check_identity(path, maskfile.parse_metadata(path, meta)[4], self.identity(t))
        extra = maskfile.apply_mask_file(model, path, tensors, meta, first_task)
        return extra, meta["checksum"]

    def _evaluate_all(self, k: int, bar_desc: str) -> dict:
        """Evaluate tasks [0, k). Under torchrun the tasks are spread over the ranks (or, with
        --shard-bank, every rank holds a range of the masks and all evaluate each query together);
        the rows are gathered on every rank and equal the single-process ones."""
        start = time.perf_counter()
        scale, baselines = None, None
        if self.eval_settings.calibration != "none":
            # each mask's own training images (--train-subset: the subset it was trained on)
            baselines = mask_baselines(self.model, [train_subset(self.tasks.train(t), self.config.train_subset)
                                                    for t in range(k)], self.device)
            scale = alpha_scale(self.eval_settings.calibration, baselines, self.output_size)
        if self.config.shard_bank and self.ctx.enabled and self.config.scenario != "NNs":
            per_task = self._evaluate_sharded(k, bar_desc)
        else:
            mine = [t for t in range(k) if t % self.ctx.world_size == self.ctx.rank]
            total = sum(self.tasks.test(t).num_batches(self.config.test_batch_size) for t in mine) if self.progress else 0
            bar = tqdm(total=total, desc=bar_desc, unit="batch", leave=False, disable=not self.progress)
            local = {}
            for t in mine:
                expected = self._expected_mask(t)
                res = evaluate_task(self.model, self.tasks.test(t), t, self.eval_settings, device=self.device,
                                    num_labels=self.tasks.num_labels, seed=self.config.seed, on_batch=bar.update,
                                    expected=expected, alpha_scale=scale)
                local[t] = (res.accuracy, res.inferred_correctly, res.batches, confusions(res.inferred_tasks, expected))
            bar.close()
            per_task = {t: r for part in gather_objects(self.ctx, local) for t, r in part.items()}
        accs = [per_task[t][0] for t in range(k)]
        inferred = [per_task[t][1] for t in range(k)]
        gg = self.config.scenario == "GG"
        row = {"tasks_learned": k, "accuracy": accs, "task_inference": None if gg else inferred,
               "average_accuracy": average(accs), "task_inference_accuracy": None if gg else average(inferred),
               "queries": sum(per_task[t][2] for t in range(k)), "seconds": time.perf_counter() - start,
               "eval_sha256": self.eval_digest()}
        if not gg:  # the wrongly inferred queries: {true task: {inferred task: count}} (JSON keys are strings)
            row["queries_per_task"] = [per_task[t][2] for t in range(k)]
            row["task_confusions"] = {str(t): per_task[t][3] for t in range(k) if per_task[t][3]}
        if baselines is not None:
            row["mask_baselines"] = {name: [round(float(v), 6) for v in values] for name, values in baselines.items()}
        return row

    def _evaluate_sharded(self, k: int, bar_desc: str) -> Dict[int, tuple]:
        if k < self.ctx.world_size:
            raise ValueError(f"--shard-bank needs at least one task per rank: {k} tasks on {self.ctx.world_size} ranks")
        own = shard_range(k, self.ctx)
        model = self._fresh_model().to(self.device)
        error = None
        try:
            for t in own:  # only this rank's range is ever read
                self._load_task(model, t, first_task=t)
        except (ValueError, RuntimeError, OSError) as exc:  # a corrupt or missing checkpoint, on some ranks
            error = exc
        # Every rank learns of a failed read and stops with it, rather than in a collective its peer left.
        parts = gather_objects(self.ctx, (None, mask_bytes(model), bank_summary(model)) if error is None
                               else (f"{type(error).__name__}: {error}", 0, None))
        if error is not None:
            raise error
        failed = [(r, e) for r, (e, _, _) in enumerate(parts) if e is not None]
        if failed:
            raise RunDirError(f"rank {failed[0][0]} could not read its range of the masks: {failed[0][1]}")
        sharded = ShardedModel(model, self.ctx, own.start, k)
        self.bank_bytes_per_rank = [int(b) for _, b, _ in parts]
        # The whole bank's summary, from the ranks' (every field adds up over tasks): no rank holds it.
        self.bank_summary = {key: sum(summary[key] for _, _, summary in parts) for key in parts[0][2]}
        total = sum(self.tasks.test(t).num_batches(self.config.test_batch_size) for t in range(k)) if self.progress else 0
        bar = tqdm(total=total, desc=bar_desc + " (sharded)", unit="batch", leave=False, disable=not self.progress)
        out = {}
        for t in range(k):
            res = evaluate_task_sharded(sharded, self.tasks.test(t), t, self.eval_settings, device=self.device,
                                        num_labels=self.tasks.num_labels, seed=self.config.seed, on_batch=bar.update)
            out[t] = (res.accuracy, res.inferred_correctly, res.batches, confusions(res.inferred_tasks, t))
        bar.close()
        return out

    def run(self) -> dict:
        raise NotImplementedError("a scenario driver (runs.supsup, runs.nns, runs.hopsupsup) defines run()")

    def read_progress(self) -> dict:
        """The progress file of an interrupted run (``{"rows": [...], ...}``; no rows when not
        resuming or none was written), checked (rank 0 reads, all ranks get it)."""
        path = self.out / "progress.json"
        return self._on_main(lambda: read_progress_file(path) if self.resume and path.exists() else {"rows": []})

    def progress_rows(self) -> List[dict]:
        """The evaluation rows an interrupted run already computed under the same evaluation settings."""
        return [r for r in self.read_progress()["rows"] if r.get("eval_sha256") == self.eval_digest()]

    def save_progress(self, rows: List[dict], **extra) -> None:
        data = {"rows": rows, **extra}
        self._on_main(lambda: write_json(self.out / "progress.json", {**data, "sha256": progress_digest(data)}))

    def _model_extra(self, after: List[float]) -> dict:
        return {"accuracy_after_training": after, "run_identity": self.identity()}

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
            **(self.bank_summary or bank_summary(self.model)),
            "task_names": [self.tasks.task_name(t) for t in range(len(final["accuracy"]))],
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
            "machine": machine_info(self.device, backend_name),
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

    def _write_outputs(self, results: dict, model_file: Optional[Path] = None, model_checksum: Optional[str] = None) -> None:
        """The output files on rank 0; ``model_file``: a mask file to copy as model.safetensors
        instead of saving ``self.model`` (a sharded evaluation holds no whole model), the copy
        verified to be the file of checksum ``model_checksum`` that was evaluated."""
        if model_file is not None:
            def copy_verified(tmp):
                shutil.copyfile(model_file, tmp)
                if maskfile.verify_mask_file(tmp)["checksum"] != model_checksum:
                    raise maskfile.MaskFileError(f"{model_file} changed during the evaluation; it was not copied")
            atomic_write_bytes(self.out / "model.safetensors", copy_verified)
        elif not (self.out / "model.safetensors").exists() or "evaluated_from" in results:
            extra = self._model_extra(results["accuracy_after_training"])
            if "nns" in results:
                extra.update(self._nns_extra())
            maskfile.save_model(self.model, self.out / "model.safetensors", extra=extra)
        write_json(self.out / "results.json", results)
        write_csv(results, self.out / "per_task.csv")
        write_plot(results, self.out / "accuracy.png")
        # The run is whole and no rank writes any more: a write killed in an earlier attempt left these.
        remove_temporaries(self.out, self.out / "checkpoints")


