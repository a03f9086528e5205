// The fused optimiser step of score training.
#include "kernels.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

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

// The fused straight-through RMSprop step of a threshold supermask layer (one pass per element):
// g = dW * w + wd * p (the score gradient of W ⊙ 1[p ≥ 0] is dL/dW_eff ⊙ W), the RMSprop update of p,
// and the next step's masked weight out = p_new ≥ 0 ? w : 0.
AVX512_TARGET void ste_rmsprop_avx512(float* p, const float* dw, const float* w, float* sq, float* out, float lr,
                                      float alpha, float eps, float wd, int64_t i0, int64_t i1) {
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(1.0f - alpha), vlr = _mm512_set1_ps(-lr),
               ve = _mm512_set1_ps(eps), vwd = _mm512_set1_ps(wd), zero = _mm512_setzero_ps();
  for (int64_t i = i0; i < i1; i += 16) {
    const __mmask16 m = i + 16 <= i1 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (i1 - i)) - 1u);
    const __m512 pv = _mm512_maskz_loadu_ps(m, p + i), wv = _mm512_maskz_loadu_ps(m, w + i);
    __m512 gv = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, dw + i), wv);
    if (wd != 0.0f) gv = _mm512_add_ps(gv, _mm512_mul_ps(vwd, pv));
    const __m512 s = _mm512_add_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, sq + i), va), _mm512_mul_ps(_mm512_mul_ps(vb, gv), gv));
    _mm512_mask_storeu_ps(sq + i, m, s);
    const __m512 pn = _mm512_add_ps(pv, _mm512_div_ps(_mm512_mul_ps(vlr, gv), _mm512_add_ps(_mm512_sqrt_ps(s), ve)));
    _mm512_mask_storeu_ps(p + i, m, pn);
    const __mmask16 keep = _mm512_mask_cmp_ps_mask(m, pn, zero, _CMP_GE_OQ);
    _mm512_mask_storeu_ps(out + i, m, _mm512_maskz_mov_ps(keep, wv));
  }
}

AVX2_TARGET void ste_rmsprop_avx2(float* p, const float* dw, const float* w, float* sq, float* out, float lr,
                                  float alpha, float eps, float wd, int64_t i0, int64_t i1) {
  const __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(1.0f - alpha), vlr = _mm256_set1_ps(-lr),
               ve = _mm256_set1_ps(eps), vwd = _mm256_set1_ps(wd), zero = _mm256_setzero_ps();
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) {
    const __m256 pv = _mm256_loadu_ps(p + i), wv = _mm256_loadu_ps(w + i);
    __m256 gv = _mm256_mul_ps(_mm256_loadu_ps(dw + i), wv);
    if (wd != 0.0f) gv = _mm256_add_ps(gv, _mm256_mul_ps(vwd, pv));
    const __m256 s = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(sq + i), va), _mm256_mul_ps(_mm256_mul_ps(vb, gv), gv));
    _mm256_storeu_ps(sq + i, s);
    const __m256 pn = _mm256_add_ps(pv, _mm256_div_ps(_mm256_mul_ps(vlr, gv), _mm256_add_ps(_mm256_sqrt_ps(s), ve)));
    _mm256_storeu_ps(p + i, pn);
    _mm256_storeu_ps(out + i, _mm256_and_ps(_mm256_cmp_ps(pn, zero, _CMP_GE_OQ), wv));
  }
  ste_rmsprop_scalar(p, dw, w, sq, out, lr, alpha, eps, wd, i, i1);
}

// The same for Adam (torch.optim.Adam without amsgrad): g = dW * w + wd * p; m += (1 - b1)(g - m);
// v = b2 v + (1 - b2) g²; p -= step_size · m / (√v / bc2_sqrt + eps); out = p ≥ 0 ? w : 0.
AVX512_TARGET void ste_adam_avx512(float* p, const float* dw, const float* w, float* m, float* v, float* out,
                                   const AdamScalars& c, int64_t i0, int64_t i1) {
  const __m512 vb1 = _mm512_set1_ps(c.one_minus_beta1), vb2 = _mm512_set1_ps(c.beta2), vc2 = _mm512_set1_ps(c.one_minus_beta2),
               vstep = _mm512_set1_ps(-c.step_size), vbc2 = _mm512_set1_ps(c.bias_correction2_sqrt),
               ve = _mm512_set1_ps(c.eps), vwd = _mm512_set1_ps(c.weight_decay), zero = _mm512_setzero_ps();
  for (int64_t i = i0; i < i1; i += 16) {
    const __mmask16 k = i + 16 <= i1 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (i1 - i)) - 1u);
    const __m512 pv = _mm512_maskz_loadu_ps(k, p + i), wv = _mm512_maskz_loadu_ps(k, w + i);
    __m512 gv = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, dw + i), wv);
    if (c.weight_decay != 0.0f) gv = _mm512_add_ps(gv, _mm512_mul_ps(vwd, pv));
    __m512 mv = _mm512_maskz_loadu_ps(k, m + i);
    mv = _mm512_add_ps(mv, _mm512_mul_ps(vb1, _mm512_sub_ps(gv, mv)));
    const __m512 sv = _mm512_add_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, v + i), vb2), _mm512_mul_ps(_mm512_mul_ps(vc2, gv), gv));
    _mm512_mask_storeu_ps(m + i, k, mv);
    _mm512_mask_storeu_ps(v + i, k, sv);
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(sv), vbc2), ve);
    const __m512 pn = _mm512_add_ps(pv, _mm512_div_ps(_mm512_mul_ps(vstep, mv), denom));
    _mm512_mask_storeu_ps(p + i, k, pn);
    _mm512_mask_storeu_ps(out + i, k, _mm512_maskz_mov_ps(_mm512_mask_cmp_ps_mask(k, pn, zero, _CMP_GE_OQ), wv));
  }
}

