"""Run configuration: defaults < YAML preset < command-line flags."""
from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Union

import yaml

from ..algorithms.calibration import CALIBRATIONS
from ..algorithms.evaluation import SCENARIOS, EvalSettings
from ..algorithms.hopsupsup import HopSettings
from ..algorithms.nns import NNsSettings
from ..algorithms.inference import METHODS

INFERENCE_METHODS = METHODS + ("hopfield",)
PARALLEL_MODES = ("auto", "task", "data")
from ..algorithms.objectives import OBJECTIVES
from ..algorithms.training import OPTIMIZERS, SCHEDULERS, TrainSettings
from ..data import BENCHMARK_MODELS, BENCHMARKS
from ..models import MODELS
from ..nn.init import WEIGHT_INITS


@dataclass
class RunConfig:
    scenario: str = "GNu"
    benchmark: str = "permuted-mnist"
    model: str = "fc1024"
    tasks: int = 10
    output_size: Optional[int] = None     # None: 100 for GNs/GNu (superfluous neurons), ℓ for GG
    iters: Optional[int] = 1000           # batches per task; None = full epochs
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-4
    optimizer: str = "rmsprop"
    weight_decay: float = 0.0
    scheduler: str = "none"
    warmup_epochs: int = 5                 # cosine_warmup only
    image_size: int = 224                  # split-imagenet only: crop size
    mask_fn: Optional[str] = None          # None: threshold for MLPs, topk for ResNets
    density: Optional[float] = None
    er_multiplier: Optional[float] = None
    init: str = "signed_constant"
    inference: str = "oneshot"
    objective: str = "entropy"
    calibration: str = "none"              # per-mask scaling of the α-gradient before the argmin
    infer_images: int = 1
    log_base: float = 2.0
    test_batch_size: int = 128
    eval_at: List[int] = field(default_factory=list)  # also evaluate all learned tasks after these many
    data_root: Optional[str] = None        # None: the MNIST subset embedded in the package
    download: bool = False
    seed: int = 1
    backend: str = "auto"
    device: str = "cpu"
    train_subset: Optional[int] = None     # use only the first N training images per task (smoke runs)
    transfer: bool = False                 # start each task's scores from the running mean of earlier tasks' scores
    mask_budget: int = 2500                # NNs: most masks ever allocated
    nns_epsilon: float = 0.125             # NNs: allocate when K · max softmax(-∇αH) < 1 + ε
    nns_check_every: int = 100             # NNs: training batches between allocation decisions
    nns_score_cache: int = 4               # NNs: masks whose float scores are kept for further training
    hop_gamma: float = 1.5e-3              # HopSupSup: weight of the Hopfield energy in recovery
    hop_recovery_lr: float = 500.0         # HopSupSup: SGD learning rate of the recovery
    hop_recovery_trials: int = 1           # HopSupSup: recoveries per task, each over another test-batch order
    parallel: str = "auto"                 # world size > 1: "task" (GG/GNs/GNu), "data" (DDP; NNs, Transfer); auto picks
    shard_bank: bool = False               # evaluations: each rank holds only its own range of tasks' bits

    # Fields that may change between an interrupted run and its --resume: where and how the run
    # executes, and the evaluation settings and points, none of which shape the masks. Everything that decides
    # the trained bits (lr, iters, epochs, batch size, optimiser, seed, model, output size, mask
    # function, density, scenario, tasks, benchmark, train_subset, transfer, NNs settings...) is fixed.
    RESUMABLE_CHANGES = ("eval_at", "backend", "device", "download", "data_root", "parallel", "shard_bank",
                         "inference", "objective", "calibration", "infer_images", "log_base", "test_batch_size",
                         "hop_gamma", "hop_recovery_lr", "hop_recovery_trials")

    def replace(self, **changes) -> "RunConfig":
        """``dataclasses.replace`` that keeps whether this config has warned (a warning once per run)."""
        new = dataclasses.replace(self, **changes)
        if getattr(self, "_transfer_warned", False):
            new._transfer_warned = True
        return new

    def validate(self) -> "RunConfig":
        """Check (and normalise: numeric strings, ints given for floats) every setting by type and
        range, naming the flag and YAML key. Raises ValueError."""
        for setting in SETTINGS:
            setattr(self, setting.name, _check_field(setting.name, getattr(self, setting.name), setting.kind, setting.rule))
        if self.data_root is not None:  # recorded absolute: `evaluate` of the run works from any folder
            self.data_root = os.path.abspath(os.path.expanduser(self.data_root))
        one_of = _one_of
        one_of("scenario", self.scenario, SCENARIOS)
        one_of("benchmark", self.benchmark, BENCHMARKS)
        one_of("model", self.model, MODELS)
        one_of("optimizer", self.optimizer, OPTIMIZERS)
        one_of("scheduler", self.scheduler, SCHEDULERS)
        one_of("inference", self.inference, INFERENCE_METHODS)
        one_of("objective", self.objective, OBJECTIVES)
        one_of("calibration", self.calibration, CALIBRATIONS)
        if self.calibration != "none" and (self.scenario not in ("GNs", "GNu") or self.inference == "hopfield"
                                           or self.shard_bank):
            raise ValueError(f"--calibration {self.calibration} scales the α-gradients of one-shot or binary task "
                             f"inference in scenarios GNs/GNu without --shard-bank; got --scenario {self.scenario}"
                             f"{' --inference hopfield' if self.inference == 'hopfield' else ''}"
                             f"{' --shard-bank' if self.shard_bank else ''}")
        one_of("parallel", self.parallel, PARALLEL_MODES)
        if self.parallel == "task" and (self.scenario == "NNs" or self.transfer):
            what = "NNs" if self.scenario == "NNs" else "--transfer"
            raise ValueError(f"--parallel task cannot run {what}: each task depends on the ones before it; "
                             f"use --parallel data or auto (data under torchrun, one process without)")
        one_of("init", self.init, WEIGHT_INITS)
        if self.mask_fn is not None:
            one_of("mask_fn", self.mask_fn, MASK_FNS)
        from ..ops.registry import AUTO, _FACTORIES
        one_of("backend", self.backend, [AUTO] + sorted(_FACTORIES))
        try:
            import torch
            device_type = torch.device(self.device).type
        except (RuntimeError, ValueError, TypeError):
            raise ValueError(f"{_flag('device')} must name a torch device (cpu, cuda, cuda:1 ...), "
                             f"got {self.device!r}") from None
        if device_type not in ("cpu", "cuda"):  # the kernels and the runs' device handling cover these two
            raise ValueError(f"{_flag('device')} must be cpu or a CUDA GPU (cuda, cuda:1 ...), got {self.device!r}")
        # Task t's data and permutation draw from numpy's RandomState(seed + t), which takes seeds below 2**32.
        if self.seed + self.tasks > 2 ** 32:
            raise ValueError(f"{_flag('seed')} must be at most 2**32 - {self.tasks} = {2 ** 32 - self.tasks} with "
                             f"--tasks {self.tasks} (task t draws from the seed seed + t, below 2**32), got {self.seed}")
        bad_points = [p for p in self.eval_at if not 1 <= p <= self.tasks]
        if bad_points:
            raise ValueError(f"{_flag('eval_at')} points must lie in [1, {self.tasks}] (--tasks {self.tasks}), "
                             f"got {bad_points}")
        if self.infer_images > self.test_batch_size:
            raise ValueError(f"{_flag('infer_images')} {self.infer_images} exceeds {_flag('test_batch_size')} "
                             f"{self.test_batch_size}: inference uses images of one test batch; raise --test-batch-size "
                             f"or lower --infer-images")
        conv = self.model not in ("fc1024", "lenet", "bnnet")
        mask_fn = self.mask_fn or ("topk" if conv else "threshold")
        if mask_fn == "threshold" and self.model != "bnnet":
            for name in ("density", "er_multiplier"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{_flag(name)} applies to the top-k mask function only; the "
                                     f"{'default ' if self.mask_fn is None else ''}mask function of --model "
                                     f"{self.model} here is threshold (pass --mask-fn topk, or drop {_flag(name)})")
        if self.density is not None and self.er_multiplier is not None:
            raise ValueError("--density (density) and --er-multiplier (er_multiplier) exclude each other: "
                             "the Erdős–Rényi multiplier sets every layer's density")
        if (self.inference == "hopfield") != (self.model == "bnnet"):
            raise ValueError("--inference hopfield (HopSupSup) goes with --model bnnet, and bnnet only with hopfield; "
                             f"got --inference {self.inference} --model {self.model}")
        if self.inference == "hopfield" and self.scenario != "GNu":
            raise ValueError(f"--inference hopfield runs scenario GNu, got --scenario {self.scenario}")
        if self.inference == "hopfield":
            # HopSupSup trains with SGD and a cosine schedule over whole epochs and recovers each mask from
            # its Hopfield network (hop_settings): these settings would be recorded but never used.
            unused = {"optimizer": "sgd", "scheduler": "cosine", "iters": None, "eval_at": [], "objective": "entropy",
                      "infer_images": 1, "log_base": 2.0, "transfer": False, "mask_fn": None, "density": None,
                      "er_multiplier": None}
            given = [_flag(k) + f" {getattr(self, k)!r}" for k, v in unused.items() if getattr(self, k) != v]
            if given:
                raise ValueError(f"--inference hopfield (HopSupSup) does not use {', '.join(given)}: it trains with SGD "
                                 f"and a cosine schedule over whole epochs (--epochs) and recovers each mask from its "
                                 f"Hopfield network; drop {'it' if len(given) == 1 else 'them'}")
        if self.scenario == "NNs" and self.model not in ("fc1024", "lenet"):
            raise ValueError(f"--scenario NNs needs an MLP without per-task BN (fc1024 or lenet), got --model {self.model}")
        if self.scenario == "NNs" and self.transfer:
            raise ValueError("--transfer does not apply to --scenario NNs (a new mask starts from its slot's random scores)")
        if self.scenario in ("GNs", "GNu") and self.transfer and not getattr(self, "_transfer_warned", False):
            self._transfer_warned = True  # once per config (not a field): a run validates it again
            warnings.warn(f"--transfer is the paper's GG setting: under {self.scenario} each mask starts from the earlier "
                          f"masks' mean scores, so later masks look confident on earlier tasks' images and task inference "
                          f"suffers (3 PermutedMNIST tasks, fc1024: 0.755 against 1.000 without)", stacklevel=2)
        fits = BENCHMARK_MODELS[self.benchmark]
        if self.model not in fits:
            raise ValueError(f"--model {self.model} does not fit the inputs of {self.benchmark}; use one of {list(fits)}")
        return self

    # -- the parts each layer below takes: built here, once, from the flat settings -------------
    def train_settings(self) -> TrainSettings:
        return TrainSettings(iters=self.iters, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                             optimizer=self.optimizer, weight_decay=self.weight_decay, scheduler=self.scheduler,
                             warmup_epochs=self.warmup_epochs)

    def eval_settings(self) -> EvalSettings:
        return EvalSettings(scenario=self.scenario, inference=self.inference, objective=self.objective,
                            infer_images=self.infer_images, batch_size=self.test_batch_size, log_base=self.log_base,
                            calibration=self.calibration)

    def nns_settings(self) -> NNsSettings:
        return NNsSettings(check_every=self.nns_check_every, epsilon=self.nns_epsilon, budget=self.mask_budget,
                           score_cache=self.nns_score_cache)

    def hop_settings(self) -> HopSettings:
        # One --weight-decay for training and recovery, as the official code's args.wd
        return HopSettings(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                           recovery_weight_decay=self.weight_decay, gamma=self.hop_gamma,
                           recovery_lr=self.hop_recovery_lr, test_batch_size=self.test_batch_size)

    def resolved_output_size(self, num_labels: int) -> int:
        size = self.output_size if self.output_size is not None else (num_labels if self.scenario == "GG" else max(100, num_labels))
        if size < num_labels:
            raise ValueError(f"--output-size {size} is smaller than the {num_labels} labels of {self.benchmark}; "
                             f"it must be >= {num_labels} (extra neurons are the superfluous neurons)")
        return size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


