"""Triton kernels (installed as ``supsup_fast.kernels``): ``bits`` (pack, unpack, masked weight,
compare-and-pack), ``bank`` (superpose, mask_dot, batched mask_dot), ``gemm`` (fused-unpack GEMMs
and the weight-gradient epilogue), ``ops`` (launchers as ``torch.library.triton_op``) and ``aot``
(ahead-of-time compile of every variant for sm_90). ``supsup_fast.ops.triton.TritonBackend``
imports them lazily, so importing the package never needs Triton."""
