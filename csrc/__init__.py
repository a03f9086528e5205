"""C++/CUDA sources, installed as ``supsup_fast.csrc`` (see setup.py) so the CPU kernels can be
compiled on first use; ``build`` lists the sources and compiler flags."""
