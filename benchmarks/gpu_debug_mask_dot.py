"""GPU probe (run once on the lent H200): how far the Triton batched mask_dot (bf16x3 on tensor cores)
is from the fp32 reference and from the float64 sum, for the tolerance in tests/kernels/test_triton.py."""
import argparse

import torch
from supsup_fast.ops.backends.reference import ReferenceBackend
from supsup_fast.ops.backends.triton import TritonBackend


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_debug_mask_dot.py needs a CUDA GPU")
    R, T = ReferenceBackend(), TritonBackend()
    g = torch.Generator().manual_seed(0)
    for k, q, n in [(3, 1, 33), (70, 5, 784), (5, 17, 1000), (5, 17, 1024), (5, 16, 1000), (64, 64, 4096)]:
        bank = R.pack_bits(torch.rand(k, 2, n, generator=g) < 0.5).cuda()
        v = torch.randn(q, 2, n, generator=g).cuda()
        expect = torch.stack([R.mask_dot(bank.cpu(), v[j].cpu()) for j in range(q)]).double()
        exact = torch.stack([(torch.stack([R.unpack_bits(bank.cpu()[i], n) for i in range(k)]).double()
                              * v[j].cpu().double()).sum((1, 2)) for j in range(q)])
        got = T.mask_dot_batched(bank, v).cpu().double()
        vi = torch.randint(-8, 9, (q, 2, n), generator=g).float().cuda()
        int_ok = torch.equal(T.mask_dot_batched(bank, vi).cpu(), R.mask_dot_batched(bank.cpu(), vi.cpu()))
        print(f"k={k} q={q} n={n}: |triton-ref| max {(got - expect).abs().max():.3e}  |triton-exact| {(got - exact).abs().max():.3e}"
              f"  |ref-exact| {(expect - exact).abs().max():.3e}  max|x| {exact.abs().max():.1f}  ints equal {int_ok}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
