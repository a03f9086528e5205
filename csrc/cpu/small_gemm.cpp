// Small-batch GEMM (batch <= 16) over one packed mask, with float or signed-constant weights.
#include "kernels.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace supsup_cpu {

namespace {

void masked_gemm_small_scalar(const float* x, int64_t B, const float* w, const int32_t* words, int64_t n,
                              int64_t W, int64_t R, const float* bias, float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = 0; b < B; ++b) {
      float acc = 0.0f;
      for (int64_t j = 0; j < n; ++j)
        if ((static_cast<uint32_t>(words[r * W + j / 32]) >> (j % 32)) & 1u) acc += x[b * n + j] * w[r * n + j];
      y[b * R + r] = acc + (bias ? bias[r] : 0.0f);
    }
}

void signed_gemm_small_scalar(const float* x, int64_t B, const int32_t* sign_words, const int32_t* mask_words,
                              float scale, int64_t n, int64_t W, int64_t R, const float* bias, float* y, int64_t r0,
                              int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = 0; b < B; ++b) {
      float acc = 0.0f;
      for (int64_t j = 0; j < n; ++j) {
        const uint32_t shift = j % 32;
        if ((static_cast<uint32_t>(mask_words[r * W + j / 32]) >> shift) & 1u) {
          const bool pos = (static_cast<uint32_t>(sign_words[r * W + j / 32]) >> shift) & 1u;
          acc += pos ? x[b * n + j] : -x[b * n + j];
        }
      }
      y[b * R + r] = scale * acc + (bias ? bias[r] : 0.0f);
    }
}

// Small-batch GEMM on AVX2, reading the same transposed xt[W][B][32] layout as the AVX-512 path:
// each byte of the mask word becomes an 8-lane mask (bits8), applied to the weights (or to ±scale
// built from the sign bits) before the FMAs.
template <bool SIGNED>
AVX2_TARGET void gemm_small_avx2(const float* xt, int64_t B, const float* w, const int32_t* sign_words,
                                 const int32_t* words, float scale, int64_t n, int64_t W, int64_t R,
                                 const float* bias, float* y, int64_t r0, int64_t r1) {
  const __m256 plus = _mm256_set1_ps(scale), minus = _mm256_set1_ps(-scale);
  float buf[32];
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t b0 = 0; b0 < B; b0 += 4) {
      const int64_t bt = std::min<int64_t>(4, B - b0);
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t q = 0; q < W; ++q) {
        const uint32_t word = static_cast<uint32_t>(words[r * W + q]) & valid_bits(n, q);
        __m256 wv[4];
        if (SIGNED) {
          const uint32_t sgn = static_cast<uint32_t>(sign_words[r * W + q]);
          for (int c = 0; c < 4; ++c)
            wv[c] = _mm256_and_ps(bits8((word >> (8 * c)) & 0xFF),
                                  _mm256_blendv_ps(minus, plus, bits8((sgn >> (8 * c)) & 0xFF)));
        } else {
          const int64_t len = std::min<int64_t>(32, n - 32 * q);
          const float* wp = w + r * n + 32 * q;
          if (len < 32) {  // last word of the row: never read past its end
            std::fill(buf, buf + 32, 0.0f);
            std::memcpy(buf, wp, sizeof(float) * len);
            wp = buf;
          }
          for (int c = 0; c < 4; ++c) wv[c] = _mm256_and_ps(bits8((word >> (8 * c)) & 0xFF), _mm256_loadu_ps(wp + 8 * c));
        }
        for (int64_t b = 0; b < bt; ++b) {
          const float* xp = xt + (q * B + b0 + b) * 32;
          for (int c = 0; c < 4; ++c) acc[b] = _mm256_fmadd_ps(wv[c], _mm256_loadu_ps(xp + 8 * c), acc[b]);
        }
      }
      for (int64_t b = 0; b < bt; ++b) y[(b0 + b) * R + r] = hsum256(acc[b]) + (bias ? bias[r] : 0.0f);
    }
  }
}

