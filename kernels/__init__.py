"""Triton kernels (installed as ``supsup_fast.kernels``, see setup.py): ``bits`` (pack, unpack,
masked weight, compare-and-pack), ``bank`` (superpose, mask_dot, batched mask_dot), ``gemm``
(fused-unpack GEMMs and the weight-gradient epilogue), ``ops`` (launchers as
``torch.library.triton_op``) and ``aot`` (ahead-of-time compile of every variant for sm_90).
Importing this package needs no Triton; its modules do. ``supsup_fast.ops.backends.triton`` imports
``supsup_fast.kernels.ops`` and is unavailable where Triton is not installed."""
