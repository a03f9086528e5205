// CPU kernels for the supsup ops: scalar, AVX2 and AVX-512 variants in one translation unit
// (function-level target attributes), chosen at run time. AVX-512 maps mask bits straight onto
// opmask registers: a 32-bit word is two __mmask16 for two 16-lane float operations.
#include "kernels.h"
#include "lut.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace supsup_cpu {

namespace {

// Bits of word q of a row of n bits that are real (not padding). Padding is ignored even when
// a caller's words have it set, so no kernel reads past the end of a row.
inline uint32_t valid_bits(int64_t n, int64_t q) {
  const int64_t rem = n - 32 * q;
  return rem >= 32 ? 0xFFFFFFFFu : ((1u << rem) - 1u);
}

// superpose walks the tasks in blocks: within a block each task's rows are one sequential stream
// (a few dozen pages in the TLB at a time); the output rows are re-read once per block.
constexpr int64_t kSuperposeTaskBlock = 64;

inline const int32_t* task_base(const int32_t* bank, const int64_t* active, int64_t t, int64_t stride) {
  return bank + (active ? active[t] : t) * stride;
}

// superpose's walk, shared by the ISA variants: tasks in blocks of kSuperposeTaskBlock, each output
// row, NW words at a time through ``wide`` and the rest one by one through ``one`` (the ISA's word
// kernels, which carry its target attribute; this loop has no vector code of its own).
using SuperposeWords = void (*)(const int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t, const float*,
                                const int64_t*, float*, bool);

template <int NW>
void superpose_blocks(SuperposeWords wide, SuperposeWords one, const int32_t* bank, int64_t k, int64_t W, int64_t n,
                      int64_t R, const float* alpha, const int64_t* active, float* out, int64_t r0, int64_t r1) {
  const int64_t stride = R * W;
  for (int64_t t0 = 0; t0 < k; t0 += kSuperposeTaskBlock) {
    const int64_t kb = std::min(kSuperposeTaskBlock, k - t0);
    const int32_t* bb = active ? bank : bank + t0 * stride;
    const int64_t* ab = active ? active + t0 : nullptr;
    for (int64_t r = r0; r < r1; ++r) {
      int64_t q = 0;
      for (; q + NW <= W; q += NW) wide(bb, kb, stride, r * W + q, q, n, alpha + t0, ab, out + r * n + 32 * q, t0 == 0);
      for (; q < W; ++q) one(bb, kb, stride, r * W + q, q, n, alpha + t0, ab, out + r * n + 32 * q, t0 == 0);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// scalar
void mask_dot_scalar(const int32_t* bank, int64_t R, int64_t W, int64_t n, const float* v, const int64_t* active,
                     int64_t k, float* out, int64_t fw0, int64_t fw1) {
  const int64_t stride = R * W;
  for (int64_t t = 0; t < k; ++t) {
    const int32_t* b = task_base(bank, active, t, stride);
    double acc = 0.0;
    int64_t r = fw0 / W, q = fw0 % W;
    for (int64_t fw = fw0; fw < fw1; ++fw) {
      uint32_t word = static_cast<uint32_t>(b[fw]) & valid_bits(n, q);
      const float* vp = v + r * n + 32 * q;
      while (word) {
        acc += vp[__builtin_ctz(word)];
        word &= word - 1;
      }
      if (++q == W) {
        q = 0;
        ++r;
      }
    }
    out[t] = static_cast<float>(acc);
  }
}

void superpose_scalar(const int32_t* bank, int64_t k, int64_t W, int64_t n, int64_t R, const float* alpha,
                      const int64_t* active, float* out, int64_t r0, int64_t r1) {
  const int64_t stride = R * W;
  for (int64_t r = r0; r < r1; ++r) {
    float* o = out + r * n;
    std::fill(o, o + n, 0.0f);
    for (int64_t t = 0; t < k; ++t) {
      const int32_t* b = task_base(bank, active, t, stride) + r * W;
      const float a = alpha[t];
      for (int64_t q = 0; q < W; ++q) {
        uint32_t word = static_cast<uint32_t>(b[q]) & valid_bits(n, q);
        while (word) {
          const int bit = __builtin_ctz(word);
          o[32 * q + bit] += a;
          word &= word - 1;
        }
      }
    }
  }
}

void masked_weight_scalar(const float* w, const int32_t* words, int64_t n, int64_t W, float* out, int64_t r0,
                          int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t j = 0; j < n; ++j)
      out[r * n + j] = ((static_cast<uint32_t>(words[r * W + j / 32]) >> (j % 32)) & 1u) ? w[r * n + j] : 0.0f;
}

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

// ------------------------------------------------------------------------------------------------
// AVX2: 8 bits -> an 8-lane all-ones/zeros mask by broadcast, AND with the lane's bit, compare.
#define AVX2_TARGET __attribute__((target("avx2,fma")))

AVX2_TARGET inline __m256 bits8(uint32_t byte) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i b = _mm256_set1_epi32(static_cast<int>(byte));
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(b, sel), sel));
}

