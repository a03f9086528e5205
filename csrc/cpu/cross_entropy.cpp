// Mean softmax cross-entropy and its logits gradient in one pass per row (see kernels.h). ATen's
// log_softmax, nll_loss, exp and div_ on the [128, 500] logits of an s = 500 MLP cost about 120 µs
// a training step, as much as a small layer's GEMM; here each row stays in L1 between its three
// sweeps (max, exp and sum, scale). exp is the Cephes single-precision polynomial, vectorised:
// about 1 ulp, so the loss and gradient match ATen's to float rounding.

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels.h"
#include "simd.h"

namespace supsup_cpu {
namespace {

// exp(x) for x <= 0 (logits minus their row max); 0 below the single-precision range.
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                            4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
constexpr float kExpMin = -87.33654475f;  // below this exp(x) is not a normal float

inline float exp_scalar(float x) { return x < kExpMin ? 0.0f : std::exp(x); }

#if SUPSUP_X86
AVX512_TARGET inline __m512 exp16(__m512 x) {
  const __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpMin), _CMP_LT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(kExpMin));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpP[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~under), _mm512_scalef_ps(p, n));
}

AVX2_TARGET inline __m256 exp8(__m256 x) {
  const __m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(kExpMin), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(kExpMin));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpP[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n by the exponent field: n is in [-126, 0] here
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// Row r: dz = exp(z - max) (unnormalised); returns (max, sum of exp), the max NaN where a logit is NaN
// or +inf (the caller then takes ATen's path).
AVX512_TARGET void row_exp512(const float* z, int64_t C, float* dz, float* mx, float* sum) {
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 bad = 0;  // NaN or +inf
  int64_t c = 0;
  for (; c + 16 <= C; c += 16) {
    const __m512 v = _mm512_loadu_ps(z + c);
    bad |= _mm512_cmp_ps_mask(v, inf, _CMP_NLT_UQ);
    m = _mm512_max_ps(m, v);
  }
  const __mmask16 tail = static_cast<__mmask16>((1u << (C - c)) - 1u);
  if (c < C) {
    const __m512 v = _mm512_maskz_loadu_ps(tail, z + c);
    bad |= _mm512_mask_cmp_ps_mask(tail, v, inf, _CMP_NLT_UQ);
    m = _mm512_mask_max_ps(m, tail, m, v);
  }
  const float rmax = bad ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(m);
  const __m512 vmax = _mm512_set1_ps(rmax);
  __m512 s = _mm512_setzero_ps();
  for (c = 0; c + 16 <= C; c += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(z + c), vmax));
    _mm512_storeu_ps(dz + c, e);
    s = _mm512_add_ps(s, e);
  }
  if (c < C) {
    const __m512 e = _mm512_maskz_mov_ps(tail, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, z + c), vmax)));
    _mm512_mask_storeu_ps(dz + c, tail, e);
    s = _mm512_add_ps(s, e);
  }
  *mx = rmax;
  *sum = _mm512_reduce_add_ps(s);
}

AVX2_TARGET void row_exp256(const float* z, int64_t C, float* dz, float* mx, float* sum) {
  float rmax = -std::numeric_limits<float>::infinity();
  int64_t c = 0;
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 m = _mm256_set1_ps(rmax), bad = _mm256_setzero_ps();  // bad: NaN or +inf
  for (; c + 8 <= C; c += 8) {
    const __m256 v = _mm256_loadu_ps(z + c);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, inf, _CMP_NLT_UQ));
    m = _mm256_max_ps(m, v);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  for (float v : lanes) rmax = std::max(rmax, v);
  bool any_bad = _mm256_movemask_ps(bad) != 0;
  for (int64_t i = c; i < C; ++i) {
    any_bad |= !(z[i] < std::numeric_limits<float>::infinity());
    rmax = std::max(rmax, z[i]);
  }
  if (any_bad) rmax = std::numeric_limits<float>::quiet_NaN();
  const __m256 vmax = _mm256_set1_ps(rmax);
  __m256 s = _mm256_setzero_ps();
  for (c = 0; c + 8 <= C; c += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(z + c), vmax));
    _mm256_storeu_ps(dz + c, e);
    s = _mm256_add_ps(s, e);
  }
  float total = hsum256(s);
  for (int64_t i = c; i < C; ++i) total += (dz[i] = exp_scalar(z[i] - rmax));
  *mx = rmax;
  *sum = total;
}
#endif  // SUPSUP_X86

void row_exp_scalar(const float* z, int64_t C, float* dz, float* mx, float* sum) {
  float rmax = -std::numeric_limits<float>::infinity();
  bool bad = false;  // NaN or +inf
  for (int64_t c = 0; c < C; ++c) {
    bad |= !(z[c] < std::numeric_limits<float>::infinity());
    rmax = std::max(rmax, z[c]);
  }
  if (bad) rmax = std::numeric_limits<float>::quiet_NaN();
  float total = 0.0f;
  for (int64_t c = 0; c < C; ++c) total += (dz[c] = exp_scalar(z[c] - rmax));
  *mx = rmax;
  *sum = total;
}

}  // namespace

double softmax_cross_entropy_rows(Isa isa, const float* z, int64_t C, const int64_t* labels, float scale, float* dz,
                                  int64_t r0, int64_t r1) {
  double loss = 0.0;
  for (int64_t r = r0; r < r1; ++r) {
    const float* zr = z + r * C;
    float* dr = dz + r * C;
    float mx, sum;
#if SUPSUP_X86
    if (isa == Isa::Avx512) row_exp512(zr, C, dr, &mx, &sum);
    else if (isa == Isa::Avx2) row_exp256(zr, C, dr, &mx, &sum);
    else
#endif
      row_exp_scalar(zr, C, dr, &mx, &sum);
    // -log softmax[label] = (max - z[label]) + log(sum): the difference first, which a large max would swamp
    loss += (static_cast<double>(mx) - zr[labels[r]]) + std::log(static_cast<double>(sum));
    const float f = scale / sum;
    for (int64_t c = 0; c < C; ++c) dr[c] *= f;  // vectorised by the compiler
    dr[labels[r]] -= scale;
  }
  return loss;
}

}  // namespace supsup_cpu
