// Plain-pointer CPU kernels on the canonical bit layout (docs/design.md, Bit layout): a row of n bits is packed
// LSB-first into ceil(n/32) int32 words, pad bits zero. No torch header here: the bindings in
// bindings.cpp own threading (at::parallel_for) and argument checks; each kernel processes one
// range of its outer loop so that it can be called from any thread.
#pragma once
#include <cstdint>

// x86 kernels (AVX2, AVX-512) only where the compiler targets x86; elsewhere (ARM, or with
// -DSUPSUP_PORTABLE on x86: the test of the portable build) only the scalar kernels are compiled,
// and detect_isa() answers Scalar.
#if (defined(__x86_64__) || defined(__i386__)) && !defined(SUPSUP_PORTABLE)
#define SUPSUP_X86 1
#else
#define SUPSUP_X86 0
#endif

namespace supsup_cpu {

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// Best ISA of this CPU, lowered by the environment variable SUPSUP_CPU_ISA=scalar|avx2|avx512.
Isa detect_isa();
const char* isa_name(Isa isa);
// "intel", "amd" or "other": some block sizes and limits were measured per vendor.
const char* cpu_vendor();

// The x86 family number (cpuid leaf 1 with its extended family; 0 elsewhere): AMD's names the core
// generation (0x19 Zen 3 / Zen 4, 0x1A Zen 5).
int cpu_family();

// Whether the task-interleaved table loops (lut_interleaved.cpp) prefetch their bits a few KiB ahead:
// on by default on Intel CPUs, where superpose and mask_dot over the copies measured 1.3-2x faster
// with it (the hardware prefetchers alone left the loop waiting on DRAM), and on AMD Zen 5 (family
// 0x1A), where the same ops over the copies at k = 2,500 ran 1.2-1.45x faster with AVX-512 and
// 1.03-1.16x in most pairs with AVX2 (the one-shot query 1.1-1.9x); off elsewhere (not measured on
// the AMD Zen 4 VM, whose figures are from the loop without it); SUPSUP_CPU_PREFETCH=1 or 0 forces
// it. Read once.
bool stream_prefetch();

// Where those prefetches put the bits: into L2 (prefetcht2) on Intel CPUs, into L1 (prefetcht0)
// elsewhere. On a second Intel Xeon VM (2026-12-07, 480 MiB L3, where the loops without any
// prefetch ran 1.4x (AVX-512) and 2.6x (AVX2) slower), prefetching into L2 made mask_dot over the
// copies at k = 2,500 1.1x faster with AVX-512 (superpose level) and superpose / mask_dot 1.05-1.2x
// with AVX2 (alternating processes): a prefetch into L1 holds one of the core's few fill buffers
// until its line arrives.
// Not measured on AMD CPUs, which keep L1. SUPSUP_CPU_PREFETCH_L2=1 or 0 forces it. Read once.
bool stream_prefetch_l2();

// Whether the AVX2 table loops over the task-interleaved copies (lut_interleaved.cpp stream256) form
// their 3-bit indices by plain shifts into four partial sums (on by default on Intel, where shifts,
// multiplies and vpermps share ports 0, 1 and 5) or by multiply-highs into two (elsewhere: on Zen 4
// the multiplies issue on other pipes); SUPSUP_CPU_SHIFT_INDICES=1 or 0 forces it. Read once.
bool shift_indices();

// Whether the AVX-512 packed masked GEMM (masked_gemm.cpp) may take its 64 x 6 tile where a thread
// has 256+ outputs and x 128+ rows (on by default on Intel, where it measured 1.03-1.18x faster
// there; off elsewhere: the 32 x 12 tile's blocks were tuned on the AMD Zen 4 VM, where the wide one
// was not measured), and from 512 rows of x blocks of about 512 KiB of packed panels rather than 128 KiB;
// SUPSUP_CPU_WIDE_TILES=1 or 0 forces both. Read once.
bool wide_gemm_tiles();

// Whether the AVX2 packed masked GEMM (masked_gemm.cpp) packs K in chunks of at most 256 (on
// by default on Intel CPUs, where it measured 1.01-1.07x faster at 32-128 rows of x) or whole rows of
// up to 2,048 (elsewhere: the AMD Zen 4 VM measured whole rows faster, with its blocks of the time);
// SUPSUP_CPU_SHORT_CHUNKS=1 or 0 forces it. Read once.
bool short_gemm_chunks();

// mask bool[rows, n] -> words[rows, W]; rows [r0, r1).
void pack_rows(const bool* mask, int64_t n, int64_t W, int32_t* words, int64_t r0, int64_t r1);
// words[rows, W] -> bool[rows, n]; rows [r0, r1).
void unpack_rows(const int32_t* words, int64_t n, int64_t W, bool* out, int64_t r0, int64_t r1);
// The masks of the transposed weights: matrices [m0, m1) of words [*, R, ceil(n/32)] (bits M[r, c]) ->
// out [*, n, ceil(R/32)] (bits Mᵀ[c, r]), pad bits zero.
void transpose_masks(const int32_t* words, int64_t R, int64_t n, int32_t* out, int64_t m0, int64_t m1);

// out[t] = sum over the flat words [fw0, fw1) of the R*W words of a task (row = fw / W) of
// bit(bank[task(t), row, j]) * v[row, j], for all t < k. bank is [*, R, W]; v is [R, n] (float);
// task(t) = active ? active[t] : t. Threads split the words; the caller adds their partial sums.
void mask_dot(Isa isa, const int32_t* bank, int64_t R, int64_t W, int64_t n, const float* v,
              const int64_t* active, int64_t k, float* out, int64_t fw0, int64_t fw1);

constexpr int64_t kMaskDotChunkWords = 512;  // split granularity of the word range across threads

// mask_dot with v = (g xᵀ) ⊙ w computed on the fly (the α-gradient of a one-image backward through a
// linear layer: g [R], x [n], w [R, n]); with skip_zero_rows (x and w finite) the rows with g[r] == 0
// are not read. Returns false below 4 tasks, where the tables do not pay: the caller then
// materialises v.
bool mask_dot_rank1(Isa isa, const int32_t* bank, int64_t R, int64_t W, int64_t n, const float* g, const float* x,
                    const float* w, int64_t k, float* out, int64_t fw0, int64_t fw1, bool skip_zero_rows);

// out[row, j] = sum over t of alpha[t] * bit(bank[task(t), row, j]) for rows [r0, r1); out is [R, n].
void superpose(Isa isa, const int32_t* bank, int64_t k, int64_t W, int64_t n, int64_t R,
               const float* alpha, const int64_t* active, float* out, int64_t r0, int64_t r1);

// out[row, j] = w[row, j] * bit(words[row, j]) for rows [r0, r1); w and out are [R, n].
void masked_weight(Isa isa, const float* w, const int32_t* words, int64_t n, int64_t W, float* out,
                   int64_t r0, int64_t r1);

// x [B, n] -> xt [W][B][32], zero-padded: the layout the small-batch AVX-512 kernels read.
void transpose_small_batch(const float* x, int64_t B, int64_t n, int64_t W, float* xt);

// Small-batch masked GEMM: y[b, row] = sum_j x[b, j] * w[row, j] * bit(words[row, j]) (+ bias[row]),
// b < B (B <= 16), rows [r0, r1). x is [B, n] (scalar path), xt its transpose_small_batch (AVX-512
// path); y is [B, R].
void masked_gemm_small(Isa isa, const float* x, const float* xt, int64_t B, const float* w, const int32_t* words,
                       int64_t n, int64_t W, int64_t R, const float* bias, float* y, int64_t r0, int64_t r1);

// Signed-constant weights kept as bits: w[row, j] = scale * (sign bit ? +1 : -1).
// y[b, row] = scale * sum_j x[b, j] * (+1 | -1) * bit(mask) (+ bias), B <= 16, rows [r0, r1).
void signed_masked_gemm_small(Isa isa, const float* x, const float* xt, int64_t B, const int32_t* sign_words,
                              const int32_t* mask_words, float scale, int64_t n, int64_t W, int64_t R,
                              const float* bias, float* y, int64_t r0, int64_t r1);

// Masked GEMM for any batch (masked_gemm.cpp): y[b, row] = sum_j x[b, j] * w[row, j] * bit(words[row, j])
// (+ bias[row]) for b < B, rows [r0, r1); x is [B, n], y is [B, R]. W ⊙ M is packed per cache block,
// never materialised whole.
void masked_gemm(Isa isa, const float* x, int64_t B, const float* w, const int32_t* words, int64_t n, int64_t W,
                 int64_t R, const float* bias, float* y, int64_t r0, int64_t r1);
// The same with signed-constant weights kept as bits: w[row, j] = scale * (sign bit ? +1 : -1).
void signed_masked_gemm(Isa isa, const float* x, int64_t B, const int32_t* sign_words, const int32_t* mask_words,
                        float scale, int64_t n, int64_t W, int64_t R, const float* bias, float* y, int64_t r0,
                        int64_t r1);
// The same with the weight's rows taken as they are: y[b, col] = sum_j x[b, j] * w[j, col] * bit(words[j, col])
// for columns [r0, r1) of y [B, R]; w is [n, R] with W = ceil(R / 32) words a row (a layer's input gradient).
void masked_gemm_rows(Isa isa, const float* x, int64_t B, const float* w, const int32_t* words, int64_t n, int64_t W,
                      int64_t R, float* y, int64_t r0, int64_t r1);
void signed_masked_gemm_rows(Isa isa, const float* x, int64_t B, const int32_t* sign_words, const int32_t* mask_words,
                             float scale, int64_t n, int64_t W, int64_t R, float* y, int64_t r0, int64_t r1);

}  // namespace supsup_cpu

