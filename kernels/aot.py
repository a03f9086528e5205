"""Ahead-of-time compilation of every kernel for a GPU target, without a GPU: a kernel that cannot
lower for Hopper (sm_90) fails here, in CI, instead of on the first GPU machine.

    python -m supsup_fast.kernels.aot            # compiles all variants for sm_90, prints a table
"""
from __future__ import annotations

import sys
from typing import Dict, List, Tuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import bank, bits, gemm, optim


def _raw(fn):
    """The JITFunction under an autotuner/heuristics wrapper."""
    while not isinstance(fn, triton.runtime.JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def variants() -> List[Tuple[str, str, object, Dict[str, str], Dict[str, object], Dict[str, int]]]:
    """(name, tile, kernel, signature, constexprs, options) for every configuration the launchers
    (and the GEMM autotuners) can use on a GPU."""
    out = []
    add = out.append

    def plain(name, kernel, signature, constexprs):
        add((name, "-", kernel, signature, constexprs, {}))

    for bw in (32,):
        plain("pack_bits", bits.pack_bits_kernel,
              {"mask_ptr": "*u8", "words_ptr": "*i32", "n": "i32", "W": "i32", "num_blocks": "i32", "BLOCK_W": "constexpr"},
              {"BLOCK_W": bw})
    for absolute in (False, True):
        plain(f"compare_pack abs={absolute}", bits.compare_pack_kernel,
              {"values_ptr": "*fp32", "words_ptr": "*i32", "threshold": "fp32", "n": "i32", "W": "i32",
              "num_blocks": "i32", "ABS": "constexpr", "BLOCK_W": "constexpr"}, {"ABS": absolute, "BLOCK_W": 32})
    plain("unpack_bits", bits.unpack_bits_kernel,
          {"words_ptr": "*i32", "out_ptr": "*u8", "n": "i32", "W": "i32", "num_blocks": "i32",
           "BLOCK_N": "constexpr"}, {"BLOCK_N": 1024})
    for dt in ("fp32", "bf16", "fp16"):
        plain(f"masked_weight {dt}", bits.masked_weight_kernel,
              {"w_ptr": f"*{dt}", "words_ptr": "*i32", "out_ptr": f"*{dt}", "n": "i32", "W": "i32", "num_blocks": "i32",
               "BLOCK_N": "constexpr"},
              {"BLOCK_N": 1024})
        plain(f"signed_masked_weight {dt}", bits.signed_masked_weight_kernel,
              {"sign_ptr": "*i32", "words_ptr": "*i32", "out_ptr": f"*{dt}", "scale": "fp32", "n": "i32", "W": "i32",
              "num_blocks": "i32", "BLOCK_N": "constexpr"}, {"BLOCK_N": 1024})
    plain("threshold_masked_weight", bits.threshold_masked_weight_kernel,
          {"s_ptr": "*fp32", "w_ptr": "*fp32", "out_ptr": "*fp32", "numel": "i32", "BLOCK": "constexpr"}, {"BLOCK": 1024})
    plain("ste_rmsprop", optim.ste_rmsprop_kernel,
          {"p_ptr": "*fp32", "dw_ptr": "*fp32", "w_ptr": "*fp32", "sq_ptr": "*fp32", "out_ptr": "*fp32", "numel": "i32",
           "lr": "fp32", "alpha": "fp32", "one_minus_alpha": "fp32", "eps": "fp32", "wd": "fp32", "BLOCK": "constexpr"},
          {"BLOCK": 1024})
    for from_g in (False, True):
        plain(f"ste_adam m_from_g={from_g}", optim.ste_adam_kernel,
              {"p_ptr": "*fp32", "dw_ptr": "*fp32", "w_ptr": "*fp32", "m_ptr": "*fp32", "v_ptr": "*fp32", "out_ptr": "*fp32",
               "numel": "i32", "m_coef": "fp32", "beta2": "fp32", "one_minus_beta2": "fp32", "step_size": "fp32",
               "bc2_sqrt": "fp32", "eps": "fp32", "wd": "fp32", "BLOCK": "constexpr", "M_FROM_G": "constexpr"},
              {"BLOCK": 1024, "M_FROM_G": from_g})
    for active in (False, True):
        plain(f"superpose active={active}", bank.superpose_kernel,
              {"bank_ptr": "*i32", "alpha_ptr": "*fp32", "active_ptr": "*i64", "out_ptr": "*fp32", "k": "i32", "L": "i32",
              "HAS_ACTIVE": "constexpr", "BLOCK_K": "constexpr", "BLOCK_L": "constexpr"},
              {"HAS_ACTIVE": active, "BLOCK_K": 8, "BLOCK_L": 32})
        plain(f"mask_dot active={active}", bank.mask_dot_kernel,
              {"bank_ptr": "*i32", "v_ptr": "*fp32", "active_ptr": "*i64", "partial_ptr": "*fp32", "k": "i32", "L": "i32",
              "HAS_ACTIVE": "constexpr", "BLOCK_K": "constexpr", "BLOCK_L": "constexpr"},
              {"HAS_ACTIVE": active, "BLOCK_K": 16, "BLOCK_L": 32})
        plain(f"mask_dot_batched active={active}", bank.mask_dot_batched_kernel,
              {"bank_ptr": "*i32", "v_ptr": "*fp32", "active_ptr": "*i64", "partial_ptr": "*fp32", "k": "i32", "L": "i32",
              "q": "i32", "words_per_split": "i32", "HAS_ACTIVE": "constexpr", "SPLIT3": "constexpr",
              "BLOCK_K": "constexpr", "BLOCK_Q": "constexpr", "BLOCK_LW": "constexpr"},
              {"HAS_ACTIVE": active, "SPLIT3": True, "BLOCK_K": 64, "BLOCK_Q": 64, "BLOCK_LW": 2})
    for dt, prec in (("fp32", "ieee"), ("fp32", "tf32"), ("bf16", "ieee"), ("fp16", "ieee")):
        for bm, bn, bk, warps, stages in gemm.GPU_TILES:
            opts = {"num_warps": warps, "num_stages": stages}
            tile = f"{bm}x{bn}x{bk}"
            for signed in (False, True):
                out.append((f"masked_linear {dt} {prec} signed={signed}", tile, gemm.masked_linear_kernel,
                            {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "sign_ptr": "*i32", "words_ptr": "*i32", "bias_ptr": f"*{dt}",
                             "y_ptr": f"*{dt}", "M": "i32", "N": "i32", "K": "i32", "W": "i32", "scale": "fp32",
                             "SIGNED": "constexpr", "HAS_BIAS": "constexpr", "PRECISION": "constexpr",
                             "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
                            {"SIGNED": signed, "HAS_BIAS": True, "PRECISION": prec, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, opts))
            out.append((f"masked_linear_dx {dt} {prec}", tile, gemm.masked_linear_dx_kernel,
                        {"g_ptr": f"*{dt}", "w_ptr": f"*{dt}", "words_ptr": "*i32", "dx_ptr": f"*{dt}", "M": "i32", "N": "i32",
                         "K": "i32", "W": "i32", "PRECISION": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                         "BLOCK_K": "constexpr"}, {"PRECISION": prec, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, opts))
            for mul_w, has_mask in ((True, False), (False, True)):
                out.append((f"grad_weight {dt} {prec} mul_w={mul_w} mask={has_mask}", tile, gemm.grad_weight_kernel,
                            {"g_ptr": f"*{dt}", "x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "words_ptr": "*i32", "out_ptr": "*fp32",
                             "M": "i32", "N": "i32", "K": "i32", "W": "i32", "MUL_W": "constexpr", "HAS_MASK": "constexpr",
                             "PRECISION": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
                            {"MUL_W": mul_w, "HAS_MASK": has_mask, "PRECISION": prec,
                             "BLOCK_N": bm, "BLOCK_K": bn, "BLOCK_M": bk}, opts))
    return out


# Shared memory one thread block may use (opt-in maximum): sm_80 163 KB, sm_90 227 KB.
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def compile_all(arch: int = 90, names: Tuple[str, ...] = ()) -> Dict[str, object]:
    """Compile every variant (or those whose name starts with one of ``names``) for sm_<arch>;
    raises if one fails to lower or needs more shared memory than the architecture has."""
    target = GPUTarget("cuda", arch, 32)
    limit = MAX_SHARED.get(arch)
    done, fitting = {}, {}
    for name, tile, kernel, signature, constexprs, options in variants():
        if names and not name.startswith(names):
            continue
        src = ASTSource(fn=_raw(kernel), signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=target, options=options or None)
        done[(name, tile)] = compiled
        fits = limit is None or compiled.metadata.shared <= limit
        fitting[name] = fitting.get(name, False) or fits
        if tile == "-" and not fits:
            raise RuntimeError(f"{name}: needs {compiled.metadata.shared} B of shared memory, sm_{arch} has {limit}")
    # An autotuned GEMM may have tiles that do not fit (the autotuner skips them), but never all.
    none_fit = sorted(n for n, ok in fitting.items() if not ok)
    if none_fit:
        raise RuntimeError(f"no tile of {none_fit} fits the shared memory of sm_{arch}")
    return done


def main(argv=None) -> int:
    arch = int((argv or sys.argv[1:] or ["90"])[0])
    compiled = compile_all(arch)
    limit = MAX_SHARED.get(arch)
    for (name, tile), c in compiled.items():
        note = "" if limit is None or c.metadata.shared <= limit else "  (too big: the autotuner skips it)"
        print(f"sm_{arch}  {name:48s} {tile:12s} {len(c.asm['cubin']):8d} B cubin {c.metadata.shared:7d} B smem{note}")
    print(f"{len(compiled)} kernel variants compiled for sm_{arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
