// Plain-pointer CUDA kernels of supsup_fast and their launchers. No torch header: each .cu file
// compiles alone with `nvcc -c -arch=sm_90`. The torch bindings live in bindings.cpp.
//
// Bit layout (canonical): a mask over [rows, n] is packed LSB-first along n into int32 words,
// W = ceil(n / 32) per row, pad bits zero; a bank of k masks is [k, L] words, task-major.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace supsup_cuda {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// (<M_i, v>)_i, one partial per (word chunk, task): partial [chunks, k] (chunks = mask_dot_chunks(L)).
// Shared-memory nibble tables: per chunk of 32 words the block builds, for every 4 consecutive v
// entries, the 16 sums over their subsets; a task's word then costs 8 table lookups and 8 adds.
// The 32 lanes of a warp take 32 tasks at the same word, so they read the same table row
// (conflict-free: distinct entries sit in distinct banks, equal ones broadcast).
int64_t mask_dot_chunks(int64_t L);
cudaError_t launch_mask_dot(const int32_t* bank, const float* v, const int64_t* active, float* partial,
                            int64_t k, int64_t L, cudaStream_t stream);

// out[32 l + b] = sum_i alpha_i * bit b of word l of task i (active: optional row list).
cudaError_t launch_superpose(const int32_t* bank, const float* alpha, const int64_t* active, float* out,
                             int64_t k, int64_t L, cudaStream_t stream);

// y [B, N] = scale * x [B, K] (sign ⊙ mask)ᵀ (+ bias), B <= 16, weights read as two bit planes.
cudaError_t launch_signed_gemv(const float* x, const int32_t* sign_words, const int32_t* mask_words,
                               const float* bias, float* y, int64_t B, int64_t N, int64_t K, float scale,
                               cudaStream_t stream);

// out = W ⊙ M for a weight [rows, n] (canonical order). channels_last: W is a conv weight
// [O, C, kh, kw] and out is written in channels-last memory order (O, kh, kw, C).
cudaError_t launch_masked_weight(const void* weight, const int32_t* words, void* out, DType dtype,
                                 int64_t rows, int64_t n, int64_t channels, int64_t khw, bool channels_last,
                                 cudaStream_t stream);

}  // namespace supsup_cuda
