// See gemv.h. One generic loop body compiled three times (scalar, AVX2+FMA, AVX-512) through
// function target attributes; `omp simd` lets the compiler vectorise the row reductions.
#include "gemv.h"

#include <algorithm>

namespace supsup_cpu {
namespace {

#define GEMV_BODY                                                                                 \
  for (int64_t r = r0; r < r1; ++r) {                                                           \
    const float* wr = w + r * n;                                                                  \
    const float* sr = s + r * n;                                                                  \
    for (int64_t b = 0; b < B; ++b) {                                                             \
      const float* xb = x + b * n;                                                                \
      float acc = 0.0f;                                                                           \
      _Pragma("omp simd reduction(+ : acc)") for (int64_t j = 0; j < n; ++j) acc += xb[j] * (wr[j] * sr[j]); \
      y[b * R + r] = acc + (bias ? bias[r] : 0.0f);                                               \
    }                                                                                             \
  }

#define GEMV_T_BODY                                                                               \
  for (int64_t b = 0; b < B; ++b) {                                                               \
    float* d = dx + b * n;                                                                        \
    for (int64_t j = j0; j < j1; ++j) d[j] = 0.0f;                                                \
  }                                                                                               \
  for (int64_t r = 0; r < R; ++r) {                                                               \
    const float* wr = w + r * n;                                                                  \
    const float* sr = s + r * n;                                                                  \
    for (int64_t b = 0; b < B; ++b) {                                                             \
      const float gb = g[b * R + r];                                                              \
      if (gb == 0.0f) continue;                                                                   \
      float* d = dx + b * n;                                                                      \
      _Pragma("omp simd") for (int64_t j = j0; j < j1; ++j) d[j] += gb * (wr[j] * sr[j]);         \
    }                                                                                             \
  }

void gemv_scalar(const float* x, int64_t B, const float* w, const float* s, int64_t n, int64_t R, const float* bias,
                 float* y, int64_t r0, int64_t r1) {
  GEMV_BODY
}
#if SUPSUP_X86
__attribute__((target("avx2,fma"))) void gemv_avx2(const float* x, int64_t B, const float* w, const float* s, int64_t n,
                                                    int64_t R, const float* bias, float* y, int64_t r0, int64_t r1) {
  GEMV_BODY
}
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"), optimize("prefer-vector-width=512")))
void gemv_avx512(const float* x, int64_t B, const float* w, const float* s, int64_t n, int64_t R, const float* bias,
                 float* y, int64_t r0, int64_t r1) {
  GEMV_BODY
}
#endif  // SUPSUP_X86

void gemvt_scalar(const float* g, int64_t B, const float* w, const float* s, int64_t n, int64_t R, float* dx,
                  int64_t j0, int64_t j1) {
  GEMV_T_BODY
}
#if SUPSUP_X86
__attribute__((target("avx2,fma"))) void gemvt_avx2(const float* g, int64_t B, const float* w, const float* s, int64_t n,
                                                     int64_t R, float* dx, int64_t j0, int64_t j1) {
  GEMV_T_BODY
}
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"), optimize("prefer-vector-width=512")))
void gemvt_avx512(const float* g, int64_t B, const float* w, const float* s, int64_t n, int64_t R, float* dx,
                  int64_t j0, int64_t j1) {
  GEMV_T_BODY
}
#endif  // SUPSUP_X86

}  // namespace

void scaled_gemm_small(Isa isa, const float* x, int64_t B, const float* w, const float* s, int64_t n, int64_t R,
                       const float* bias, float* y, int64_t r0, int64_t r1) {
#if SUPSUP_X86
  if (isa == Isa::Avx512) return gemv_avx512(x, B, w, s, n, R, bias, y, r0, r1);
  if (isa == Isa::Avx2) return gemv_avx2(x, B, w, s, n, R, bias, y, r0, r1);
#endif
  gemv_scalar(x, B, w, s, n, R, bias, y, r0, r1);
}

void scaled_gemm_small_t(Isa isa, const float* g, int64_t B, const float* w, const float* s, int64_t n, int64_t R,
                         float* dx, int64_t j0, int64_t j1) {
#if SUPSUP_X86
  if (isa == Isa::Avx512) return gemvt_avx512(g, B, w, s, n, R, dx, j0, j1);
  if (isa == Isa::Avx2) return gemvt_avx2(g, B, w, s, n, R, dx, j0, j1);
#endif
  gemvt_scalar(g, B, w, s, n, R, dx, j0, j1);
}

}  // namespace supsup_cpu
