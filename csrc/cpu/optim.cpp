// The fused optimiser steps of score training: RMSprop on a gradient (FusedRMSprop), and the
// straight-through RMSprop / Adam steps of a threshold supermask layer, which start from the weight
// gradient and also write the next step's masked weight. The scalars come from the caller, computed
// in double as torch computes them (1 - beta in float would be off by up to 5e-5 relative).
#include "kernels.h"
#include "simd.h"

#include <cmath>
#include <cstdint>
#include <cstring>

namespace supsup_cpu {

namespace {

#if SUPSUP_X86
inline __mmask16 tail_mask(int64_t i, int64_t i1) {
  return i + 16 <= i1 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (i1 - i)) - 1u);
}

// RMSprop on p from gradient g: v = a v + (1 - a) g²; p += -lr g / (√v + eps). Returns the new p.
AVX512_TARGET inline __m512 rmsprop16(__m512 pv, __m512 gv, float* sq, __mmask16 m, const RmspropScalars& c) {
  const __m512 s = _mm512_add_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, sq), _mm512_set1_ps(c.alpha)),
                                 _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(c.one_minus_alpha), gv), gv));
  _mm512_mask_storeu_ps(sq, m, s);
  const __m512 upd = _mm512_div_ps(_mm512_mul_ps(_mm512_set1_ps(-c.lr), gv),
                                   _mm512_add_ps(_mm512_sqrt_ps(s), _mm512_set1_ps(c.eps)));
  return _mm512_add_ps(pv, upd);
}

AVX2_TARGET inline __m256 rmsprop8(__m256 pv, __m256 gv, float* sq, const RmspropScalars& c) {
  const __m256 s = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(sq), _mm256_set1_ps(c.alpha)),
                                 _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(c.one_minus_alpha), gv), gv));
  _mm256_storeu_ps(sq, s);
  const __m256 upd = _mm256_div_ps(_mm256_mul_ps(_mm256_set1_ps(-c.lr), gv),
                                   _mm256_add_ps(_mm256_sqrt_ps(s), _mm256_set1_ps(c.eps)));
  return _mm256_add_ps(pv, upd);
}
#endif  // SUPSUP_X86

inline float rmsprop1(float p, float g, float* sq, const RmspropScalars& c) {
  const float s = *sq * c.alpha + c.one_minus_alpha * g * g;
  *sq = s;
  return p + (-c.lr) * g / (std::sqrt(s) + c.eps);
}

#if SUPSUP_X86
AVX512_TARGET void rmsprop_avx512(float* p, const float* g, float* sq, const RmspropScalars& c, int64_t i0, int64_t i1) {
  const __m512 vwd = _mm512_set1_ps(c.weight_decay);
  for (int64_t i = i0; i < i1; i += 16) {
    const __mmask16 m = tail_mask(i, i1);
    const __m512 pv = _mm512_maskz_loadu_ps(m, p + i);
    __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
    if (c.weight_decay != 0.0f) gv = _mm512_add_ps(gv, _mm512_mul_ps(vwd, pv));
    _mm512_mask_storeu_ps(p + i, m, rmsprop16(pv, gv, sq + i, m, c));
  }
}
#endif  // SUPSUP_X86

// The scalar loops take their constants by value, the weight-decay test out of the loop and `omp simd`
// (element-wise: no loop-carried dependence, as the AVX kernels assume): then compilers vectorise
// them (SSE on x86, NEON on ARM).
template <bool DECAY>
void rmsprop_loop(float* p, const float* g, float* sq, const RmspropScalars c, int64_t i0, int64_t i1) {
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) {
    float gi = g[i];
    if (DECAY) gi += c.weight_decay * p[i];
    p[i] = rmsprop1(p[i], gi, sq + i, c);
  }
}

void rmsprop_scalar(float* p, const float* g, float* sq, const RmspropScalars& c, int64_t i0, int64_t i1) {
  if (c.weight_decay != 0.0f) return rmsprop_loop<true>(p, g, sq, c, i0, i1);
  rmsprop_loop<false>(p, g, sq, c, i0, i1);
}

