"""Run configuration: defaults < YAML preset < command-line flags."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Union

import yaml

from ..algorithms.evaluation import SCENARIOS
from ..algorithms.inference import METHODS

INFERENCE_METHODS = METHODS + ("hopfield",)
PARALLEL_MODES = ("auto", "task", "data")
from ..algorithms.objectives import OBJECTIVES
from ..algorithms.training import OPTIMIZERS, SCHEDULERS
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
                         "inference", "objective", "infer_images", "log_base", "test_batch_size",
                         "hop_gamma", "hop_recovery_lr", "hop_recovery_trials")

    def validate(self) -> "RunConfig":
        """Check (and normalise: numeric strings, ints given for floats) every setting by type and
        range, naming the flag and YAML key. Raises ValueError."""
        for name, kind, rule in _SPEC:
            setattr(self, name, _check_field(name, getattr(self, name), kind, rule))
        one_of = _one_of
        one_of("scenario", self.scenario, SCENARIOS)
        one_of("benchmark", self.benchmark, BENCHMARKS)
        one_of("model", self.model, MODELS)
        one_of("optimizer", self.optimizer, OPTIMIZERS)
        one_of("scheduler", self.scheduler, SCHEDULERS)
        one_of("inference", self.inference, INFERENCE_METHODS)
        one_of("objective", self.objective, OBJECTIVES)
        one_of("parallel", self.parallel, PARALLEL_MODES)
        one_of("init", self.init, WEIGHT_INITS)
        if self.mask_fn is not None:
            one_of("mask_fn", self.mask_fn, MASK_FNS)
        from ..ops.registry import AUTO, _FACTORIES
        one_of("backend", self.backend, [AUTO] + sorted(_FACTORIES))
        try:
            import torch
            torch.device(self.device)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"{_flag('device')} must name a torch device (cpu, cuda, cuda:1 ...), "
                             f"got {self.device!r}") from None
        bad_points = [p for p in self.eval_at if not 1 <= p <= self.tasks]
        if bad_points:
            raise ValueError(f"{_flag('eval_at')} points must lie in [1, {self.tasks}] (--tasks {self.tasks}), "
                             f"got {bad_points}")
        if self.infer_images > self.test_batch_size:
            raise ValueError(f"{_flag('infer_images')} {self.infer_images} exceeds {_flag('test_batch_size')} "
                             f"{self.test_batch_size}: inference uses images of one test batch; raise the test "
                             f"batch size or lower --infer-images")
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
        if self.scenario == "NNs" and self.model not in ("fc1024", "lenet"):
            raise ValueError(f"--scenario NNs needs an MLP without per-task BN (fc1024 or lenet), got --model {self.model}")
        if self.scenario == "NNs" and self.transfer:
            raise ValueError("--transfer does not apply to --scenario NNs (a new mask starts from its slot's random scores)")
        fits = BENCHMARK_MODELS[self.benchmark]
        if self.model not in fits:
            raise ValueError(f"--model {self.model} does not fit the inputs of {self.benchmark}; use one of {list(fits)}")
        return self

    def nns_settings(self):
        from ..algorithms.nns import NNsSettings
        return NNsSettings(check_every=self.nns_check_every, epsilon=self.nns_epsilon, budget=self.mask_budget,
                           score_cache=self.nns_score_cache)

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
_SPEC = [
    ("scenario", "str", None), ("benchmark", "str", None), ("model", "str", None),
    ("tasks", "int", _POS), ("output_size", "int?", _POS), ("iters", "int?", _POS), ("epochs", "int", _POS),
    ("batch_size", "int", _POS), ("lr", "float", _GT0), ("optimizer", "str", None), ("weight_decay", "float", _GE0),
    ("scheduler", "str", None), ("warmup_epochs", "int", _POS), ("image_size", "int", _POS),
    ("mask_fn", "str?", None), ("density", "float?", (lambda v: 0 < v <= 1, "a fraction in (0, 1]")),
    ("er_multiplier", "float?", _GT0), ("init", "str", None), ("inference", "str", None),
    ("objective", "str", None), ("infer_images", "int", _POS),
    ("log_base", "float", (lambda v: v > 1, "a finite number > 1 (binary inference keeps 1/log_base per round)")),
    ("test_batch_size", "int", _POS), ("eval_at", "intlist", None), ("data_root", "str?", None),
    ("download", "bool", None), ("seed", "int", (lambda v: 0 <= v < 2 ** 63, "an int >= 0")),
    ("backend", "str", None), ("device", "str", None),
    ("train_subset", "int?", (lambda v: v >= 1, "a positive int (>= 1 images per task)")),
    ("transfer", "bool", None), ("mask_budget", "int", _POS), ("nns_epsilon", "float", _GE0),
    ("nns_check_every", "int", _POS), ("nns_score_cache", "int", _POS), ("hop_gamma", "float", _GE0),
    ("hop_recovery_lr", "float", _GT0), ("hop_recovery_trials", "int", _POS), ("parallel", "str", None),
    ("shard_bank", "bool", None),
]


FIELDS = {f.name for f in dataclasses.fields(RunConfig)}


def load_yaml(path: Union[str, Path]) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise ValueError(f"config file {path} has unknown settings {unknown}; known: {sorted(FIELDS)}")
    return data


def make_config(preset: Optional[dict] = None, overrides: Optional[dict] = None) -> RunConfig:
    values = dict(preset or {})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(values) - FIELDS)
    if unknown:
        raise ValueError(f"unknown settings {unknown}; known: {sorted(FIELDS)}")
    if values.get("inference") == "hopfield":
        for key, value in HOPFIELD_DEFAULTS.items():
            values.setdefault(key, value)
    return RunConfig(**values).validate()
