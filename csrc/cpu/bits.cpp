// Bit packing and masked weights: pack/unpack rows, W ⊙ M from the bits, the threshold mask of
// the training step, and the signed-constant weight from sign + mask bits.
#include "kernels.h"
#include "simd.h"
#include "portable.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace supsup_cpu {

namespace {

// A word at a time, in a loop the compiler vectorises (a select per lane): 0.93 ms for 1024 x 1024 on
// one thread of the Xeon VM against 1.20 for the per-element form (a division and a shift a weight).
// Clear bits give 0 whatever w holds, as the AVX kernels' AND does.
void masked_weight_scalar(const float* w, const int32_t* words, int64_t n, int64_t W, float* out, int64_t r0,
                          int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t q = 0; q < W; ++q) {
      const uint32_t word = static_cast<uint32_t>(words[r * W + q]);
      const int64_t j0 = 32 * q, len = std::min<int64_t>(32, n - j0);
      const float* wr = w + r * n + j0;
      float* o = out + r * n + j0;
      if (len == 32) {
        for (int i = 0; i < 32; ++i) {
          const float v = wr[i];
          o[i] = (word & kBit[i]) ? v : 0.0f;
        }
      } else {
        for (int64_t i = 0; i < len; ++i) o[i] = (word & kBit[i]) ? wr[i] : 0.0f;
      }
    }
}

#if SUPSUP_X86
AVX2_TARGET void masked_weight_avx2(const float* w, const int32_t* words, int64_t n, int64_t W, float* out, int64_t r0,
                                    int64_t r1) {
  const int64_t full = n / 32;
  for (int64_t r = r0; r < r1; ++r) {
    const float* wr = w + r * n;
    float* o = out + r * n;
    for (int64_t q = 0; q < full; ++q) {
      const uint32_t word = static_cast<uint32_t>(words[r * W + q]);
      for (int c = 0; c < 4; ++c)
        _mm256_storeu_ps(o + 32 * q + 8 * c, _mm256_and_ps(bits8((word >> (8 * c)) & 0xFF), _mm256_loadu_ps(wr + 32 * q + 8 * c)));
    }
    for (int64_t j = 32 * full; j < n; ++j)
      o[j] = ((static_cast<uint32_t>(words[r * W + j / 32]) >> (j % 32)) & 1u) ? wr[j] : 0.0f;
  }
}

AVX512_TARGET void masked_weight_avx512(const float* w, const int32_t* words, int64_t n, int64_t W, float* out,
                                        int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t q = 0; q < W; ++q) {
      const uint32_t valid = valid_bits(n, q);
      const uint32_t word = static_cast<uint32_t>(words[r * W + q]) & valid;
      const float* wp = w + r * n + 32 * q;
      float* o = out + r * n + 32 * q;
      _mm512_mask_storeu_ps(o, static_cast<__mmask16>(valid), _mm512_maskz_loadu_ps(static_cast<__mmask16>(word), wp));
      _mm512_mask_storeu_ps(o + 16, static_cast<__mmask16>(valid >> 16),
                            _mm512_maskz_loadu_ps(static_cast<__mmask16>(word >> 16), wp + 16));
    }
}

AVX512_TARGET void threshold_avx512(const float* s, const float* w, float* out, int64_t i0, int64_t i1) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t i = i0; i < i1; i += 16) {
    const __mmask16 m = i + 16 <= i1 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (i1 - i)) - 1u);
    const __mmask16 keep = _mm512_mask_cmp_ps_mask(m, _mm512_maskz_loadu_ps(m, s + i), zero, _CMP_GE_OQ);
    _mm512_mask_storeu_ps(out + i, m, _mm512_maskz_loadu_ps(keep, w + i));
  }
}

AVX512_TARGET void signed_masked_weight_avx512(const int32_t* sign_words, const int32_t* mask_words, float scale,
                                               int64_t n, int64_t W, float* out, int64_t r0, int64_t r1) {
  const __m512 plus = _mm512_set1_ps(scale), minus = _mm512_set1_ps(-scale);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t q = 0; q < W; ++q) {
      const uint32_t valid = valid_bits(n, q);
      const uint32_t m = static_cast<uint32_t>(mask_words[r * W + q]) & valid;
      const uint32_t s = static_cast<uint32_t>(sign_words[r * W + q]);
      float* o = out + r * n + 32 * q;
      const __m512 lo = _mm512_maskz_mov_ps(static_cast<__mmask16>(m), _mm512_mask_blend_ps(static_cast<__mmask16>(s), minus, plus));
      const __m512 hi = _mm512_maskz_mov_ps(static_cast<__mmask16>(m >> 16),
                                            _mm512_mask_blend_ps(static_cast<__mmask16>(s >> 16), minus, plus));
      _mm512_mask_storeu_ps(o, static_cast<__mmask16>(valid), lo);
      _mm512_mask_storeu_ps(o + 16, static_cast<__mmask16>(valid >> 16), hi);
    }
}