#if SUPSUP_X86
// AVX2: 8 at a time, the tail by the scalar rule (the scalar loop alone ran 1.11 ms for 2^20 scores
// against 0.26 with AVX-512 on the Xeon VM: its sqrt and division were not vectorised).
AVX2_TARGET void rmsprop_avx2(float* p, const float* g, float* sq, const RmspropScalars& c, int64_t i0, int64_t i1) {
  const __m256 vwd = _mm256_set1_ps(c.weight_decay);
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) {
    const __m256 pv = _mm256_loadu_ps(p + i);
    __m256 gv = _mm256_loadu_ps(g + i);
    if (c.weight_decay != 0.0f) gv = _mm256_add_ps(gv, _mm256_mul_ps(vwd, pv));
    _mm256_storeu_ps(p + i, rmsprop8(pv, gv, sq + i, c));
  }
  rmsprop_scalar(p, g, sq, c, i, i1);
}
#endif  // SUPSUP_X86

#if SUPSUP_X86
// The straight-through step: g = dW ⊙ w (+ wd p), then the rule, then out = p_new ≥ 0 ? w : 0.
AVX512_TARGET void ste_rmsprop_avx512(float* p, const float* dw, const float* w, float* sq, float* out,
                                      const RmspropScalars& c, int64_t i0, int64_t i1) {
  const __m512 vwd = _mm512_set1_ps(c.weight_decay), zero = _mm512_setzero_ps();
  for (int64_t i = i0; i < i1; i += 16) {
    const __mmask16 m = tail_mask(i, i1);
    const __m512 pv = _mm512_maskz_loadu_ps(m, p + i), wv = _mm512_maskz_loadu_ps(m, w + i);
    __m512 gv = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, dw + i), wv);
    if (c.weight_decay != 0.0f) gv = _mm512_add_ps(gv, _mm512_mul_ps(vwd, pv));
    const __m512 pn = rmsprop16(pv, gv, sq + i, m, c);
    _mm512_mask_storeu_ps(p + i, m, pn);
    _mm512_mask_storeu_ps(out + i, m, _mm512_maskz_mov_ps(_mm512_mask_cmp_ps_mask(m, pn, zero, _CMP_GE_OQ), wv));
  }
}
#endif  // SUPSUP_X86

template <bool DECAY>
void ste_rmsprop_loop(float* p, const float* dw, const float* w, float* sq, float* out, const RmspropScalars c,
                      int64_t i0, int64_t i1) {
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) {
    const float wi = w[i];
    float g = dw[i] * wi;
    if (DECAY) g += c.weight_decay * p[i];
    const float pn = rmsprop1(p[i], g, sq + i, c);
    p[i] = pn;
    out[i] = pn >= 0.0f ? wi : 0.0f;
  }
}

void ste_rmsprop_scalar(float* p, const float* dw, const float* w, float* sq, float* out, const RmspropScalars& c,
                        int64_t i0, int64_t i1) {
  if (c.weight_decay != 0.0f) return ste_rmsprop_loop<true>(p, dw, w, sq, out, c, i0, i1);
  ste_rmsprop_loop<false>(p, dw, w, sq, out, c, i0, i1);
}

#if SUPSUP_X86
AVX2_TARGET void ste_rmsprop_avx2(float* p, const float* dw, const float* w, float* sq, float* out,
                                  const RmspropScalars& c, int64_t i0, int64_t i1) {
  const __m256 vwd = _mm256_set1_ps(c.weight_decay), zero = _mm256_setzero_ps();
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) {
    const __m256 pv = _mm256_loadu_ps(p + i), wv = _mm256_loadu_ps(w + i);
    __m256 gv = _mm256_mul_ps(_mm256_loadu_ps(dw + i), wv);
    if (c.weight_decay != 0.0f) gv = _mm256_add_ps(gv, _mm256_mul_ps(vwd, pv));
    const __m256 pn = rmsprop8(pv, gv, sq + i, c);
    _mm256_storeu_ps(p + i, pn);
    _mm256_storeu_ps(out + i, _mm256_and_ps(_mm256_cmp_ps(pn, zero, _CMP_GE_OQ), wv));
  }
  ste_rmsprop_scalar(p, dw, w, sq, out, c, i, i1);
}
#endif  // SUPSUP_X86

// The straight-through RMSprop step on row o, columns [j, j + cols) of a layer whose masks are bits
// (ste_rmsprop_bits_step): the frozen weight is read from `fw`, and the next mask is written as
// bits. Bits are read and written as the 16-bit (AVX-512) or 8-bit (AVX2) pieces of the row's
// little-endian 32-bit words, each piece by one lane group of one thread.
inline uint32_t bit_piece(const int32_t* row_words, int64_t col, int width) {  // bits [col, col + width), col % width == 0
  uint32_t word;
  std::memcpy(&word, row_words + col / 32, sizeof word);
  return (word >> (col % 32)) & ((1u << width) - 1u);
}

