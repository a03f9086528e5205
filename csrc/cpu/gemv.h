// Small-batch GEMV/GEMM on an elementwise-scaled weight W ⊙ S without materialising it (the
// superposed forward and input gradient of one-image task inference: S = Σᵢ αᵢ Mᵢ, often the
// cached count of set bits / k). Plain pointers, no torch header.
#pragma once
#include <cstdint>

#include "kernels.h"

namespace supsup_cpu {

// y[b, r] = sum_j x[b, j] * w[r, j] * s[r, j] (+ bias[r]) for b < B, rows [r0, r1); x [B, n], y [B, R].
void scaled_gemm_small(Isa isa, const float* x, int64_t B, const float* w, const float* s, int64_t n, int64_t R,
                       const float* bias, float* y, int64_t r0, int64_t r1);

// dx[b, j] = sum_r g[b, r] * w[r, j] * s[r, j] for b < B, columns [j0, j1); g [B, R], dx [B, n].
void scaled_gemm_small_t(Isa isa, const float* g, int64_t B, const float* w, const float* s, int64_t n, int64_t R,
                         float* dx, int64_t j0, int64_t j1);

}  // namespace supsup_cpu