// The signed-constant weight with AVX2: whole words by masked_word8x4, a row's partial last word 8 at
// a time and only its columns below n stored (the scalar loop took 5.4-5.6 ms at 1024 x 1024 on the
// Xeon VM, the whole cost of a large batch's signed forward over BLAS's).
AVX2_TARGET void signed_masked_weight_avx2(const int32_t* sign_words, const int32_t* mask_words, float scale, int64_t n,
                                           int64_t W, float* out, int64_t r0, int64_t r1) {
  const int64_t full = n / 32;
  for (int64_t r = r0; r < r1; ++r) {
    float* o = out + r * n;
    for (int64_t q = 0; q < full; ++q) {
      __m256 v[4];
      masked_word8x4<true>(nullptr, sign_words, mask_words, scale, n, W, r, q, v);
      for (int c = 0; c < 4; ++c) _mm256_storeu_ps(o + 32 * q + 8 * c, v[c]);
    }
    for (int64_t j = 32 * full; j < n; j += 8) {
      const __m256 v = masked_weights8<true>(nullptr, sign_words, mask_words, scale, n, W, r, j);
      const __m256i cols = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - j)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      _mm256_maskstore_ps(o + j, cols, v);
    }
  }
}
#endif  // SUPSUP_X86

}  // namespace

void pack_rows(const bool* mask, int64_t n, int64_t W, int32_t* words, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const bool* m = mask + r * n;
    for (int64_t q = 0; q < W; ++q) {
      uint32_t word = 0;
      const int64_t end = std::min<int64_t>(32, n - 32 * q);
      for (int64_t j = 0; j < end; ++j) word |= static_cast<uint32_t>(m[32 * q + j]) << j;
      words[r * W + q] = static_cast<int32_t>(word);
    }
  }
}

void unpack_rows(const int32_t* words, int64_t n, int64_t W, bool* out, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t j = 0; j < n; ++j) out[r * n + j] = (static_cast<uint32_t>(words[r * W + j / 32]) >> (j % 32)) & 1u;
}

void transpose_masks(const int32_t* words, int64_t R, int64_t n, int32_t* out, int64_t m0, int64_t m1) {
  const int64_t W = (n + 31) / 32, W2 = (R + 31) / 32;
  for (int64_t m = m0; m < m1; ++m) {
    const int32_t* src = words + m * R * W;
    int32_t* dst = out + m * n * W2;
    for (int64_t rb = 0; rb < W2; ++rb)
      for (int64_t w = 0; w < W; ++w) {
        uint32_t a[32];
        for (int64_t i = 0; i < 32; ++i) a[i] = 32 * rb + i < R ? static_cast<uint32_t>(src[(32 * rb + i) * W + w]) : 0u;
        transpose32(a);  // the pad bits of row words (columns >= n) land in a[j >= n - 32w]: not written
        const int64_t cols = std::min<int64_t>(32, n - 32 * w);
        for (int64_t j = 0; j < cols; ++j) dst[(32 * w + j) * W2 + rb] = static_cast<int32_t>(a[j]);
      }
  }
}

void masked_weight(Isa isa, const float* w, const int32_t* words, int64_t n, int64_t W, float* out, int64_t r0,
                   int64_t r1) {
#if SUPSUP_X86
  if (isa == Isa::Avx512) return masked_weight_avx512(w, words, n, W, out, r0, r1);
  if (isa == Isa::Avx2) return masked_weight_avx2(w, words, n, W, out, r0, r1);
#endif
  masked_weight_scalar(w, words, n, W, out, r0, r1);
}

void threshold_masked_weight(Isa isa, const float* scores, const float* w, float* out, int64_t i0, int64_t i1) {
#if SUPSUP_X86
  if (isa == Isa::Avx512) return threshold_avx512(scores, w, out, i0, i1);
#endif
  for (int64_t i = i0; i < i1; ++i) {
    const float wv = w[i];
    out[i] = scores[i] >= 0.0f ? wv : 0.0f;
  }
}

void signed_masked_weight(Isa isa, const int32_t* sign_words, const int32_t* mask_words, float scale, int64_t n,
                          int64_t W, float* out, int64_t r0, int64_t r1) {
#if SUPSUP_X86
  if (isa == Isa::Avx512) return signed_masked_weight_avx512(sign_words, mask_words, scale, n, W, out, r0, r1);
  if (isa == Isa::Avx2) return signed_masked_weight_avx2(sign_words, mask_words, scale, n, W, out, r0, r1);
#endif
  // A word at a time, two selects of constants a weight: vectorised (portable.h kBit).
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t q = 0; q < W; ++q) {
      const uint32_t m = static_cast<uint32_t>(mask_words[r * W + q]), s = static_cast<uint32_t>(sign_words[r * W + q]);
      const int64_t len = std::min<int64_t>(32, n - 32 * q);
      float* o = out + r * n + 32 * q;
      for (int64_t i = 0; i < len; ++i) {
        const float v = (s & kBit[i]) ? scale : -scale;
        o[i] = (m & kBit[i]) ? v : 0.0f;
      }
    }
}

}  // namespace supsup_cpu