// Small-batch GEMM over packed masks. x arrives transposed and zero-padded as xt[W][B][32], so
// the B rows of x that meet one mask word are one contiguous 128·B-byte run (row-major x with a
// 4 KiB stride would put all B rows in the same L1 set). The weight chunk is either loaded under
// the mask (float weights) or built from the sign bits (signed-constant weights: 2 bits per
// weight read). C accumulators per row of x break the FMA dependency chain for tiny B.
template <bool SIGNED, int B>
AVX512_TARGET void gemm_small512(const float* xt, const float* w, const int32_t* sign_words, const int32_t* words,
                                 float scale, int64_t n, int64_t W, int64_t R, const float* bias, float* y,
                                 int64_t r0, int64_t r1) {
  constexpr int C = B <= 2 ? 4 : (B <= 8 ? 2 : 1);
  constexpr int U = C >= 2 ? C / 2 : 1;  // words per unrolled step
  const __m512 plus = _mm512_set1_ps(scale), minus = _mm512_set1_ps(-scale);
  for (int64_t r = r0; r < r1; ++r) {
    __m512 acc[B][C];
    for (int b = 0; b < B; ++b)
      for (int c = 0; c < C; ++c) acc[b][c] = _mm512_setzero_ps();
    for (int64_t q0 = 0; q0 < W; q0 += U) {
#pragma GCC unroll 2
      for (int u = 0; u < U; ++u) {
        const int64_t q = q0 + u;
        if (q >= W) break;
        const uint32_t word = static_cast<uint32_t>(words[r * W + q]) & valid_bits(n, q);
        __m512 w0, w1;
        if constexpr (SIGNED) {
          const uint32_t s = static_cast<uint32_t>(sign_words[r * W + q]);
          w0 = _mm512_maskz_mov_ps(static_cast<__mmask16>(word), _mm512_mask_blend_ps(static_cast<__mmask16>(s), minus, plus));
          w1 = _mm512_maskz_mov_ps(static_cast<__mmask16>(word >> 16),
                                   _mm512_mask_blend_ps(static_cast<__mmask16>(s >> 16), minus, plus));
        } else {
          const float* wp = w + r * n + 32 * q;
          w0 = _mm512_maskz_loadu_ps(static_cast<__mmask16>(word), wp);
          w1 = _mm512_maskz_loadu_ps(static_cast<__mmask16>(word >> 16), wp + 16);
        }
        const float* xq = xt + q * B * 32;
#pragma GCC unroll 16
        for (int b = 0; b < B; ++b) {
          const __m512 x0 = _mm512_loadu_ps(xq + 32 * b), x1 = _mm512_loadu_ps(xq + 32 * b + 16);
          if constexpr (C == 1) {
            acc[b][0] = _mm512_fmadd_ps(w1, x1, _mm512_fmadd_ps(w0, x0, acc[b][0]));
          } else {
            acc[b][2 * u] = _mm512_fmadd_ps(w0, x0, acc[b][2 * u]);
            acc[b][2 * u + 1] = _mm512_fmadd_ps(w1, x1, acc[b][2 * u + 1]);
          }
        }
      }
    }
    for (int b = 0; b < B; ++b) {
      __m512 sum = acc[b][0];
      for (int c = 1; c < C; ++c) sum = _mm512_add_ps(sum, acc[b][c]);
      y[b * R + r] = _mm512_reduce_add_ps(sum) + (bias ? bias[r] : 0.0f);
    }
  }
}

// For B > 2 a weight row would re-read all of xt (B·128 bytes per word) from L2: tile two rows
// of W against up to eight rows of x (16 accumulators) so each load feeds several FMAs.
template <bool SIGNED, int BT>
AVX512_TARGET void gemm_tile512(const float* xt, int64_t B, int64_t b0, const float* w, const int32_t* sign_words,
                                const int32_t* words, float scale, int64_t n, int64_t W, int64_t R, const float* bias,
                                float* y, int64_t r0, int64_t r1) {
  const __m512 plus = _mm512_set1_ps(scale), minus = _mm512_set1_ps(-scale);
  for (int64_t r = r0; r < r1; r += 2) {
    const int rows = r + 1 < r1 ? 2 : 1;
    __m512 acc[2][BT];
    for (int i = 0; i < 2; ++i)
      for (int b = 0; b < BT; ++b) acc[i][b] = _mm512_setzero_ps();
    for (int64_t q = 0; q < W; ++q) {
      const uint32_t valid = valid_bits(n, q);
      __m512 wv[2][2];
      for (int i = 0; i < 2; ++i) {
        const int64_t row = i < rows ? r + i : r;  // a lone last row computes twice, stores once
        const uint32_t word = static_cast<uint32_t>(words[row * W + q]) & valid;
        if constexpr (SIGNED) {
          const uint32_t s = static_cast<uint32_t>(sign_words[row * W + q]);
          wv[i][0] = _mm512_maskz_mov_ps(static_cast<__mmask16>(word), _mm512_mask_blend_ps(static_cast<__mmask16>(s), minus, plus));
          wv[i][1] = _mm512_maskz_mov_ps(static_cast<__mmask16>(word >> 16),
                                         _mm512_mask_blend_ps(static_cast<__mmask16>(s >> 16), minus, plus));
        } else {
          const float* wp = w + row * n + 32 * q;
          wv[i][0] = _mm512_maskz_loadu_ps(static_cast<__mmask16>(word), wp);
          wv[i][1] = _mm512_maskz_loadu_ps(static_cast<__mmask16>(word >> 16), wp + 16);
        }
      }
      const float* xq = xt + (q * B + b0) * 32;
#pragma GCC unroll 8
      for (int b = 0; b < BT; ++b) {
        const __m512 x0 = _mm512_loadu_ps(xq + 32 * b), x1 = _mm512_loadu_ps(xq + 32 * b + 16);
        acc[0][b] = _mm512_fmadd_ps(wv[0][1], x1, _mm512_fmadd_ps(wv[0][0], x0, acc[0][b]));
        acc[1][b] = _mm512_fmadd_ps(wv[1][1], x1, _mm512_fmadd_ps(wv[1][0], x0, acc[1][b]));
      }
    }
    for (int i = 0; i < rows; ++i)
      for (int b = 0; b < BT; ++b)
        y[(b0 + b) * R + r + i] = _mm512_reduce_add_ps(acc[i][b]) + (bias ? bias[r + i] : 0.0f);
  }
}