MASK_FNS = ("threshold", "topk")

# HopSupSup's training settings (configs/hopsupsup_split_mnist.yaml, paper §3.5): the defaults of a
# run with --inference hopfield wherever neither the preset nor a flag sets them. The generic
# defaults (RMSprop lr 1e-4, 1000 iterations) give task inference of about 0.2 instead of 0.95.
HOPFIELD_DEFAULTS = dict(optimizer="sgd", lr=0.1, weight_decay=1e-4, scheduler="cosine", iters=None, epochs=1,
                         batch_size=128, test_batch_size=64)


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')} (YAML key {name})"


def _one_of(name, value, options):
    if value not in options:
        raise ValueError(f"{_flag(name)} must be one of {list(options)}, got {value!r}")


def _as_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{_flag(name)} must be an int, got {value!r} ({type(value).__name__})")
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise ValueError(f"{_flag(name)} must be an int, got the string {value!r}") from None
    return int(value)


def _as_float(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{_flag(name)} must be a number, got {value!r} ({type(value).__name__})")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{_flag(name)} must be a number, got the string {value!r}") from None
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{_flag(name)} must be a finite number, got {value}")
    return value


def _check_field(name, value, kind, rule):
    """One field: ``kind`` int/float/str/bool/intlist (``?`` suffix: None allowed); ``rule`` a
    (test, text) range condition on the converted value, or None."""
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if value is None:
        if optional:
            return None
        raise ValueError(f"{_flag(name)} must be set (expected {kind}), got None")
    if kind == "int":
        value = _as_int(name, value)
    elif kind == "float":
        value = _as_float(name, value)
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{_flag(name)} must be true or false, got {value!r} ({type(value).__name__})")
    elif kind == "str":
        if isinstance(value, Path):
            value = str(value)
        if not isinstance(value, str) or not value:
            raise ValueError(f"{_flag(name)} must be a non-empty string, got {value!r} ({type(value).__name__})")
    elif kind == "intlist":
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{_flag(name)} must be a list of ints, got {value!r} ({type(value).__name__})")
        value = [_as_int(name, v) for v in value]
    if rule is not None and not rule[0](value):
        raise ValueError(f"{_flag(name)} must be {rule[1]}, got {value!r}")
    return value


