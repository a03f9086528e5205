// Signed-constant layers at a few rows of x by table lookups (the LUT kernels of T-MAC and
// bitnet.cpp, whose ternary weights these are): a weight is +scale, -scale or 0, so
//   y[b, r] = scale · (Σ_{j ∈ P_r} x[b, j] − Σ_{j ∈ N_r} x[b, j]) + bias[r],
// P = mask ∧ sign, N = mask ∧ ¬sign. Per word of x (32 inputs) the subset sums of each group of its
// inputs are tables that every row shares; rows sit in the lanes of a vector (16 with AVX-512, 8
// with AVX2), their words transposed from the canonical layout a square at a time, and one lookup
// adds a group's inputs for all of them. The direct kernel (small_gemm.cpp) instead builds each
// row's ±scale weights and multiplies them. Sums of x in fp32, exact up to summation order.
#include "lut.h"
#include "simd.h"

#include <algorithm>
#include <cstdlib>
#include <stdexcept>

namespace supsup_cpu {
namespace {

#if SUPSUP_X86
// ------------------------------------------------------------------------------------------------
// AVX-512: 8 nibble tables of 16 sums (128 floats) per word and row of x; 16 rows per vector.

// Partial sums per (row of x, P or N): four break the add chains, but B = 4 needs fewer registers.
template <int B>
constexpr int kAcc512 = B <= 2 ? 4 : 2;

template <int NACC>
AVX512_TARGET inline void lookup_nibbles512(__m512* acc, __m512i w, const float* t) {
#pragma GCC unroll 8
  for (int p = 0; p < 8; ++p)
    acc[p % NACC] = _mm512_add_ps(acc[p % NACC], _mm512_permutexvar_ps(index_bits_at(w, 4 * p), _mm512_load_ps(t + 16 * p)));
}

// The tables of every word q and row b of x (xt [W][Bx][32]) at tables + 128 (q Bx + b).
AVX512_TARGET void tables512(const float* xt, int64_t Bx, int64_t W, float* tables) {
  const __mmask16 has_bit[4] = {0xAAAA, 0xCCCC, 0xF0F0, 0xFF00};
  for (int64_t qb = 0; qb < W * Bx; ++qb) {
    const float* vals = xt + 32 * qb;
    for (int p = 0; p < 8; ++p) {
      __m512 tab = _mm512_setzero_ps();
      for (int i = 0; i < 4; ++i) tab = _mm512_mask_add_ps(tab, has_bit[i], tab, _mm512_set1_ps(vals[4 * p + i]));
      _mm512_store_ps(tables + 128 * qb + 16 * p, tab);
    }
  }
}

// Rows [b0, b0 + B) of the Bx rows of x, through their tables (tables512), into y's rows of the same numbers.
template <int B>
AVX512_TARGET void signed_lut512(const float* tables, int64_t Bx, int64_t b0, const int32_t* sign_words,
                                 const int32_t* mask_words, float scale, int64_t W, int64_t R, const float* bias,
                                 float* y, int64_t r0, int64_t r1) {
  constexpr int NACC = kAcc512<B>;
  for (int64_t rb = r0; rb < r1; rb += 16) {
    const int64_t rows = std::min<int64_t>(16, r1 - rb);
    __m512 pos_acc[B][NACC], neg_acc[B][NACC];
    for (int b = 0; b < B; ++b)
      for (int a = 0; a < NACC; ++a) pos_acc[b][a] = neg_acc[b][a] = _mm512_setzero_ps();
    for (int64_t q0 = 0; q0 < W; q0 += 16) {
      const int64_t nw = std::min<int64_t>(16, W - q0);
      const __mmask16 cols = static_cast<__mmask16>(nw == 16 ? 0xFFFF : (1u << nw) - 1u);
      __m512i pos[16], neg[16];
      for (int i = 0; i < 16; ++i) {
        if (i < rows) {
          const __m512i m = _mm512_maskz_loadu_epi32(cols, mask_words + (rb + i) * W + q0);
          const __m512i s = _mm512_maskz_loadu_epi32(cols, sign_words + (rb + i) * W + q0);
          pos[i] = _mm512_and_si512(m, s);
          neg[i] = _mm512_andnot_si512(s, m);
        } else {
          pos[i] = neg[i] = _mm512_setzero_si512();
        }
      }
      transpose16x16(pos);  // pos[j]: word q0 + j of the 16 rows
      transpose16x16(neg);
      for (int64_t j = 0; j < nw; ++j)
        for (int b = 0; b < B; ++b) {
          const float* t = tables + 128 * ((q0 + j) * Bx + b0 + b);
          lookup_nibbles512<NACC>(pos_acc[b], pos[j], t);
          lookup_nibbles512<NACC>(neg_acc[b], neg[j], t);
        }
    }
    const __mmask16 out = static_cast<__mmask16>(rows == 16 ? 0xFFFF : (1u << rows) - 1u);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(out, bias + rb) : _mm512_setzero_ps();
    for (int b = 0; b < B; ++b) {
      __m512 p = pos_acc[b][0], q = neg_acc[b][0];
      for (int a = 1; a < NACC; ++a) {
        p = _mm512_add_ps(p, pos_acc[b][a]);
        q = _mm512_add_ps(q, neg_acc[b][a]);
      }
      _mm512_mask_storeu_ps(y + (b0 + b) * R + rb, out, _mm512_fmadd_ps(_mm512_set1_ps(scale), _mm512_sub_ps(p, q), bv));
    }
  }
}
#endif  // SUPSUP_X86

// ------------------------------------------------------------------------------------------------
// AVX2: 11 tables of 8 sums (3-bit groups, lut.h kGroups3; 88 floats) per word and row of x; 8 rows
// per vector.
constexpr int kTab3 = kGroups3 * 8;
#if SUPSUP_X86
template <int B>
constexpr int kAcc256 = B == 1 ? 2 : 1;  // sixteen ymm registers

template <int NACC>
AVX2_TARGET inline void lookup_groups256(__m256* acc, __m256i w, const float* t) {
#pragma GCC unroll 11
  for (int p = 0; p < kGroups3; ++p)
    acc[p % NACC] = _mm256_add_ps(acc[p % NACC], _mm256_permutevar8x32_ps(_mm256_load_ps(t + 8 * p), p ? _mm256_srli_epi32(w, 3 * p) : w));
}

// The tables of every word q and row b of x at tables + kTab3 (q Bx + b).
AVX2_TARGET void tables256(const float* xt, int64_t Bx, int64_t W, float* tables) {
  alignas(64) float vals[36] = {};  // 32 inputs, then the zeros the last group's table reads
  for (int64_t qb = 0; qb < W * Bx; ++qb) {
    std::copy(xt + 32 * qb, xt + 32 * qb + 32, vals);
    subset_sums3(vals, tables + kTab3 * qb);
  }
}

template <int B>
AVX2_TARGET void signed_lut256(const float* tables, int64_t Bx, int64_t b0, const int32_t* sign_words,
                               const int32_t* mask_words, float scale, int64_t W, int64_t R, const float* bias,
                               float* y, int64_t r0, int64_t r1) {
  constexpr int NACC = kAcc256<B>;
  for (int64_t rb = r0; rb < r1; rb += 8) {
    const int64_t rows = std::min<int64_t>(8, r1 - rb);
    __m256 pos_acc[B][NACC], neg_acc[B][NACC];
    for (int b = 0; b < B; ++b)
      for (int a = 0; a < NACC; ++a) pos_acc[b][a] = neg_acc[b][a] = _mm256_setzero_ps();
    for (int64_t q0 = 0; q0 < W; q0 += 8) {
      const int64_t nw = std::min<int64_t>(8, W - q0);
      const __m256i cols = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(nw)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      __m256i pos[8], neg[8];
      for (int i = 0; i < 8; ++i) {
        if (i < rows) {
          const __m256i m = _mm256_maskload_epi32(mask_words + (rb + i) * W + q0, cols);
          const __m256i s = _mm256_maskload_epi32(sign_words + (rb + i) * W + q0, cols);
          pos[i] = _mm256_and_si256(m, s);
          neg[i] = _mm256_andnot_si256(s, m);
        } else {
          pos[i] = neg[i] = _mm256_setzero_si256();
        }
      }
      transpose8x8(pos);
      transpose8x8(neg);
      for (int64_t j = 0; j < nw; ++j)
        for (int b = 0; b < B; ++b) {
          const float* t = tables + kTab3 * ((q0 + j) * Bx + b0 + b);
          lookup_groups256<NACC>(pos_acc[b], pos[j], t);
          lookup_groups256<NACC>(neg_acc[b], neg[j], t);
        }
    }
    const __m256i out = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(rows)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 bv = bias ? _mm256_maskload_ps(bias + rb, out) : _mm256_setzero_ps();
    for (int b = 0; b < B; ++b) {
      __m256 p = pos_acc[b][0], q = neg_acc[b][0];
      for (int a = 1; a < NACC; ++a) {
        p = _mm256_add_ps(p, pos_acc[b][a]);
        q = _mm256_add_ps(q, neg_acc[b][a]);
      }
      _mm256_maskstore_ps(y + (b0 + b) * R + rb, out, _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_sub_ps(p, q), bv));
    }
  }
}
#endif  // SUPSUP_X86

}  // namespace

