// Small-batch GEMM (batch <= 16) over one packed mask, with float or signed-constant weights.
// Larger batches: masked_gemm.cpp.
#include "kernels.h"
#include "portable.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace supsup_cpu {

namespace {

// The scalar kernels multiply a clear bit's weight by 0 rather than skip it, as the vector kernels
// do: x · (W ⊙ M) in IEEE arithmetic, where an infinite input times a clear bit is NaN. Each keeps 32
// partial sums a row of x, one per bit position of a word, added pairwise at the end: no chain through
// one accumulator, so compilers vectorise the word loop (SSE on x86, NEON on ARM), the bit tests
// included (portable.h kBit). sum32 adds the 32 partial sums pairwise.
inline float sum32(float* acc) {
  for (int h = 16; h > 0; h >>= 1)
    for (int i = 0; i < h; ++i) acc[i] += acc[i + h];
  return acc[0];
}

// Word q of a weight row as 32 floats (zero past n): w at a set mask bit, else 0 (float weights), or
// ±1 at a set bit by the sign bit (signed-constant weights; the caller scales).
template <bool SIGNED>
inline void masked_word(const float* w_row, const int32_t* sign_row, const int32_t* mask_row, int64_t n, int64_t q,
                        float* mv) {
  const uint32_t m = static_cast<uint32_t>(mask_row[q]);
  if (32 * q + 32 <= n) {
    if constexpr (SIGNED) {
      const uint32_t s = static_cast<uint32_t>(sign_row[q]);
      for (int i = 0; i < 32; ++i) {
        const float sign = (s & kBit[i]) ? 1.0f : -1.0f, set = (m & kBit[i]) ? 1.0f : 0.0f;
        mv[i] = set * sign;  // two selects of constants: vectorised
      }
    } else {
      const float* wq = w_row + 32 * q;
      for (int i = 0; i < 32; ++i) {
        const float wi = wq[i];  // read whatever the bit: a select, not a branch
        mv[i] = (m & kBit[i]) ? wi : 0.0f;
      }
    }
    return;
  }
  const uint32_t s = SIGNED ? static_cast<uint32_t>(sign_row[q]) : 0u;
  for (int i = 0; i < 32; ++i)
    mv[i] = 32 * q + i >= n || !(m & kBit[i]) ? 0.0f : SIGNED ? ((s & kBit[i]) ? 1.0f : -1.0f) : w_row[32 * q + i];
}

// Every row of x (B <= 16) in one pass over a weight row: each word's masked values are formed once
// for all of them.
template <bool SIGNED>
void masked_gemm_small_scalar(const float* x, int64_t B, const float* w, const int32_t* sign_words,
                              const int32_t* words, float scale, int64_t n, int64_t W, int64_t R, const float* bias,
                              float* y, int64_t r0, int64_t r1) {
  alignas(64) float acc[16][32];
  alignas(64) float mv[32];
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t b = 0; b < B; ++b) std::fill(acc[b], acc[b] + 32, 0.0f);
    for (int64_t q = 0; q < W; ++q) {
      masked_word<SIGNED>(SIGNED ? nullptr : w + r * n, SIGNED ? sign_words + r * W : nullptr, words + r * W, n, q, mv);
      const int64_t len = std::min<int64_t>(32, n - 32 * q);
      for (int64_t b = 0; b < B; ++b) {
        const float* xq = x + b * n + 32 * q;
        float* a = acc[b];
        if (len == 32) {
          for (int i = 0; i < 32; ++i) a[i] += xq[i] * mv[i];
        } else {
          for (int64_t i = 0; i < len; ++i) a[i] += xq[i] * mv[i];
        }
      }
    }
    for (int64_t b = 0; b < B; ++b) {
      const float dot = sum32(acc[b]);
      y[b * R + r] = (SIGNED ? scale * dot : dot) + (bias ? bias[r] : 0.0f);
    }
  }
}