_POS = (lambda v: v >= 1, "a positive int (>= 1)")
_GT0 = (lambda v: v > 0, "a finite number > 0")
_GE0 = (lambda v: v >= 0, "a finite number >= 0")
_HOPFIELD_HELP = ("task inference: oneshot, binary, or hopfield (HopSupSup, with --model bnnet). With hopfield, "
                  "settings that neither a preset nor a flag gives take configs/hopsupsup_split_mnist.yaml's "
                  "training values: --optimizer sgd --lr 0.1 --weight-decay 1e-4 --scheduler cosine, "
                  "full epochs (--epochs 1, no --iters), --batch-size 128, --test-batch-size 64")


@dataclass(frozen=True)
class Setting:
    """One run setting, declared once: its type (``kind``: int/float/str/bool/intlist, ``?`` for
    None allowed), range rule, choices and help. Validation (``RunConfig.validate``) and the
    command-line flags (``flag_arguments``) both derive from this table."""
    name: str
    kind: str
    rule: Optional[tuple] = None
    help: Optional[str] = None
    choices: Optional[tuple] = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def argparse_kwargs(self, preset: Optional[dict] = None) -> dict:
        """The flag's argparse arguments; its help shows the default (``preset``'s value where it has one)."""
        kind = self.kind.rstrip("?")
        field_ = RunConfig.__dataclass_fields__[self.name]
        default = field_.default if field_.default is not dataclasses.MISSING else field_.default_factory()
        default = (preset or {}).get(self.name, default)
        shown = "" if default is None or default == [] or kind == "bool" else f" [default: {default}]"
        kw = {"help": (self.help or "") + shown}
        if kind == "bool":
            kw.update(action="store_true", default=None)
        elif kind == "intlist":
            kw.update(type=int, nargs="*")
        elif kind in ("int", "float"):
            kw["type"] = int if kind == "int" else float
        if self.choices is not None:
            kw["choices"] = self.choices
        return kw