AVX2_TARGET void ste_adam_avx2(float* p, const float* dw, const float* w, float* m, float* v, float* out,
                               const AdamScalars& c, int64_t i0, int64_t i1) {
  const __m256 vb1 = _mm256_set1_ps(c.one_minus_beta1), vb2 = _mm256_set1_ps(c.beta2), vc2 = _mm256_set1_ps(c.one_minus_beta2),
               vstep = _mm256_set1_ps(-c.step_size), vbc2 = _mm256_set1_ps(c.bias_correction2_sqrt),
               ve = _mm256_set1_ps(c.eps), vwd = _mm256_set1_ps(c.weight_decay), zero = _mm256_setzero_ps();
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) {
    const __m256 pv = _mm256_loadu_ps(p + i), wv = _mm256_loadu_ps(w + i);
    __m256 gv = _mm256_mul_ps(_mm256_loadu_ps(dw + i), wv);
    if (c.weight_decay != 0.0f) gv = _mm256_add_ps(gv, _mm256_mul_ps(vwd, pv));
    __m256 mv = _mm256_loadu_ps(m + i);
    mv = _mm256_add_ps(mv, _mm256_mul_ps(vb1, _mm256_sub_ps(gv, mv)));
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

}  // namespace

void ste_adam_scalar(float* p, const float* dw, const float* w, float* m, float* v, float* out, const AdamScalars& c,
                     int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    const float g = dw[i] * w[i] + c.weight_decay * p[i];
    const float mi = m[i] + c.one_minus_beta1 * (g - m[i]);
    const float vi = v[i] * c.beta2 + c.one_minus_beta2 * g * g;
    m[i] = mi;
    v[i] = vi;
    const float pn = p[i] + (-c.step_size) * mi / (std::sqrt(vi) / c.bias_correction2_sqrt + c.eps);
    p[i] = pn;
    out[i] = pn >= 0.0f ? w[i] : 0.0f;
  }
}

void ste_adam_step(Isa isa, float* param, const float* weight_grad, const float* weight, float* exp_avg,
                   float* exp_avg_sq, float* masked_weight, const AdamScalars& c, int64_t i0, int64_t i1) {
  if (isa == Isa::Avx512) return ste_adam_avx512(param, weight_grad, weight, exp_avg, exp_avg_sq, masked_weight, c, i0, i1);
  if (isa == Isa::Avx2) return ste_adam_avx2(param, weight_grad, weight, exp_avg, exp_avg_sq, masked_weight, c, i0, i1);
  ste_adam_scalar(param, weight_grad, weight, exp_avg, exp_avg_sq, masked_weight, c, i0, i1);
}

void ste_rmsprop_scalar(float* p, const float* dw, const float* w, float* sq, float* out, float lr, float alpha,
                        float eps, float wd, int64_t i0, int64_t i1) {
  const float one_minus_alpha = 1.0f - alpha;
  for (int64_t i = i0; i < i1; ++i) {
    const float g = dw[i] * w[i] + wd * p[i];
    const float s = sq[i] * alpha + one_minus_alpha * g * g;
    sq[i] = s;
    const float pn = p[i] + (-lr) * g / (std::sqrt(s) + eps);
    p[i] = pn;
    out[i] = pn >= 0.0f ? w[i] : 0.0f;
  }
}

void ste_rmsprop_step(Isa isa, float* param, const float* weight_grad, const float* weight, float* square_avg,
                      float* masked_weight, float lr, float alpha, float eps, float weight_decay, int64_t i0, int64_t i1) {
  if (isa == Isa::Avx512)
    return ste_rmsprop_avx512(param, weight_grad, weight, square_avg, masked_weight, lr, alpha, eps, weight_decay, i0, i1);
  if (isa == Isa::Avx2)
    return ste_rmsprop_avx2(param, weight_grad, weight, square_avg, masked_weight, lr, alpha, eps, weight_decay, i0, i1);
  ste_rmsprop_scalar(param, weight_grad, weight, square_avg, masked_weight, lr, alpha, eps, weight_decay, i0, i1);
}

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

}  // namespace supsup_cpu
