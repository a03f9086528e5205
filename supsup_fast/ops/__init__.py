"""The public op contract (docs/design.md, Op contract).

One module per op family (``bits``, ``bank``, ``masked``, ``superposed``, ``signed``), each holding
its ``torch.ops.supsup.*`` custom op (fake implementation, autograd) and the public function that
normalises Python arguments. The backends (``backends/``: reference, cpu, triton, cuda) register
beneath them with :mod:`.registry`; ``dispatch`` picks one per call. ``inference`` holds task
inference's MLP forward (``mlp_logit_gradients``), and ``bank`` its backward (``mlp_mask_dot_outer``):
eager fast paths over the ops, one C++ call each on the cpu backend, not registered ops."""
from . import backends  # noqa: F401  (registers the backends)
from . import checks
from .bank import bank_linear, interleave_tasks, interleave_weights, mask_dot, mask_dot_batched, mask_dot_outer, mask_dot_outer_interleaved, mlp_mask_dot_outer, superpose
from .bits import pack_bits, transpose_masks, unpack_bits
from .inference import logit_gradients, mlp_logit_gradients
from .masked import masked_conv2d, masked_linear, mlp_cross_entropy_grads, ste_adam_step_, ste_rmsprop_step_, threshold_masked_weight
from .registry import available, backend_for, get_backend_name, register_backend, set_backend, use_backend
from .signed import signed_masked_linear
from .superposed import superposed_conv2d, superposed_linear, superposed_with_s

__all__ = ["signed_masked_linear", "pack_bits", "unpack_bits", "transpose_masks", "masked_linear", "masked_conv2d", "superpose", "mask_dot",
           "mask_dot_batched", "mask_dot_outer", "mask_dot_outer_interleaved", "mlp_mask_dot_outer", "mlp_logit_gradients", "logit_gradients", "interleave_tasks", "interleave_weights", "bank_linear", "superposed_linear", "superposed_conv2d", "superposed_with_s", "threshold_masked_weight",
           "ste_rmsprop_step_", "ste_adam_step_", "mlp_cross_entropy_grads", "checks", "available", "backend_for", "get_backend_name", "register_backend", "set_backend", "use_backend"]
