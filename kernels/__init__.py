"""Triton kernels (installed as ``supsup_fast.kernels``). The Triton backend registers here when
its kernels land; until then the reference and CPU backends serve every op."""
