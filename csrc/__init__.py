"""C++ sources, installed as ``supsup_fast.csrc`` so the CPU kernels can be compiled on first use."""