AVX2_TARGET inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

AVX2_TARGET void mask_dot_avx2(const int32_t* bank, int64_t R, int64_t W, int64_t n, const float* v,
                               const int64_t* active, int64_t k, float* out, int64_t fw0, int64_t fw1) {
  const int64_t stride = R * W;
  for (int64_t t = 0; t < k; ++t) {
    const int32_t* b = task_base(bank, active, t, stride);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float tail = 0.0f;
    int64_t r = fw0 / W, q = fw0 % W;
    for (int64_t fw = fw0; fw < fw1; ++fw) {
      const uint32_t valid = valid_bits(n, q);
      const uint32_t word = static_cast<uint32_t>(b[fw]) & valid;
      const float* vp = v + r * n + 32 * q;
      if (valid == 0xFFFFFFFFu) {
        acc0 = _mm256_add_ps(acc0, _mm256_and_ps(bits8(word & 0xFF), _mm256_loadu_ps(vp)));
        acc1 = _mm256_add_ps(acc1, _mm256_and_ps(bits8((word >> 8) & 0xFF), _mm256_loadu_ps(vp + 8)));
        acc0 = _mm256_add_ps(acc0, _mm256_and_ps(bits8((word >> 16) & 0xFF), _mm256_loadu_ps(vp + 16)));
        acc1 = _mm256_add_ps(acc1, _mm256_and_ps(bits8(word >> 24), _mm256_loadu_ps(vp + 24)));
      } else {
        for (uint32_t w = word; w; w &= w - 1) tail += vp[__builtin_ctz(w)];
      }
      if (++q == W) {
        q = 0;
        ++r;
      }
    }
    out[t] = hsum256(_mm256_add_ps(acc0, acc1)) + tail;
  }
}

// Superpose on AVX2: a word is broadcast once, then for each byte one variable shift moves bit
// 8c+i of the word into the sign bit of lane i, and blendv picks α or 0 from that sign bit: 3 vector
// ops per 8 bits (instead of broadcast/and/compare/and/add). Two words per task at a time.
template <int NW>
AVX2_TARGET void superpose_words_avx2(const int32_t* bank, int64_t k, int64_t stride, int64_t off, int64_t q0, int64_t n,
                                      const float* alpha, const int64_t* active, float* o, bool init) {
  const __m256i sh[4] = {_mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24), _mm256_setr_epi32(23, 22, 21, 20, 19, 18, 17, 16),
                         _mm256_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8), _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0)};
  const __m256 zero = _mm256_setzero_ps();
  __m256 acc[4 * NW];
  uint32_t valid[NW];
  float buf[32];
  for (int j = 0; j < NW; ++j) {
    valid[j] = valid_bits(n, q0 + j);
    if (init) {
      for (int c = 0; c < 4; ++c) acc[4 * j + c] = zero;
    } else if (valid[j] == 0xFFFFFFFFu) {
      for (int c = 0; c < 4; ++c) acc[4 * j + c] = _mm256_loadu_ps(o + 32 * j + 8 * c);
    } else {  // the row's last, partial word: never read past the row
      std::fill(buf, buf + 32, 0.0f);
      std::memcpy(buf, o + 32 * j, sizeof(float) * (n - 32 * (q0 + j)));
      for (int c = 0; c < 4; ++c) acc[4 * j + c] = _mm256_loadu_ps(buf + 8 * c);
    }
  }
  for (int64_t t = 0; t < k; ++t) {
    const int32_t* b = task_base(bank, active, t, stride) + off;
    const __m256 a = _mm256_set1_ps(alpha[t]);
    for (int j = 0; j < NW; ++j) {
      const __m256i wv = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(b[j]) & valid[j]));
      for (int c = 0; c < 4; ++c)
        acc[4 * j + c] = _mm256_add_ps(acc[4 * j + c], _mm256_blendv_ps(zero, a, _mm256_castsi256_ps(_mm256_sllv_epi32(wv, sh[c]))));
    }
  }
  for (int j = 0; j < NW; ++j) {
    float* oj = o + 32 * j;
    if (valid[j] == 0xFFFFFFFFu) {
      for (int c = 0; c < 4; ++c) _mm256_storeu_ps(oj + 8 * c, acc[4 * j + c]);
    } else {
      for (int c = 0; c < 4; ++c) _mm256_storeu_ps(buf + 8 * c, acc[4 * j + c]);
      std::memcpy(oj, buf, sizeof(float) * (n - 32 * (q0 + j)));
    }
  }
}