#if SUPSUP_X86
// One or two rows of x (memory-bound): one row of W at a time, four accumulators per x row so no
// FMA waits on the one before (one accumulator per x row chained 4 FMAs per word: 16 cycles a word).
template <bool SIGNED, int B>
AVX2_TARGET void gemm_direct256(const float* xt, const float* w, const int32_t* sign_words, const int32_t* words,
                                float scale, int64_t n, int64_t W, int64_t R, const float* bias, float* y, int64_t r0,
                                int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    __m256 acc[B][4];
    for (int b = 0; b < B; ++b)
      for (int c = 0; c < 4; ++c) acc[b][c] = _mm256_setzero_ps();
    for (int64_t q = 0; q < W; ++q) {
      __m256 wv[4];
      masked_word8x4_any<SIGNED>(w, sign_words, words, scale, n, W, r, q, wv);
      for (int b = 0; b < B; ++b) {
        const float* xq = xt + (q * B + b) * 32;
        for (int c = 0; c < 4; ++c) acc[b][c] = _mm256_fmadd_ps(wv[c], _mm256_loadu_ps(xq + 8 * c), acc[b][c]);
      }
    }
    for (int b = 0; b < B; ++b)
      y[b * R + r] = hsum256(_mm256_add_ps(_mm256_add_ps(acc[b][0], acc[b][1]), _mm256_add_ps(acc[b][2], acc[b][3]))) +
                     (bias ? bias[r] : 0.0f);
  }
}

// One row of x over float weights (AVX2): four rows of W at a time with one accumulator each, as
// MKL's AVX2 GEMV runs (more accumulators spill: x's four vectors and the four shift counts take
// registers too). Each row's word is broadcast straight from memory and shifted so that weight j's
// bit is lane j's sign bit, the mask of a vmaskmovps load: one shift and one masked load per 8
// weights, against an AND, a compare and an AND in masked_word8x4, which ran the L2-resident GEMV
// about 1.3x slower on the Intel Xeon VM. A row's last, partial word is the same step with its bits
// past n cleared; masked-off lanes are never read. (That step is written out twice: shared through a
// helper taking the accumulators by reference, GCC kept them in memory, storing them every word.)
template <int ROWS>
AVX2_TARGET void gemv_rows256(const float* xt, const float* w, const int32_t* words, int64_t n, int64_t W,
                              const float* bias, float* y, int64_t r) {
  const __m256i s0 = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
  const __m256i shift[4] = {s0, _mm256_sub_epi32(s0, _mm256_set1_epi32(8)), _mm256_sub_epi32(s0, _mm256_set1_epi32(16)),
                            _mm256_sub_epi32(s0, _mm256_set1_epi32(24))};
  const int64_t full = n / 32;
  __m256 acc[ROWS];
  for (int i = 0; i < ROWS; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t q = 0; q < full; ++q)
    for (int i = 0; i < ROWS; ++i) {
      const __m256i mb = _mm256_set1_epi32(words[(r + i) * W + q]);
      const float* wp = w + (r + i) * n + 32 * q;
      for (int c = 0; c < 4; ++c)
        acc[i] = _mm256_fmadd_ps(_mm256_maskload_ps(wp + 8 * c, _mm256_sllv_epi32(mb, shift[c])),
                                 _mm256_loadu_ps(xt + 32 * q + 8 * c), acc[i]);
    }
  for (int i = 0; i < ROWS; ++i) {
    if (full < W) {  // the partial last word
      const uint32_t bits = static_cast<uint32_t>(words[(r + i) * W + full]) & valid_bits(n, full);
      const __m256i mb = _mm256_set1_epi32(static_cast<int32_t>(bits));
      for (int c = 0; c < 4; ++c)
        acc[i] = _mm256_fmadd_ps(_mm256_maskload_ps(w + (r + i) * n + 32 * full + 8 * c, _mm256_sllv_epi32(mb, shift[c])),
                                 _mm256_loadu_ps(xt + 32 * full + 8 * c), acc[i]);
    }
    y[r + i] = hsum256(acc[i]) + (bias ? bias[r + i] : 0.0f);
  }
}

AVX2_TARGET void gemv256(const float* xt, const float* w, const int32_t* words, int64_t n, int64_t W, const float* bias,
                         float* y, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) gemv_rows256<4>(xt, w, words, n, W, bias, y, r);
  for (; r < r1; ++r) gemv_rows256<1>(xt, w, words, n, W, bias, y, r);
}

