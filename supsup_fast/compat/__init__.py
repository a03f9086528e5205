"""Run code written against the official SupSup (RAIVNLab/supsup) on packed bits and fused ops.

Change one import::

    from supsup_fast.compat import MultitaskMaskLinear, set_model_task, cache_masks, set_num_tasks_learned, set_alphas

and the notebook's training and one-shot inference run unchanged; finished tasks are stored as
1 bit per weight and the superposed forward / α-gradient go through ``supsup_fast.ops``.
"""
from .bn import MultitaskNonAffineBN
from .checkpoint import load_official_checkpoint, official_state_dict, save_official_checkpoint
from .helpers import (cache_masks, clear_masks, freeze_model_scores, freeze_model_weights, set_alphas, set_mask,
                      set_model_task, set_num_tasks_learned, unfreeze_model_scores, unfreeze_model_weights)
from .layers import (FastMultitaskMaskConv, MultitaskMaskConv, MultitaskMaskLinear, MultitaskMaskMixin,
                     StackedFastMultitaskMaskConv)
from .settings import configure

__all__ = ["MultitaskMaskLinear", "MultitaskMaskConv", "FastMultitaskMaskConv", "StackedFastMultitaskMaskConv",
           "MultitaskMaskMixin",
           "MultitaskNonAffineBN", "set_model_task", "cache_masks", "clear_masks", "set_mask",
           "set_num_tasks_learned", "set_alphas", "freeze_model_weights", "unfreeze_model_weights",
           "freeze_model_scores", "unfreeze_model_scores", "configure", "load_official_checkpoint",
           "official_state_dict", "save_official_checkpoint"]