void superpose_avx2(const int32_t* bank, int64_t k, int64_t W, int64_t n, int64_t R, const float* alpha,
                    const int64_t* active, float* out, int64_t r0, int64_t r1) {
  superpose_blocks<2>(superpose_words_avx2<2>, superpose_words_avx2<1>, bank, k, W, n, R, alpha, active, out, r0, r1);
}

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

// ------------------------------------------------------------------------------------------------
// AVX-512
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))

// v is streamed in blocks that stay in L2 while every task of this thread's range runs over it,
// NT tasks at a time sharing each v load (docs/design.md, Performance: the loop shape matters more than the ISA).
constexpr int64_t kVBlockWords = 512;  // 512 words = 16,384 floats = 64 KiB of v

template <int NT>
AVX512_TARGET void mask_dot_block512(const int32_t* const* tb, int64_t fw0, int64_t fw1, int64_t W, int64_t n,
                                     const float* v, float* part) {
  __m512 acc[2 * NT];
  for (int i = 0; i < 2 * NT; ++i) acc[i] = _mm512_loadu_ps(part + 16 * i);
  int64_t r = fw0 / W, q = fw0 % W;
  for (int64_t fw = fw0; fw < fw1; ++fw) {
    const uint32_t valid = valid_bits(n, q);
    const float* vp = v + r * n + 32 * q;
    const __m512 v0 = _mm512_maskz_loadu_ps(static_cast<__mmask16>(valid), vp);
    const __m512 v1 = _mm512_maskz_loadu_ps(static_cast<__mmask16>(valid >> 16), vp + 16);
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const uint32_t word = static_cast<uint32_t>(tb[t][fw]);
      acc[2 * t] = _mm512_mask_add_ps(acc[2 * t], static_cast<__mmask16>(word), acc[2 * t], v0);
      acc[2 * t + 1] = _mm512_mask_add_ps(acc[2 * t + 1], static_cast<__mmask16>(word >> 16), acc[2 * t + 1], v1);
    }
    if (++q == W) {
      q = 0;
      ++r;
    }
  }
  for (int i = 0; i < 2 * NT; ++i) _mm512_storeu_ps(part + 16 * i, acc[i]);
}

AVX512_TARGET void mask_dot_avx512(const int32_t* bank, int64_t R, int64_t W, int64_t n, const float* v,
                                   const int64_t* active, int64_t k, float* out, int64_t fw0, int64_t fw1) {
  const int64_t stride = R * W;
  std::vector<float> part(static_cast<size_t>(k) * 32, 0.0f);
  std::vector<const int32_t*> tb(static_cast<size_t>(k));
  for (int64_t t = 0; t < k; ++t) tb[t] = task_base(bank, active, t, stride);
  for (int64_t b0 = fw0; b0 < fw1; b0 += kVBlockWords) {
    const int64_t b1 = std::min(fw1, b0 + kVBlockWords);
    int64_t t = 0;
    for (; t + 8 <= k; t += 8) mask_dot_block512<8>(tb.data() + t, b0, b1, W, n, v, part.data() + 32 * t);
    for (; t < k; ++t) mask_dot_block512<1>(tb.data() + t, b0, b1, W, n, v, part.data() + 32 * t);
  }
  for (int64_t t = 0; t < k; ++t)
    out[t] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_loadu_ps(&part[32 * t]), _mm512_loadu_ps(&part[32 * t + 16])));
}