template <bool SIGNED>
AVX512_TARGET void gemm_small_any512(const float* xt, int64_t B, const float* w, const int32_t* sign_words,
                                     const int32_t* words, float scale, int64_t n, int64_t W, int64_t R,
                                     const float* bias, float* y, int64_t r0, int64_t r1) {
  if (B == 1) return gemm_small512<SIGNED, 1>(xt, w, sign_words, words, scale, n, W, R, bias, y, r0, r1);
  if (B == 2) return gemm_small512<SIGNED, 2>(xt, w, sign_words, words, scale, n, W, R, bias, y, r0, r1);
  for (int64_t b0 = 0; b0 < B; b0 += 8) {
    switch (std::min<int64_t>(8, B - b0)) {
      case 1: gemm_tile512<SIGNED, 1>(xt, B, b0, w, sign_words, words, scale, n, W, R, bias, y, r0, r1); break;
      case 2: gemm_tile512<SIGNED, 2>(xt, B, b0, w, sign_words, words, scale, n, W, R, bias, y, r0, r1); break;
      case 3: gemm_tile512<SIGNED, 3>(xt, B, b0, w, sign_words, words, scale, n, W, R, bias, y, r0, r1); break;
      case 4: gemm_tile512<SIGNED, 4>(xt, B, b0, w, sign_words, words, scale, n, W, R, bias, y, r0, r1); break;
      case 5: gemm_tile512<SIGNED, 5>(xt, B, b0, w, sign_words, words, scale, n, W, R, bias, y, r0, r1); break;
      case 6: gemm_tile512<SIGNED, 6>(xt, B, b0, w, sign_words, words, scale, n, W, R, bias, y, r0, r1); break;
      case 7: gemm_tile512<SIGNED, 7>(xt, B, b0, w, sign_words, words, scale, n, W, R, bias, y, r0, r1); break;
      default: gemm_tile512<SIGNED, 8>(xt, B, b0, w, sign_words, words, scale, n, W, R, bias, y, r0, r1); break;
    }
  }
}

}  // namespace

void transpose_small_batch(const float* x, int64_t B, int64_t n, int64_t W, float* xt) {
  for (int64_t q = 0; q < W; ++q)
    for (int64_t b = 0; b < B; ++b) {
      float* dst = xt + (q * B + b) * 32;
      const int64_t len = std::min<int64_t>(32, n - 32 * q);
      std::memcpy(dst, x + b * n + 32 * q, sizeof(float) * len);
      std::fill(dst + len, dst + 32, 0.0f);
    }
}

void masked_gemm_small(Isa isa, const float* x, const float* xt, int64_t B, const float* w, const int32_t* words,
                       int64_t n, int64_t W, int64_t R, const float* bias, float* y, int64_t r0, int64_t r1) {
  if (isa == Isa::Avx512 && B <= 16) {
    return gemm_small_any512<false>(xt, B, w, nullptr, words, 1.0f, n, W, R, bias, y, r0, r1);
  }
  if (isa == Isa::Avx2 && B <= 16) return gemm_small_avx2<false>(xt, B, w, nullptr, words, 1.0f, n, W, R, bias, y, r0, r1);
  masked_gemm_small_scalar(x, B, w, words, n, W, R, bias, y, r0, r1);
}

void signed_masked_gemm_small(Isa isa, const float* x, const float* xt, int64_t B, const int32_t* sign_words,
                              const int32_t* mask_words, float scale, int64_t n, int64_t W, int64_t R,
                              const float* bias, float* y, int64_t r0, int64_t r1) {
  if (isa == Isa::Avx512 && B <= 16) {
    return gemm_small_any512<true>(xt, B, nullptr, sign_words, mask_words, scale, n, W, R, bias, y, r0, r1);
  }
  if (isa == Isa::Avx2 && B <= 16)
    return gemm_small_avx2<true>(xt, B, nullptr, sign_words, mask_words, scale, n, W, R, bias, y, r0, r1);
  signed_gemm_small_scalar(x, B, sign_words, mask_words, scale, n, W, R, bias, y, r0, r1);
}

}  // namespace supsup_cpu