inline void set_bits(int32_t* row_words, int64_t col, uint32_t bits, int width) {  // the same piece, written
  uint32_t word;
  std::memcpy(&word, row_words + col / 32, sizeof word);
  const uint32_t keep = ~(((1u << width) - 1u) << (col % 32));
  word = (word & keep) | (bits << (col % 32));
  std::memcpy(row_words + col / 32, &word, sizeof word);
}

#if SUPSUP_X86
template <bool SIGNED>
AVX512_TARGET void ste_rmsprop_bits_avx512(float* p, const float* dw, const FrozenWeight& fw, float* sq, int32_t* mask_words,
                                           const RmspropScalars& c, int64_t o, int64_t j, int64_t cols) {
  const __m512 vwd = _mm512_set1_ps(c.weight_decay), zero = _mm512_setzero_ps();
  const __m512 pos = _mm512_set1_ps(fw.scale), neg = _mm512_set1_ps(-fw.scale);
  const int64_t at = o * fw.in_features + j;
  int32_t* mrow = mask_words + o * fw.words_per_row;
  for (int64_t i = 0; i < cols; i += 16) {
    const __mmask16 m = tail_mask(i, cols);
    const __m512 pv = _mm512_maskz_loadu_ps(m, p + at + i);
    __m512 wv;
    if constexpr (SIGNED) wv = _mm512_mask_blend_ps(static_cast<__mmask16>(bit_piece(fw.sign_words + o * fw.words_per_row, j + i, 16)), neg, pos);
    else wv = _mm512_maskz_loadu_ps(m, fw.weight + at + i);
    __m512 gv = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, dw + i), wv);
    if (c.weight_decay != 0.0f) gv = _mm512_add_ps(gv, _mm512_mul_ps(vwd, pv));
    const __m512 pn = rmsprop16(pv, gv, sq + at + i, m, c);
    _mm512_mask_storeu_ps(p + at + i, m, pn);
    set_bits(mrow, j + i, _mm512_mask_cmp_ps_mask(m, pn, zero, _CMP_GE_OQ), 16);
  }
}
#endif  // SUPSUP_X86

inline float frozen_weight(const FrozenWeight& fw, int64_t o, int64_t col) {
  if (!fw.sign_words) return fw.weight[o * fw.in_features + col];
  return bit_piece(fw.sign_words + o * fw.words_per_row, col, 1) ? fw.scale : -fw.scale;
}

void ste_rmsprop_bits_scalar(float* p, const float* dw, const FrozenWeight& fw, float* sq, int32_t* mask_words,
                             const RmspropScalars& c, int64_t o, int64_t j, int64_t cols) {
  int32_t* mrow = mask_words + o * fw.words_per_row;
  for (int64_t i = 0; i < cols; ++i) {
    const int64_t at = o * fw.in_features + j + i;
    float g = dw[i] * frozen_weight(fw, o, j + i);
    if (c.weight_decay != 0.0f) g += c.weight_decay * p[at];
    const float pn = rmsprop1(p[at], g, sq + at, c);
    p[at] = pn;
    set_bits(mrow, j + i, pn >= 0.0f ? 1u : 0u, 1);
  }
}

#if SUPSUP_X86
template <bool SIGNED>
AVX2_TARGET void ste_rmsprop_bits_avx2(float* p, const float* dw, const FrozenWeight& fw, float* sq, int32_t* mask_words,
                                       const RmspropScalars& c, int64_t o, int64_t j, int64_t cols) {
  const __m256 vwd = _mm256_set1_ps(c.weight_decay), zero = _mm256_setzero_ps();
  const __m256 pos = _mm256_set1_ps(fw.scale), neg = _mm256_set1_ps(-fw.scale);
  const int64_t at = o * fw.in_features + j;
  int32_t* mrow = mask_words + o * fw.words_per_row;
  int64_t i = 0;
  for (; i + 8 <= cols; i += 8) {
    const __m256 pv = _mm256_loadu_ps(p + at + i);
    __m256 wv;
    if constexpr (SIGNED) wv = _mm256_blendv_ps(neg, pos, bits8(bit_piece(fw.sign_words + o * fw.words_per_row, j + i, 8)));
    else wv = _mm256_loadu_ps(fw.weight + at + i);
    __m256 gv = _mm256_mul_ps(_mm256_loadu_ps(dw + i), wv);
    if (c.weight_decay != 0.0f) gv = _mm256_add_ps(gv, _mm256_mul_ps(vwd, pv));
    const __m256 pn = rmsprop8(pv, gv, sq + at + i, c);
    _mm256_storeu_ps(p + at + i, pn);
    set_bits(mrow, j + i, static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(pn, zero, _CMP_GE_OQ))), 8);
  }
  ste_rmsprop_bits_scalar(p, dw + i, fw, sq, mask_words, c, o, j + i, cols - i);
}
#endif  // SUPSUP_X86