template <int NW>
AVX512_TARGET void superpose_words512(const int32_t* bank, int64_t k, int64_t stride, int64_t off, int64_t q0,
                                      int64_t n, const float* alpha, const int64_t* active, float* o, bool init) {
  __m512 acc[2 * NW];
  for (int j = 0; j < NW; ++j) {
    const uint32_t valid = valid_bits(n, q0 + j);
    acc[2 * j] = init ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(static_cast<__mmask16>(valid), o + 32 * j);
    acc[2 * j + 1] = init ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(static_cast<__mmask16>(valid >> 16), o + 32 * j + 16);
  }
  for (int64_t t = 0; t < k; ++t) {
    const int32_t* b = task_base(bank, active, t, stride) + off;
    const __m512 a = _mm512_set1_ps(alpha[t]);
#pragma GCC unroll 8
    for (int j = 0; j < NW; ++j) {
      const uint32_t word = static_cast<uint32_t>(b[j]);
      acc[2 * j] = _mm512_mask_add_ps(acc[2 * j], static_cast<__mmask16>(word), acc[2 * j], a);
      acc[2 * j + 1] = _mm512_mask_add_ps(acc[2 * j + 1], static_cast<__mmask16>(word >> 16), acc[2 * j + 1], a);
    }
  }
  for (int j = 0; j < NW; ++j) {
    const uint32_t valid = valid_bits(n, q0 + j);
    _mm512_mask_storeu_ps(o + 32 * j, static_cast<__mmask16>(valid), acc[2 * j]);
    _mm512_mask_storeu_ps(o + 32 * j + 16, static_cast<__mmask16>(valid >> 16), acc[2 * j + 1]);
  }
}