int64_t signed_lut_max_rows(Isa isa) {
  if (isa == Isa::Scalar) return 0;
  // Read at each call, not once, so that a benchmark can compare both kernels in one process.
  if (const char* env = std::getenv("SUPSUP_CPU_SIGNED_LUT")) return std::clamp<int64_t>(std::atoll(env), 0, 16);
  return 4;  // past 4 rows the direct kernel, which builds each row's weights once for all rows of x, catches up
}

int64_t signed_lut_table_floats(Isa isa, int64_t B, int64_t W) { return W * B * (isa == Isa::Avx512 ? 128 : kTab3); }

void signed_lut_tables(Isa isa, const float* xt, int64_t B, int64_t W, float* tables) {
#if SUPSUP_X86
  if (isa == Isa::Avx512) return tables512(xt, B, W, tables);
  tables256(xt, B, W, tables);
#else
  throw std::logic_error("signed_lut_tables needs AVX2 or AVX-512 (signed_lut_max_rows)");
#endif
}

void signed_gemv_lut(Isa isa, const float* tables, int64_t B, const int32_t* sign_words, const int32_t* mask_words,
                     float scale, int64_t W, int64_t R, const float* bias, float* y, int64_t r0, int64_t r1) {
#if !SUPSUP_X86
  throw std::logic_error("signed_gemv_lut needs AVX2 or AVX-512 (signed_lut_max_rows)");
#else
  // Up to 4 rows of x per pass over the bits (more would take more registers than a vector ISA has).
  for (int64_t b0 = 0; b0 < B; b0 += 4) {
    const int64_t nb = std::min<int64_t>(4, B - b0);
    if (isa == Isa::Avx512) {
      if (nb == 1) signed_lut512<1>(tables, B, b0, sign_words, mask_words, scale, W, R, bias, y, r0, r1);
      else if (nb == 2) signed_lut512<2>(tables, B, b0, sign_words, mask_words, scale, W, R, bias, y, r0, r1);
      else if (nb == 3) signed_lut512<3>(tables, B, b0, sign_words, mask_words, scale, W, R, bias, y, r0, r1);
      else signed_lut512<4>(tables, B, b0, sign_words, mask_words, scale, W, R, bias, y, r0, r1);
    } else {
      if (nb == 1) signed_lut256<1>(tables, B, b0, sign_words, mask_words, scale, W, R, bias, y, r0, r1);
      else if (nb == 2) signed_lut256<2>(tables, B, b0, sign_words, mask_words, scale, W, R, bias, y, r0, r1);
      else if (nb == 3) signed_lut256<3>(tables, B, b0, sign_words, mask_words, scale, W, R, bias, y, r0, r1);
      else signed_lut256<4>(tables, B, b0, sign_words, mask_words, scale, W, R, bias, y, r0, r1);
    }
  }
#endif
}

}  // namespace supsup_cpu