#if SUPSUP_X86
// Adam: m = (m or g) + m_coef (g - m) (kernels.h); v = b2 v + (1 - b2) g²; p += -step_size m / (√v / bc2_sqrt + eps).
AVX512_TARGET void ste_adam_avx512(float* p, const float* dw, const float* w, float* m, float* v, float* out,
                                   const AdamScalars& c, int64_t i0, int64_t i1) {
  const __m512 vb1 = _mm512_set1_ps(c.m_coef), vb2 = _mm512_set1_ps(c.beta2), vc2 = _mm512_set1_ps(c.one_minus_beta2),
               vstep = _mm512_set1_ps(-c.step_size), vbc2 = _mm512_set1_ps(c.bias_correction2_sqrt),
               ve = _mm512_set1_ps(c.eps), vwd = _mm512_set1_ps(c.weight_decay), zero = _mm512_setzero_ps();
  for (int64_t i = i0; i < i1; i += 16) {
    const __mmask16 k = tail_mask(i, i1);
    const __m512 pv = _mm512_maskz_loadu_ps(k, p + i), wv = _mm512_maskz_loadu_ps(k, w + i);
    __m512 gv = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, dw + i), wv);
    if (c.weight_decay != 0.0f) gv = _mm512_add_ps(gv, _mm512_mul_ps(vwd, pv));
    __m512 mv = _mm512_maskz_loadu_ps(k, m + i);
    mv = _mm512_add_ps(c.m_from_g ? gv : mv, _mm512_mul_ps(vb1, _mm512_sub_ps(gv, mv)));
    const __m512 sv = _mm512_add_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, v + i), vb2), _mm512_mul_ps(_mm512_mul_ps(vc2, gv), gv));
    _mm512_mask_storeu_ps(m + i, k, mv);
    _mm512_mask_storeu_ps(v + i, k, sv);
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(sv), vbc2), ve);
    const __m512 pn = _mm512_add_ps(pv, _mm512_div_ps(_mm512_mul_ps(vstep, mv), denom));
    _mm512_mask_storeu_ps(p + i, k, pn);
    _mm512_mask_storeu_ps(out + i, k, _mm512_maskz_mov_ps(_mm512_mask_cmp_ps_mask(k, pn, zero, _CMP_GE_OQ), wv));
  }
}
#endif  // SUPSUP_X86

template <bool DECAY>
void ste_adam_loop(float* p, const float* dw, const float* w, float* m, float* v, float* out, const AdamScalars c,
                   int64_t i0, int64_t i1) {
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) {
    const float wi = w[i];
    float g = dw[i] * wi;
    if (DECAY) g += c.weight_decay * p[i];
    const float mi = (c.m_from_g ? g : m[i]) + c.m_coef * (g - m[i]);
    const float vi = v[i] * c.beta2 + c.one_minus_beta2 * g * g;
    m[i] = mi;
    v[i] = vi;
    const float pn = p[i] + (-c.step_size) * mi / (std::sqrt(vi) / c.bias_correction2_sqrt + c.eps);
    p[i] = pn;
    out[i] = pn >= 0.0f ? wi : 0.0f;
  }
}

void ste_adam_scalar(float* p, const float* dw, const float* w, float* m, float* v, float* out, const AdamScalars& c,
                     int64_t i0, int64_t i1) {
  if (c.weight_decay != 0.0f) return ste_adam_loop<true>(p, dw, w, m, v, out, c, i0, i1);
  ste_adam_loop<false>(p, dw, w, m, v, out, c, i0, i1);
}