void superpose_avx512(const int32_t* bank, int64_t k, int64_t W, int64_t n, int64_t R, const float* alpha,
                      const int64_t* active, float* out, int64_t r0, int64_t r1) {
  superpose_blocks<8>(superpose_words512<8>, superpose_words512<1>, bank, k, W, n, R, alpha, active, out, r0, r1);
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

// ------------------------------------------------------------------------------------------------
Isa detect_isa() {
  __builtin_cpu_init();
  Isa best = Isa::Scalar;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::Avx2;
  if (best == Isa::Avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    best = Isa::Avx512;
  if (const char* env = std::getenv("SUPSUP_CPU_ISA")) {
    Isa want = best;
    if (!std::strcmp(env, "scalar")) want = Isa::Scalar;
    else if (!std::strcmp(env, "avx2")) want = Isa::Avx2;
    else if (!std::strcmp(env, "avx512")) want = Isa::Avx512;
    if (static_cast<int>(want) < static_cast<int>(best)) best = want;  // never above what the CPU has
  }
  return best;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

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

void mask_dot(Isa isa, const int32_t* bank, int64_t R, int64_t W, int64_t n, const float* v, const int64_t* active,
              int64_t k, float* out, int64_t fw0, int64_t fw1) {
  if (isa == Isa::Avx512) {
    // The tables cost a few vector ops per word of v, shared by all tasks: worth it from a few tasks on.
    if (k >= 4) return mask_dot_lut(isa, bank, R, W, n, v, 1, 0, active, k, out, fw0, fw1);
    return mask_dot_avx512(bank, R, W, n, v, active, k, out, fw0, fw1);
  }
  if (isa == Isa::Avx2) {
    if (k >= 4) return mask_dot_lut(isa, bank, R, W, n, v, 1, 0, active, k, out, fw0, fw1);
    return mask_dot_avx2(bank, R, W, n, v, active, k, out, fw0, fw1);
  }
  mask_dot_scalar(bank, R, W, n, v, active, k, out, fw0, fw1);
}

bool mask_dot_rank1(Isa isa, const int32_t* bank, int64_t R, int64_t W, int64_t n, const float* g, const float* x,
                    const float* w, int64_t k, float* out, int64_t fw0, int64_t fw1) {
  if (!lut_available(isa) || k < 4) return false;
  mask_dot_lut_rank1(isa, bank, R, W, n, g, x, w, k, out, fw0, fw1);
  return true;
}

void superpose(Isa isa, const int32_t* bank, int64_t k, int64_t W, int64_t n, int64_t R, const float* alpha,
               const int64_t* active, float* out, int64_t r0, int64_t r1) {
  if (isa == Isa::Avx512) return superpose_avx512(bank, k, W, n, R, alpha, active, out, r0, r1);
  if (isa == Isa::Avx2) return superpose_avx2(bank, k, W, n, R, alpha, active, out, r0, r1);
  superpose_scalar(bank, k, W, n, R, alpha, active, out, r0, r1);
}

void masked_weight(Isa isa, const float* w, const int32_t* words, int64_t n, int64_t W, float* out, int64_t r0,
                   int64_t r1) {
  if (isa == Isa::Avx512) return masked_weight_avx512(w, words, n, W, out, r0, r1);
  if (isa == Isa::Avx2) return masked_weight_avx2(w, words, n, W, out, r0, r1);
  masked_weight_scalar(w, words, n, W, out, r0, r1);
}

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

namespace supsup_cpu {
namespace {
// Elementwise kernels: AVX-512 where the CPU has it (the translation unit's baseline is SSE2), a
// branch-free scalar loop otherwise. Both read every input unconditionally so they vectorise.
AVX512_TARGET void rmsprop_avx512(float* p, const float* g, float* sq, float lr, float alpha, float eps, float wd,
                                  int64_t i0, int64_t i1) {
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(1.0f - alpha), vlr = _mm512_set1_ps(-lr),
               ve = _mm512_set1_ps(eps), vwd = _mm512_set1_ps(wd);
  int64_t i = i0;
  for (; i < i1; i += 16) {
    const __mmask16 m = i + 16 <= i1 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (i1 - i)) - 1u);
    const __m512 pv = _mm512_maskz_loadu_ps(m, p + i);
    __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
    if (wd != 0.0f) gv = _mm512_add_ps(gv, _mm512_mul_ps(vwd, pv));
    const __m512 s = _mm512_add_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, sq + i), va), _mm512_mul_ps(_mm512_mul_ps(vb, gv), gv));
    _mm512_mask_storeu_ps(sq + i, m, s);
    const __m512 upd = _mm512_div_ps(_mm512_mul_ps(vlr, gv), _mm512_add_ps(_mm512_sqrt_ps(s), ve));
    _mm512_mask_storeu_ps(p + i, m, _mm512_add_ps(pv, upd));
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
}  // namespace

void rmsprop_step(Isa isa, float* param, const float* grad, float* square_avg, float lr, float alpha, float eps,
                  float weight_decay, int64_t i0, int64_t i1) {
  if (isa == Isa::Avx512) return rmsprop_avx512(param, grad, square_avg, lr, alpha, eps, weight_decay, i0, i1);
  const float one_minus_alpha = 1.0f - alpha;
  for (int64_t i = i0; i < i1; ++i) {
    const float g = grad[i] + weight_decay * param[i];
    const float sq = square_avg[i] * alpha + one_minus_alpha * g * g;
    square_avg[i] = sq;
    param[i] = param[i] + (-lr) * g / (std::sqrt(sq) + eps);
  }
}

void threshold_masked_weight(Isa isa, const float* scores, const float* w, float* out, int64_t i0, int64_t i1) {
  if (isa == Isa::Avx512) return threshold_avx512(scores, w, out, i0, i1);
  for (int64_t i = i0; i < i1; ++i) {
    const float wv = w[i];
    out[i] = scores[i] >= 0.0f ? wv : 0.0f;
  }
}
}  // namespace supsup_cpu

namespace supsup_cpu {
namespace {
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
}  // namespace

void signed_masked_weight(Isa isa, const int32_t* sign_words, const int32_t* mask_words, float scale, int64_t n,
                          int64_t W, float* out, int64_t r0, int64_t r1) {
  if (isa == Isa::Avx512) return signed_masked_weight_avx512(sign_words, mask_words, scale, n, W, out, r0, r1);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t shift = j % 32;
      const bool keep = (static_cast<uint32_t>(mask_words[r * W + j / 32]) >> shift) & 1u;
      const bool pos = (static_cast<uint32_t>(sign_words[r * W + j / 32]) >> shift) & 1u;
      out[r * n + j] = keep ? (pos ? scale : -scale) : 0.0f;
    }
}
}  // namespace supsup_cpu
