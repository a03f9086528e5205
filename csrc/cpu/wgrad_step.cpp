// The weight-gradient GEMM of a linear layer with the optimiser step in its epilogue:
// dW[o, i] = sum over b of dz[b, o] * x[b, i], formed one register tile at a time and handed, while
// it is still in L1, to the straight-through RMSprop step of optim.cpp (g = dW ⊙ W, the rule, the
// next masked weight): dW is never written to memory or read back. Both operands are batch-major
// (dz [B, O], x [B, I]), so the micro-kernel is an outer product per batch row: 48 columns of x
// (packed into contiguous panels once per call) times a broadcast of each of 8 rows of dzᵀ.
// AVX-512 only: on AMD Zen 4 the whole MLP step measured 2-4% faster than MKL's GEMM followed by the
// step, and the AVX2 version of this tile (6 x 16) 8% slower than MKL's AVX2 GEMM, so AVX2 and
// scalar machines keep that GEMM + step (bindings.cpp).
#include "kernels.h"
#include "simd.h"

#include <algorithm>
#include <initializer_list>
#include <stdexcept>
#include <vector>

namespace supsup_cpu {
namespace {

constexpr int kRows512 = 8, kCols512 = 48;  // 24 zmm accumulators
#if SUPSUP_X86

// g[r][c] = sum over b of dzp[b][r] * xp[b][c] for r < 8, c < 48: dzp is the packed [B][8] panel of
// 8 rows of dzᵀ, xp the [B][48] panel of 48 columns of x (wgrad_pack_x, zero-padded).
AVX512_TARGET void tile512(const float* dzp, const float* xp, int64_t B, float* g) {
  // Named accumulators: GCC keeps an array of 24 vectors on the stack and stores it every iteration.
#define SUPSUP_ROW(r) __m512 a##r##0 = _mm512_setzero_ps(), a##r##1 = a##r##0, a##r##2 = a##r##0;
  SUPSUP_ROW(0) SUPSUP_ROW(1) SUPSUP_ROW(2) SUPSUP_ROW(3) SUPSUP_ROW(4) SUPSUP_ROW(5) SUPSUP_ROW(6) SUPSUP_ROW(7)
#undef SUPSUP_ROW
  const float* xb = xp;
  for (int64_t b = 0; b < B; ++b, xb += kCols512) {
    const __m512 x0 = _mm512_load_ps(xb), x1 = _mm512_load_ps(xb + 16), x2 = _mm512_load_ps(xb + 32);
    const float* d = dzp + b * kRows512;
#define SUPSUP_ROW(r)                                \
  {                                                  \
    const __m512 dv = _mm512_set1_ps(d[r]);          \
    a##r##0 = _mm512_fmadd_ps(dv, x0, a##r##0);      \
    a##r##1 = _mm512_fmadd_ps(dv, x1, a##r##1);      \
    a##r##2 = _mm512_fmadd_ps(dv, x2, a##r##2);      \
  }
    SUPSUP_ROW(0) SUPSUP_ROW(1) SUPSUP_ROW(2) SUPSUP_ROW(3) SUPSUP_ROW(4) SUPSUP_ROW(5) SUPSUP_ROW(6) SUPSUP_ROW(7)
#undef SUPSUP_ROW
  }
#define SUPSUP_ROW(r)                                     \
  _mm512_store_ps(g + r * kCols512, a##r##0);             \
  _mm512_store_ps(g + r * kCols512 + 16, a##r##1);        \
  _mm512_store_ps(g + r * kCols512 + 32, a##r##2);
  SUPSUP_ROW(0) SUPSUP_ROW(1) SUPSUP_ROW(2) SUPSUP_ROW(3) SUPSUP_ROW(4) SUPSUP_ROW(5) SUPSUP_ROW(6) SUPSUP_ROW(7)
#undef SUPSUP_ROW
}

// The tiles of output rows [o0, o1), all columns: each row segment g[r][0:cols] of each tile goes
// to step(o, j, cols, g_row) at once. Rows [o0, o1) are split in panels of 8.
// The step's [O, I] arrays (`streams`) are prefetched as each tile starts, so they are in L1 when its
// arithmetic ends: the hardware prefetchers do not follow 32 row streams. Without it the fused LeNet
// step measured 1.0-1.06x the GEMM + separate pass, with it 0.93-0.97x (Zen 4, three A/B pairs).
template <class Step>
void wgrad_rows(const float* dz, const float* xp, int64_t B, int64_t O, int64_t I, int64_t o0, int64_t o1,
                std::initializer_list<const float*> streams, Step step) {
  constexpr int rows_per_panel = kRows512;
  constexpr int64_t cols_per_tile = kCols512;
  std::vector<float> panel_buf(static_cast<size_t>(B * rows_per_panel) + 16);
  std::vector<float> g_buf(kRows512 * kCols512 + 16);
  float* dzp = align64(panel_buf);
  float* g = align64(g_buf);
  for (int64_t ob = o0; ob < o1; ob += rows_per_panel) {
    const int rows = static_cast<int>(std::min<int64_t>(rows_per_panel, o1 - ob));
    for (int64_t b = 0; b < B; ++b)  // dzᵀ rows ob.., padded with zeros: the panel the tiles broadcast from
      for (int r = 0; r < rows_per_panel; ++r) dzp[b * rows_per_panel + r] = r < rows ? dz[b * O + ob + r] : 0.0f;
    for (int64_t j = 0; j < I; j += cols_per_tile) {
      const int64_t cols = std::min<int64_t>(cols_per_tile, I - j);
      for (int r = 0; r < rows; ++r)
        for (const float* a : streams)
          for (int64_t c = 0; c < cols; c += 16) _mm_prefetch(reinterpret_cast<const char*>(a + (ob + r) * I + j + c), _MM_HINT_T0);
      const float* panel = xp + (j / cols_per_tile) * B * cols_per_tile;
      tile512(dzp, panel, B, g);
      for (int r = 0; r < rows; ++r) step(ob + r, j, cols, g + r * kCols512);
    }
  }
}

#endif  // SUPSUP_X86

}  // namespace

int64_t wgrad_tile_cols() { return kCols512; }

void wgrad_pack_x(const float* x, int64_t B, int64_t I, float* xp, int64_t t0, int64_t t1) {
  const int64_t ct = kCols512;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t j = t * ct, cols = std::min<int64_t>(ct, I - j);
    float* panel = xp + t * B * ct;
    for (int64_t b = 0; b < B; ++b) {
      std::copy(x + b * I + j, x + b * I + j + cols, panel + b * ct);
      std::fill(panel + b * ct + cols, panel + (b + 1) * ct, 0.0f);
    }
  }
}

void ste_rmsprop_wgrad_avx512(const float* dz, const float* xp, int64_t B, int64_t O, int64_t I, float* param,
                              const float* weight, float* square_avg, float* masked_weight, const RmspropScalars& c,
                              int64_t o0, int64_t o1) {
#if SUPSUP_X86
  wgrad_rows(dz, xp, B, O, I, o0, o1, {param, weight, square_avg, masked_weight}, [&](int64_t o, int64_t j, int64_t cols, const float* g) {
    const int64_t at = o * I + j;
    ste_rmsprop_step(Isa::Avx512, param + at, g, weight + at, square_avg + at, masked_weight + at, c, 0, cols);
  });
#else
  throw std::logic_error("ste_rmsprop_wgrad_avx512 needs AVX-512");
#endif
}

void ste_rmsprop_bits_wgrad_avx512(const float* dz, const float* xp, int64_t B, int64_t O, int64_t I, float* param,
                                   const FrozenWeight& fw, float* square_avg, int32_t* mask_words, const RmspropScalars& c,
                                   int64_t o0, int64_t o1) {
#if SUPSUP_X86
  auto step = [&](int64_t o, int64_t j, int64_t cols, const float* g) {
    ste_rmsprop_bits_step(Isa::Avx512, param, g, fw, square_avg, mask_words, c, o, j, cols);
  };
  if (fw.weight) wgrad_rows(dz, xp, B, O, I, o0, o1, {param, fw.weight, square_avg}, step);
  else wgrad_rows(dz, xp, B, O, I, o0, o1, {param, square_avg}, step);
#else
  throw std::logic_error("ste_rmsprop_bits_wgrad_avx512 needs AVX-512");
#endif
}

}  // namespace supsup_cpu
