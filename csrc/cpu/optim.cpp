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

}  // namespace supsup_cpu
