"""Supermask layers, per-task BatchNorm, mask functions and model-wide task control."""
from .bank import MaskBank, TaskRows
from .batchnorm import MultitaskBatchNorm
from .conv import SupermaskConv2d
from .fused_step import InBackwardAdam, InBackwardOptimizer, InBackwardRMSprop, fused_step_unsupported
from .layers import SupermaskLayer
from .linear import SupermaskLinear
from .modes import OneTask, Superposition, Train
from .masks import er_density, kept_count, mask_from_scores, ste_mask, topk_mask
from .tasks import (begin_task, bn_bytes, clear_caches, enable_transfer, transfer_init_scores, finish_task, initial_scores, mask_bytes, mask_entropy_bytes, num_tasks, set_superposition, set_task,
                    set_train_mode, supermask_layers, superposition, task_modules, task_parameters)

__all__ = ["MaskBank", "TaskRows", "MultitaskBatchNorm", "SupermaskConv2d", "SupermaskLayer", "SupermaskLinear",
           "er_density", "kept_count", "clear_caches", "mask_from_scores", "ste_mask", "topk_mask", "begin_task", "bn_bytes",
           "finish_task", "mask_bytes", "num_tasks", "set_superposition", "set_task", "set_train_mode",
           "supermask_layers", "superposition", "task_modules", "task_parameters", "enable_transfer",
           "transfer_init_scores", "initial_scores", "mask_entropy_bytes", "OneTask", "Superposition", "Train",
           "InBackwardAdam", "InBackwardOptimizer", "InBackwardRMSprop", "fused_step_unsupported"]