// 3..16 rows of x: as on AVX-512 (gemm_packed512), 4 rows of W ⊙ M unpacked into an L1 buffer
// pw[W][4][32], then 4 x 3 tiles (12 accumulators, 7 loads per 12 FMAs; with the 3 x rows and one
// weight vector that fills the 16 ymm registers; 4 x 2 ran 15% slower at 16 rows).
template <bool SIGNED>
AVX2_TARGET void pack_rows256(const float* w, const int32_t* sign_words, const int32_t* words, float scale, int64_t n,
                              int64_t W, int64_t r, int rows, float* pw) {
  for (int i = 0; i < 4; ++i) {
    const int64_t row = r + std::min(i, rows - 1);  // a short last tile repeats its last row
    for (int64_t q = 0; q < W; ++q) {
      __m256 v[4];
      masked_word8x4_any<SIGNED>(w, sign_words, words, scale, n, W, row, q, v);
      for (int c = 0; c < 4; ++c) _mm256_store_ps(pw + 128 * q + 32 * i + 8 * c, v[c]);
    }
  }
}

template <int BT>
AVX2_TARGET void tile4_256(const float* pw, int64_t W, const float* xt, int64_t B, int64_t b0, float* sums) {
  __m256 acc[4][BT];
  for (int i = 0; i < 4; ++i)
    for (int b = 0; b < BT; ++b) acc[i][b] = _mm256_setzero_ps();
  for (int64_t q = 0; q < W; ++q) {
    const float* xq = xt + (q * B + b0) * 32;
    const float* wq = pw + 128 * q;
    for (int h = 0; h < 4; ++h) {
      __m256 x[BT];
      for (int b = 0; b < BT; ++b) x[b] = _mm256_loadu_ps(xq + 32 * b + 8 * h);
      for (int i = 0; i < 4; ++i) {
        const __m256 wv = _mm256_load_ps(wq + 32 * i + 8 * h);
        for (int b = 0; b < BT; ++b) acc[i][b] = _mm256_fmadd_ps(wv, x[b], acc[i][b]);
      }
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int b = 0; b < BT; ++b) sums[i * BT + b] = hsum256(acc[i][b]);
}

template <bool SIGNED>
AVX2_TARGET void gemm_packed256(const float* xt, int64_t B, const float* w, const int32_t* sign_words,
                                const int32_t* words, float scale, int64_t n, int64_t W, int64_t R, const float* bias,
                                float* y, int64_t r0, int64_t r1) {
  thread_local std::vector<float> buf;
  if (buf.size() < static_cast<size_t>(128 * W + 16)) buf.resize(128 * W + 16);
  float* pw = align64(buf);
  float sums[12];
  const int64_t group = (B + (B + 2) / 3 - 1) / ((B + 2) / 3);  // x rows split evenly into groups of <= 3
  for (int64_t r = r0; r < r1; r += 4) {
    const int rows = static_cast<int>(std::min<int64_t>(4, r1 - r));
    pack_rows256<SIGNED>(w, sign_words, words, scale, n, W, r, rows, pw);
    for (int64_t b0 = 0; b0 < B; b0 += group) {
      const int bt = static_cast<int>(std::min<int64_t>(group, B - b0));
      if (bt == 3) tile4_256<3>(pw, W, xt, B, b0, sums);
      else if (bt == 2) tile4_256<2>(pw, W, xt, B, b0, sums);
      else tile4_256<1>(pw, W, xt, B, b0, sums);
      for (int i = 0; i < rows; ++i)
        for (int b = 0; b < bt; ++b) y[(b0 + b) * R + r + i] = sums[i * bt + b] + (bias ? bias[r + i] : 0.0f);
    }
  }
}

template <bool SIGNED>
AVX2_TARGET void gemm_small_avx2(const float* xt, int64_t B, const float* w, const int32_t* sign_words,
                                 const int32_t* words, float scale, int64_t n, int64_t W, int64_t R,
                                 const float* bias, float* y, int64_t r0, int64_t r1) {
  if (B == 1) {
    if constexpr (!SIGNED) return gemv256(xt, w, words, n, W, bias, y, r0, r1);
    return gemm_direct256<SIGNED, 1>(xt, w, sign_words, words, scale, n, W, R, bias, y, r0, r1);
  }
  if (B == 2) return gemm_direct256<SIGNED, 2>(xt, w, sign_words, words, scale, n, W, R, bias, y, r0, r1);
  gemm_packed256<SIGNED>(xt, B, w, sign_words, words, scale, n, W, R, bias, y, r0, r1);
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

// Sixteen 16-lane accumulators to their sixteen lane sums, in one vector (lane s = sum of v[s]):
// four halving rounds of shuffles and adds instead of sixteen separate horizontal reductions.
AVX512_TARGET inline __m512 reduce16x16(const __m512 v[16]) {
  __m512 c[8], d[4], e[2];
  for (int i = 0; i < 8; ++i)  // 256-bit halves: lanes 0-7 from v[2i], 8-15 from v[2i+1]
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // 128-bit block m holds 4 partials of v[4i + m]
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88), _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    e[i] = _mm512_add_ps(_mm512_shuffle_ps(d[2 * i], d[2 * i + 1], 0x44), _mm512_shuffle_ps(d[2 * i], d[2 * i + 1], 0xEE));
  const __m512 f = _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], 0x88), _mm512_shuffle_ps(e[0], e[1], 0xDD));
  // f lane 4m + t holds the sum of v[4t + m]
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, f);
}