namespace supsup_cpu {
// The optimiser steps of optim.cpp. Their scalars are computed by the caller in double and rounded
// once, as torch does: one_minus_alpha = 1 - alpha; Adam's step_size = lr / (1 - beta1^step) and
// bias_correction2_sqrt = sqrt(1 - beta2^step).
struct RmspropScalars {
  float lr, alpha, one_minus_alpha, eps, weight_decay;
};
// exp_avg moves to g as torch's lerp(m, g, w = 1 - beta1) does: m + w (g - m) for w < 0.5, else
// g + (w - 1)(g - m) (no cancellation where w is near 1): m_new = m_base + m_coef (g - m).
struct AdamScalars {
  float one_minus_beta1, beta2, one_minus_beta2, step_size, bias_correction2_sqrt, eps, weight_decay;
  float m_coef;
  bool m_from_g;
};
// One RMSprop step (torch.optim.RMSprop without momentum or centering) in one pass:
// g = grad + wd * p; sq = alpha * sq + (1 - alpha) * g * g; p -= lr * g / (sqrt(sq) + eps).
void rmsprop_step(Isa isa, float* param, const float* grad, float* square_avg, const RmspropScalars& c, int64_t i0,
                  int64_t i1);
// The straight-through steps of a threshold supermask layer, one pass each, which also write the next
// step's masked weight: g = weight_grad * w + wd * p (the score gradient dL/dW_eff ⊙ W), the RMSprop
// (or Adam, no amsgrad) rule on p, then masked_weight = p_new >= 0 ? w : 0.
void ste_rmsprop_step(Isa isa, float* param, const float* weight_grad, const float* weight, float* square_avg,
                      float* masked_weight, const RmspropScalars& c, int64_t i0, int64_t i1);
void ste_adam_step(Isa isa, float* param, const float* weight_grad, const float* weight, float* exp_avg,
                   float* exp_avg_sq, float* masked_weight, const AdamScalars& c, int64_t i0, int64_t i1);
// The frozen weight of a layer whose masks are kept as bits (W = ceil(in_features / 32) words a row):
// float (`weight`, [out, in]), or signed-constant bits (`sign_words`, w = sign bit ? scale : -scale).
struct FrozenWeight {
  const float* weight;
  const int32_t* sign_words;
  float scale;
  int64_t in_features, words_per_row;
};
// ste_rmsprop_step on row o, columns [j, j + cols) of an [O, I] layer whose mask is kept as bits:
// weight_grad holds that segment's weight gradient, param and square_avg are the [O, I] arrays, and
// the new mask (p_new >= 0) is written into mask_words [O, W] instead of a masked weight.
void ste_rmsprop_bits_step(Isa isa, float* param, const float* weight_grad, const FrozenWeight& fw, float* square_avg,
                           int32_t* mask_words, const RmspropScalars& c, int64_t o, int64_t j, int64_t cols);
// ste_rmsprop_step with the weight gradient formed in place (wgrad_step.cpp, AVX-512): weight_grad[o, i]
// = sum over b < B of dz[b, o] * x[b, i] (dz [B, O], x [B, I]), one register tile at a time, never
// stored; rows [o0, o1) of the [O, I] param, weight, square_avg and masked_weight. xp is x packed by
// wgrad_pack_x: ceil(I / wgrad_tile_cols()) panels of [B][wgrad_tile_cols()], panels [t0, t1) per call.
int64_t wgrad_tile_cols();
void wgrad_pack_x(const float* x, int64_t B, int64_t I, float* xp, int64_t t0, int64_t t1);
void ste_rmsprop_wgrad_avx512(const float* dz, const float* xp, int64_t B, int64_t O, int64_t I, float* param,
                              const float* weight, float* square_avg, float* masked_weight, const RmspropScalars& c,
                              int64_t o0, int64_t o1);
// The same for a layer whose masks are bits (ste_rmsprop_bits_step).
void ste_rmsprop_bits_wgrad_avx512(const float* dz, const float* xp, int64_t B, int64_t O, int64_t I, float* param,
                                   const FrozenWeight& fw, float* square_avg, int32_t* mask_words, const RmspropScalars& c,
                                   int64_t o0, int64_t o1);
}  // namespace supsup_cpu