SETTINGS = [
    Setting("scenario", "str", choices=SCENARIOS),
    Setting("benchmark", "str", choices=tuple(sorted(BENCHMARKS))),
    Setting("model", "str", choices=MODELS),
    Setting("tasks", "int", _POS, "number of tasks"),
    Setting("output_size", "int?", _POS, "output neurons s (>= labels; extras are superfluous neurons; unset: "
                                         "max(100, labels) under GNs/GNu/NNs, the labels under GG)"),
    Setting("iters", "int?", _POS, "training batches per task (at most --epochs passes over its training set)"),
    Setting("epochs", "int", _POS, "cap on passes over a task's training set (ends a task before --iters where the set is small)"),
    Setting("batch_size", "int", _POS),
    Setting("lr", "float", _GT0, "learning rate, finite and > 0 (HopSupSup: 0.1)"),
    Setting("optimizer", "str", choices=OPTIMIZERS),
    Setting("weight_decay", "float", _GE0, "finite and >= 0 (HopSupSup: 1e-4)"),
    Setting("scheduler", "str", choices=SCHEDULERS),
    Setting("warmup_epochs", "int", _POS, "cosine_warmup: epochs of linear warmup (5)"),
    Setting("image_size", "int", _POS, "split-imagenet: training/test crop size (224)"),
    Setting("mask_fn", "str?", None, "threshold (the default for fc1024, lenet, bnnet) or edge-popup top-k (for the ResNets)", choices=MASK_FNS),
    Setting("density", "float?", (lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
            "top-k: fraction of weights kept per layer, in (0, 1] (refused with the threshold mask function)"),
    Setting("er_multiplier", "float?", _GT0, "top-k: Erdős–Rényi per-layer density with multiplier S"),
    Setting("init", "str", choices=WEIGHT_INITS),
    Setting("inference", "str", None, _HOPFIELD_HELP, choices=INFERENCE_METHODS),
    Setting("objective", "str", choices=OBJECTIVES),
    Setting("calibration", "str", None, "task inference: divide each mask's α-gradient by the size of its logits, "
            "from its baseline entropy (entropy) or measured (logit-norm), on its task's training images "
            "(none; GNs/GNu)", choices=CALIBRATIONS),
    Setting("infer_images", "int", _POS, "images of each test batch used to infer its task (1; at most --test-batch-size)"),
    Setting("log_base", "float", (lambda v: v > 1, "a finite number > 1 (binary inference keeps 1/log_base per round)"),
            "binary inference keeps 1/log_base of the tasks per round (> 1; 2)"),
    Setting("test_batch_size", "int", _POS, "test batch size (128; HopSupSup recovery: 64)"),
    Setting("eval_at", "intlist", None, "also evaluate all learned tasks after these many tasks (each in [1, --tasks])"),
    Setting("data_root", "str?", None, "folder with the MNIST IDX files (default: the embedded subset)"),
    Setting("download", "bool", None, "download MNIST into --data-root first"),
    Setting("seed", "int", (lambda v: 0 <= v < 2 ** 63, "an int >= 0")),
    Setting("backend", "str", None, "reference, cpu, triton, cuda or auto"),
    Setting("device", "str", None, "cpu, cuda, cuda:1 ..."),
    Setting("train_subset", "int?", (lambda v: v >= 1, "a positive int (>= 1 images per task)"),
            "train on the first N >= 1 images of each task (smoke runs)"),
    Setting("transfer", "bool", None, "Transfer: start each task's scores from the running mean of the previous tasks' scores"),
    Setting("mask_budget", "int", _POS, "NNs: most masks ever allocated (paper: 2500)"),
    Setting("nns_epsilon", "float", _GE0, "NNs: allocate a mask when K·max softmax(-∇αH) < 1 + ε (2^-3)"),
    Setting("nns_check_every", "int", _POS, "NNs: training batches between allocation decisions (100)"),
    Setting("nns_score_cache", "int", _POS, "NNs: masks whose float scores are kept for further training (4)"),
    Setting("hop_gamma", "float", _GE0, "HopSupSup: weight γ of the Hopfield energy in recovery (1.5e-3)"),
    Setting("hop_recovery_lr", "float", _GT0, "HopSupSup: SGD learning rate of the recovery (500)"),
    Setting("hop_recovery_trials", "int", _POS, "HopSupSup: recoveries per task, each over another test-batch order (1)"),
    Setting("parallel", "str", None, "under torchrun: task (each rank trains whole tasks; GG/GNs/GNu) or data (DDP on one "
            "task; NNs, Transfer, large models); auto picks task where the scenario allows it", choices=PARALLEL_MODES),
    Setting("shard_bank", "bool", None, "under torchrun: each rank holds only its own range of tasks' bits during evaluation"),
]


FIELDS = {f.name for f in dataclasses.fields(RunConfig)}
assert FIELDS == {s.name for s in SETTINGS}, "every RunConfig field needs its Setting (and no Setting is unused)"


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, refusing a mapping that names a key twice (YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        explicit = [key_node for key_node, _ in node.value if key_node.tag != "tag:yaml.org,2002:merge"]
        self.flatten_mapping(node)  # merge keys (<<) first, as SafeLoader does: a merged key may be overridden
        seen = set()
        for key_node in explicit:
            key = self.construct_object(key_node, deep=deep)
            name = key.replace("-", "_") if isinstance(key, str) else key
            if name in seen:  # batch-size and batch_size are one setting
                raise yaml.constructor.ConstructorError(None, None, f"setting {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(name)
        return super().construct_mapping(node, deep)


def load_yaml(path: Union[str, Path]) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} " + ("is a directory, not a YAML file" if path.is_dir() else "does not exist"))
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as exc:
        raise ValueError(f"config file {path} is not UTF-8 text ({exc})") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings")
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise ValueError(f"config file {path}: setting names must be text, got {bad_keys} (YAML reads 1, ~ and true "
                         f"as a number, null and a boolean)")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise ValueError(f"config file {path} has unknown settings {unknown}; known: {sorted(FIELDS)}")
    return data


# Settings of task inference, which GG (each task evaluated with its own mask) never reads.
TASK_INFERENCE_SETTINGS = ("inference", "objective", "infer_images", "log_base", "calibration")


def warn_unused_under_gg(scenario: str, given) -> None:
    """Warn of task-inference settings given explicitly for a GG run or evaluation: they would
    change nothing. (A GG evaluation of a GNu run's masks carries them in its config: not warned.)"""
    unused = [k for k in TASK_INFERENCE_SETTINGS if k in given]
    if scenario == "GG" and unused:
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        warnings.warn(f"--scenario GG evaluates each task with its own mask (no task inference): {flags} "
                      f"{'does' if len(unused) == 1 else 'do'} not apply and {'is' if len(unused) == 1 else 'are'} "
                      f"ignored", stacklevel=3)


def make_config(preset: Optional[dict] = None, overrides: Optional[dict] = None) -> RunConfig:
    values = dict(preset or {})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    tasks = overrides.get("tasks")
    if isinstance(tasks, int) and "eval_at" not in overrides and isinstance(values.get("eval_at"), list):
        # A preset's evaluation points past a smaller --tasks (e.g. a 2,500-task preset run for 10) are dropped.
        kept = [p for p in values["eval_at"] if not isinstance(p, int) or p <= tasks]
        if len(kept) < len(values["eval_at"]):
            warnings.warn(f"--tasks {tasks} drops the preset's --eval-at points past it: "
                          f"{[p for p in values['eval_at'] if p not in kept]}", stacklevel=2)
        values["eval_at"] = kept
    values.update(overrides)
    unknown = sorted(set(values) - FIELDS)
    if unknown:
        raise ValueError(f"unknown settings {unknown}; known: {sorted(FIELDS)}")
    if values.get("inference") == "hopfield":
        for key, value in HOPFIELD_DEFAULTS.items():
            values.setdefault(key, value)
    config = RunConfig(**values).validate()  # refusals first: a warning about a config refused would mislead
    warn_unused_under_gg(config.scenario, overrides)
    if "image_size" in overrides and config.benchmark != "split-imagenet":
        warnings.warn(f"--image-size is the crop size of split-imagenet; --benchmark {config.benchmark} keeps its own "
                      f"images, and the value changes nothing but the run's recorded settings", stacklevel=2)
    return config