// Rows [r, r + 4) of W ⊙ M (or of the signed-constant weight) as plain floats, word-major
// pw[W][4][32] (the tile's rows of one word are one contiguous 512 bytes), zero where masked or past
// n. A short last tile repeats its last row; its sums are never stored.
template <bool SIGNED>
AVX512_TARGET void pack_rows512(const float* w, const int32_t* sign_words, const int32_t* words, float scale, int64_t n,
                                int64_t W, int64_t r, int rows, float* pw) {
  for (int i = 0; i < 4; ++i) {
    const int64_t row = r + std::min(i, rows - 1);
    for (int64_t q = 0; q < W; ++q) {
      _mm512_store_ps(pw + 128 * q + 32 * i, masked_weights16<SIGNED>(w, sign_words, words, scale, n, W, row, 32 * q));
      _mm512_store_ps(pw + 128 * q + 32 * i + 16, masked_weights16<SIGNED>(w, sign_words, words, scale, n, W, row, 32 * q + 16));
    }
  }
}

// 4 packed rows against BT (<= 5) rows of x, all of K: 4·BT accumulators, each load feeding 4 or
// BT FMAs. This project's Xeon sustains only ~1.2 512-bit loads per cycle, so loads per FMA, not
// FMAs, set the pace: 8 loads per 16 FMAs at BT = 4 against 20 per 32 for the 2 x 8 tile this
// replaced (6 x 4 ran no faster: the compiler spilled). sums[i·BT + b] = row i · x row b.
template <int BT>
AVX512_TARGET void tile4_512(const float* pw, int64_t W, const float* xt, int64_t B, int64_t b0, float* sums) {
  __m512 acc[4][BT];
  for (int i = 0; i < 4; ++i)
    for (int b = 0; b < BT; ++b) acc[i][b] = _mm512_setzero_ps();
  for (int64_t q = 0; q < W; ++q) {
    const float* xq = xt + (q * B + b0) * 32;
    const float* wq = pw + 128 * q;
    for (int h = 0; h < 2; ++h) {
      __m512 x[BT];
      for (int b = 0; b < BT; ++b) x[b] = _mm512_loadu_ps(xq + 32 * b + 16 * h);
      for (int i = 0; i < 4; ++i) {
        const __m512 wv = _mm512_load_ps(wq + 32 * i + 16 * h);
        for (int b = 0; b < BT; ++b) acc[i][b] = _mm512_fmadd_ps(wv, x[b], acc[i][b]);
      }
    }
  }
  __m512 v[32];
  for (int s = 0; s < 32; ++s) v[s] = s < 4 * BT ? acc[s / BT][s % BT] : _mm512_setzero_ps();
  _mm512_storeu_ps(sums, reduce16x16(v));
  if constexpr (4 * BT > 16) _mm512_storeu_ps(sums + 16, reduce16x16(v + 16));
}

