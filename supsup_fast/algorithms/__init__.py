"""SupSup training, task inference, evaluation and whole runs."""
from .evaluation import SCENARIOS, EvalSettings, evaluate_task
from .inference import (METHODS, alpha_gradient, alpha_gradients_batched, infer_binary, infer_oneshot,
                        infer_oneshot_batched, infer_task)
from .nns import MaskAllocator, NNsSettings
from .objectives import OBJECTIVES, entropy, superfluous
from .training import TrainSettings, train_task

__all__ = ["SCENARIOS", "EvalSettings", "evaluate_task", "METHODS", "alpha_gradient", "alpha_gradients_batched",
           "infer_binary", "infer_oneshot", "infer_oneshot_batched", "infer_task", "MaskAllocator", "NNsSettings", "OBJECTIVES", "entropy", "superfluous", "TrainSettings", "train_task"]