namespace supsup_cpu {
// out[i] = scores[i] >= 0 ? w[i] : 0 (the threshold supermask applied to the weight, one pass).
void threshold_masked_weight(Isa isa, const float* scores, const float* w, float* out, int64_t i0, int64_t i1);
}  // namespace supsup_cpu

namespace supsup_cpu {
// out[row, j] = bit(mask) ? scale * (bit(sign) ? +1 : -1) : 0 for rows [r0, r1); out is [R, n]:
// a signed-constant layer's masked weight, built from 2 bits per weight.
void signed_masked_weight(Isa isa, const int32_t* sign_words, const int32_t* mask_words, float scale, int64_t n,
                          int64_t W, float* out, int64_t r0, int64_t r1);
}  // namespace supsup_cpu

namespace supsup_cpu {
// Rows [r0, r1) of z [*, C] (logits) with their labels: dz[r, c] = scale * (softmax(z[r])[c] - [c ==
// labels[r]]) (scale = 1 / batch for the mean), and the return value is the sum over those rows of
// -log softmax(z[r])[labels[r]] (cross_entropy.cpp). Finite logits only: the caller checks the sum.
double softmax_cross_entropy_rows(Isa isa, const float* z, int64_t C, const int64_t* labels, float scale, float* dz,
                                  int64_t r0, int64_t r1);
}  // namespace supsup_cpu