// 3..16 rows of x: each tile of 4 weight rows is unpacked once into an L1 buffer and reused by
// every group of up to 5 x rows (the rows split evenly: 16 = 4 x 4).
template <bool SIGNED>
AVX512_TARGET void gemm_packed512(const float* xt, int64_t B, const float* w, const int32_t* sign_words,
                                  const int32_t* words, float scale, int64_t n, int64_t W, int64_t R,
                                  const float* bias, float* y, int64_t r0, int64_t r1) {
  thread_local std::vector<float> buf;
  if (buf.size() < static_cast<size_t>(128 * W + 16)) buf.resize(128 * W + 16);
  float* pw = align64(buf);
  float sums[32];
  const int64_t group = (B + (B + 4) / 5 - 1) / ((B + 4) / 5);  // x rows split evenly into groups of <= 5
  for (int64_t r = r0; r < r1; r += 4) {
    const int rows = static_cast<int>(std::min<int64_t>(4, r1 - r));
    pack_rows512<SIGNED>(w, sign_words, words, scale, n, W, r, rows, pw);
    for (int64_t b0 = 0; b0 < B; b0 += group) {
      const int bt = static_cast<int>(std::min<int64_t>(group, B - b0));
      switch (bt) {
        case 1: tile4_512<1>(pw, W, xt, B, b0, sums); break;
        case 2: tile4_512<2>(pw, W, xt, B, b0, sums); break;
        case 3: tile4_512<3>(pw, W, xt, B, b0, sums); break;
        case 4: tile4_512<4>(pw, W, xt, B, b0, sums); break;
        default: tile4_512<5>(pw, W, xt, B, b0, sums); break;
      }
      for (int i = 0; i < rows; ++i)
        for (int b = 0; b < bt; ++b) y[(b0 + b) * R + r + i] = sums[i * bt + b] + (bias ? bias[r + i] : 0.0f);
    }
  }
}

template <bool SIGNED>
AVX512_TARGET void gemm_small_any512(const float* xt, int64_t B, const float* w, const int32_t* sign_words,
                                     const int32_t* words, float scale, int64_t n, int64_t W, int64_t R,
                                     const float* bias, float* y, int64_t r0, int64_t r1) {
  if (B == 1) return gemm_small512<SIGNED, 1>(xt, w, sign_words, words, scale, n, W, R, bias, y, r0, r1);
  if (B == 2) return gemm_small512<SIGNED, 2>(xt, w, sign_words, words, scale, n, W, R, bias, y, r0, r1);
  gemm_packed512<SIGNED>(xt, B, w, sign_words, words, scale, n, W, R, bias, y, r0, r1);
}
#endif  // SUPSUP_X86

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
#if SUPSUP_X86
  if (isa == Isa::Avx512 && B <= 16) {
    return gemm_small_any512<false>(xt, B, w, nullptr, words, 1.0f, n, W, R, bias, y, r0, r1);
  }
  if (isa == Isa::Avx2 && B <= 16) return gemm_small_avx2<false>(xt, B, w, nullptr, words, 1.0f, n, W, R, bias, y, r0, r1);
#endif
  masked_gemm_small_scalar<false>(x, B, w, nullptr, words, 1.0f, n, W, R, bias, y, r0, r1);
}

void signed_masked_gemm_small(Isa isa, const float* x, const float* xt, int64_t B, const int32_t* sign_words,
                              const int32_t* mask_words, float scale, int64_t n, int64_t W, int64_t R,
                              const float* bias, float* y, int64_t r0, int64_t r1) {
#if SUPSUP_X86
  if (isa == Isa::Avx512 && B <= 16) {
    return gemm_small_any512<true>(xt, B, nullptr, sign_words, mask_words, scale, n, W, R, bias, y, r0, r1);
  }
  if (isa == Isa::Avx2 && B <= 16)
    return gemm_small_avx2<true>(xt, B, nullptr, sign_words, mask_words, scale, n, W, R, bias, y, r0, r1);
#endif
  masked_gemm_small_scalar<true>(x, B, nullptr, sign_words, mask_words, scale, n, W, R, bias, y, r0, r1);
}

}  // namespace supsup_cpu