#if SUPSUP_X86
AVX2_TARGET void ste_adam_avx2(float* p, const float* dw, const float* w, float* m, float* v, float* out,
                               const AdamScalars& c, int64_t i0, int64_t i1) {
  const __m256 vb1 = _mm256_set1_ps(c.m_coef), vb2 = _mm256_set1_ps(c.beta2), vc2 = _mm256_set1_ps(c.one_minus_beta2),
               vstep = _mm256_set1_ps(-c.step_size), vbc2 = _mm256_set1_ps(c.bias_correction2_sqrt),
               ve = _mm256_set1_ps(c.eps), vwd = _mm256_set1_ps(c.weight_decay), zero = _mm256_setzero_ps();
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) {
    const __m256 pv = _mm256_loadu_ps(p + i), wv = _mm256_loadu_ps(w + i);
    __m256 gv = _mm256_mul_ps(_mm256_loadu_ps(dw + i), wv);
    if (c.weight_decay != 0.0f) gv = _mm256_add_ps(gv, _mm256_mul_ps(vwd, pv));
    __m256 mv = _mm256_loadu_ps(m + i);
    mv = _mm256_add_ps(c.m_from_g ? gv : mv, _mm256_mul_ps(vb1, _mm256_sub_ps(gv, mv)));
    const __m256 sv = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(v + i), vb2), _mm256_mul_ps(_mm256_mul_ps(vc2, gv), gv));
    _mm256_storeu_ps(m + i, mv);
    _mm256_storeu_ps(v + i, sv);
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(sv), vbc2), ve);
    const __m256 pn = _mm256_add_ps(pv, _mm256_div_ps(_mm256_mul_ps(vstep, mv), denom));
    _mm256_storeu_ps(p + i, pn);
    _mm256_storeu_ps(out + i, _mm256_and_ps(_mm256_cmp_ps(pn, zero, _CMP_GE_OQ), wv));
  }
  ste_adam_scalar(p, dw, w, m, v, out, c, i, i1);
}
#endif  // SUPSUP_X86

}  // namespace

void rmsprop_step(Isa isa, float* param, const float* grad, float* square_avg, const RmspropScalars& c, int64_t i0,
                  int64_t i1) {
#if SUPSUP_X86
  if (isa == Isa::Avx512) return rmsprop_avx512(param, grad, square_avg, c, i0, i1);
  if (isa == Isa::Avx2) return rmsprop_avx2(param, grad, square_avg, c, i0, i1);
#endif
  rmsprop_scalar(param, grad, square_avg, c, i0, i1);
}

void ste_rmsprop_step(Isa isa, float* param, const float* weight_grad, const float* weight, float* square_avg,
                      float* masked_weight, const RmspropScalars& c, int64_t i0, int64_t i1) {
#if SUPSUP_X86
  if (isa == Isa::Avx512) return ste_rmsprop_avx512(param, weight_grad, weight, square_avg, masked_weight, c, i0, i1);
  if (isa == Isa::Avx2) return ste_rmsprop_avx2(param, weight_grad, weight, square_avg, masked_weight, c, i0, i1);
#endif
  ste_rmsprop_scalar(param, weight_grad, weight, square_avg, masked_weight, c, i0, i1);
}

void ste_rmsprop_bits_step(Isa isa, float* param, const float* weight_grad, const FrozenWeight& fw, float* square_avg,
                           int32_t* mask_words, const RmspropScalars& c, int64_t o, int64_t j, int64_t cols) {
  const bool sign = fw.sign_words != nullptr;
#if SUPSUP_X86
  if (isa == Isa::Avx512 && j % 16 == 0)
    return sign ? ste_rmsprop_bits_avx512<true>(param, weight_grad, fw, square_avg, mask_words, c, o, j, cols)
                : ste_rmsprop_bits_avx512<false>(param, weight_grad, fw, square_avg, mask_words, c, o, j, cols);
  if (isa != Isa::Scalar && j % 8 == 0)
    return sign ? ste_rmsprop_bits_avx2<true>(param, weight_grad, fw, square_avg, mask_words, c, o, j, cols)
                : ste_rmsprop_bits_avx2<false>(param, weight_grad, fw, square_avg, mask_words, c, o, j, cols);
#endif  // SUPSUP_X86
  ste_rmsprop_bits_scalar(param, weight_grad, fw, square_avg, mask_words, c, o, j, cols);
}

void ste_adam_step(Isa isa, float* param, const float* weight_grad, const float* weight, float* exp_avg,
                   float* exp_avg_sq, float* masked_weight, const AdamScalars& c, int64_t i0, int64_t i1) {
#if SUPSUP_X86
  if (isa == Isa::Avx512) return ste_adam_avx512(param, weight_grad, weight, exp_avg, exp_avg_sq, masked_weight, c, i0, i1);
  if (isa == Isa::Avx2) return ste_adam_avx2(param, weight_grad, weight, exp_avg, exp_avg_sq, masked_weight, c, i0, i1);
#endif
  ste_adam_scalar(param, weight_grad, weight, exp_avg, exp_avg_sq, masked_weight, c, i0, i1);
}

}  // namespace supsup_cpu
