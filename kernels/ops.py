"""The launchers (each beside its kernel in ``bits``, ``bank``, ``gemm``, ``optim``), registered as ``torch.library.triton_op`` (namespace ``supsup_triton``) so
``torch.compile`` sees the kernels. The public ``supsup::*`` ops (fake impls, autograd) dispatch
to these through :class:`supsup_fast.ops.backends.triton.TritonBackend`.

Under ``TRITON_INTERPRET=1`` the same launchers run on CPU tensors (tests): large tiles, one
autotune config, and fp16/bf16 computed in fp32 (the interpreter's low-precision ``tl.dot`` is wrong).
"""
from .bank import mask_dot, mask_dot_batched, superpose
from .bits import compare_pack, masked_weight, pack_bits, signed_masked_weight, threshold_masked_weight, unpack_bits
from .common import INTERPRET
from .gemm import grad_weight, masked_linear, masked_linear_dx
from .optim import ste_adam_step_, ste_rmsprop_step_

__all__ = ["INTERPRET", "pack_bits", "compare_pack", "unpack_bits", "masked_weight", "signed_masked_weight",
           "threshold_masked_weight", "superpose", "mask_dot", "mask_dot_batched", "masked_linear", "masked_linear_dx",
           "grad_weight", "ste_rmsprop_step_", "ste_adam_step_"]
