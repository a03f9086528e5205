// Masked GEMM for batches above the small-batch kernels: y = x (W ⊙ M)ᵀ + b with W ⊙ M never
// materialised in memory. The BLIS scheme: one K chunk of a block of rows of W is packed,
// transposed and masked, into an L2 buffer (a BLAS packs its operand anyway, so the mask costs
// nothing extra); a register-tiled outer-product micro-kernel then broadcasts x straight from its
// row-major rows: 32 weight rows x 12 x rows on AVX-512, or 64 x 6 for a thread's 256+ outputs at
// 128+ rows of x (24 zmm accumulators either way; wide_tiles), 24 x 4 on AVX2.
// Signed-constant weights are packed from their 2 bits the same way.
#include "kernels.h"
#include "simd.h"

#include <algorithm>
#include <array>
#include <utility>
#include <vector>

namespace supsup_cpu {
namespace {

// Block sizes. On the AMD Zen 4 VM, K chunks of the whole row (up to kChunk), blocks of about 128 KiB
// of AVX-512 panels (AVX2: one tile) and 128 x rows per pass ran 1.03-1.11x (AVX-512, median 1.07x)
// and 1.08-1.30x (AVX2, median 1.16x) faster than the K chunks of 256, blocks of 256 (AVX2: 240) rows
// and 96 x rows tuned earlier on the AVX-512 Intel Xeon VM: five layer shapes (out x in 1024 x 1024,
// 300 x 784, 1024 x 784, 500 x 1024, 4096 x 256) at batch 32, 128 and 256, the two interleaved in one
// process. On that Xeon, measured again the same way with the later code, the old blocks ran 0.87-1.00x
// the new (median 0.93x), so both CPUs use these. Packing x into micro-panels was slower (Xeon).
constexpr int64_t kChunk = 2048;       // K per packed chunk (a row of up to 2048 inputs in one)
constexpr int64_t kPanelFloats = 32768;  // AVX-512: rows per block such that its panels are about 128 KiB (at least a tile)
constexpr int64_t kBatchBlock = 128;   // rows of x per pass over the packed block
// From kLargePanelRows rows of x on Intel CPUs (wide_gemm_tiles, which SUPSUP_CPU_WIDE_TILES also
// switches), blocks of about 512 KiB of panels: x is read again for every block, and at 1,024 rows it
// outweighs the block's stay in L2. On the second Xeon VM (2026-12-08, AVX-512, each against dense
// F.linear in its own interleaved pair, one process, twice) at 1,024 rows: 1024 x 1024 0.97-0.99x dense
// against 0.95-0.98x with the small blocks (one 64-row tile, 256 KiB, at 1,024 inputs) (and 0.96x
// materialising W ⊙ M for MKL), 1024 x 784 0.95-0.98x against 0.94-0.97x (0.95-0.97x), 300 x 784
// 1.04-1.06x against 0.97x (0.93-0.94x), 2048 x 1024 0.96-0.97x against 0.94-0.96x (0.93-0.95x); alike
// at 512 rows; at 128-256 rows the small blocks ran 1-2 % faster.
constexpr int64_t kLargePanelFloats = 131072, kLargePanelRows = 512;

// Rows of W packed per block: a whole number of tiles, panels (K padded to 16) of about panel_floats,
// and no more tiles than the thread's `rows` need.
int64_t rows_per_block(int64_t n, int64_t tile, int64_t panel_floats, int64_t rows) {
  const int64_t padded = std::max<int64_t>(16, (std::min(kChunk, n) + 15) / 16 * 16);
  const int64_t needed = (rows + tile - 1) / tile * tile;
  return std::max<int64_t>(tile, std::min(needed, panel_floats / padded / tile * tile));
}

// The thread's packing buffer, 64-byte aligned, for `floats` floats.
float* packing_buffer(int64_t floats) {
  thread_local std::vector<float> buf;
  if (buf.size() < static_cast<size_t>(floats + 16)) buf.resize(floats + 16);
  return align64(buf);
}

// Initialise y[b, r0:r1] to the bias (or 0): only for K = 0, as the first K chunk's micro-kernels store
// their sums plus the bias and the later ones accumulate. (Initialising y first, as before, and adding
// every chunk cost an extra pass over y: on the second Xeon VM, 2026-12-08, 1024 x 1024 at 128 rows of
// x, 0.93-0.94x dense against 0.95-0.96x now with AVX2, 1.01-1.03x against 1.03-1.04x with AVX-512,
// each pair interleaved in one process; alike at 1,024 rows.)
void init_rows(const float* bias, int64_t B, int64_t R, float* y, int64_t r0, int64_t r1) {
  for (int64_t b = 0; b < B; ++b) {
    float* yb = y + b * R;
    if (bias) std::copy(bias + r0, bias + r1, yb + r0);
    else std::fill(yb + r0, yb + r1, 0.0f);
  }
}

#if SUPSUP_X86
// ---------------------------------------------------------------------------------------------
// AVX-512

AVX512_TARGET void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0xDD);
    t[8 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD);
  }
}

// P[jj][i] = (W ⊙ M)[rt + i, j0 + jj] for i < 16 WV, jj < kc; rows past `rows` are zero.
template <bool SIGNED, int WV>
AVX512_TARGET void pack_tile512(const float* w, const int32_t* sign_words, const int32_t* words, float scale, int64_t n,
                                int64_t W, int64_t rt, int64_t rows, int64_t j0, int64_t kc, float* P) {
  for (int h = 0; h < WV; ++h)
    for (int64_t jb = 0; jb < kc; jb += 16) {
      __m512 v[16];
      for (int t = 0; t < 16; ++t)
        v[t] = 16 * h + t < rows ? masked_weights16<SIGNED>(w, sign_words, words, scale, n, W, rt + 16 * h + t, j0 + jb)
                                 : _mm512_setzero_ps();
      transpose16(v);
      const int64_t cols = std::min<int64_t>(16, kc - jb);
      for (int64_t c = 0; c < cols; ++c) _mm512_store_ps(P + (jb + c) * 16 * WV + 16 * h, v[c]);
    }
}

// P[jj][i] = (W ⊙ M)[j0 + jj, rt + i] for i < 32, jj < kc, with W ⊙ M [K, R] (W words a row): its
// rows as they are, for y = x (W ⊙ M) (a layer's input gradient). Columns past R are zero.
template <bool SIGNED>
AVX512_TARGET void pack_rows512(const float* w, const int32_t* sign_words, const int32_t* words, float scale, int64_t R,
                                int64_t W, int64_t rt, int64_t j0, int64_t kc, float* P) {
  for (int64_t jj = 0; jj < kc; ++jj)
    for (int h = 0; h < 2; ++h)  // rt is a multiple of 32, so rt + 16 < R or its bits are all past R
      _mm512_store_ps(P + 32 * jj + 16 * h, masked_weights16<SIGNED>(w, sign_words, words, scale, R, W, j0 + jj, rt + 16 * h));
}

// y[b, 0:16 WV] += sum over jj < kc of x[b, jj] * P[jj, 0:16 WV] for b < BT (x and y already offset),
// only the lanes in m[v] stored; without ACC (the first K chunk) y = the sum + bias[0:16 WV] (or + 0).
template <int WV, int BT, bool ACC>
AVX512_TARGET void micro512(const float* P, int64_t kc, const float* x, int64_t n, float* y, int64_t R, const __mmask16* m,
                            const float* bias) {
  for (int b = 0; b < BT; ++b)  // the y tile is read (ACC) or written at the end: start fetching it now
    for (int v = 0; v < WV; ++v) _mm_prefetch(reinterpret_cast<const char*>(y + b * R + 16 * v), _MM_HINT_T0);
  __m512 acc[BT][WV];
  for (int b = 0; b < BT; ++b)
    for (int v = 0; v < WV; ++v) acc[b][v] = _mm512_setzero_ps();
  for (int64_t jj = 0; jj < kc; ++jj) {
    __m512 wv[WV];
    for (int v = 0; v < WV; ++v) wv[v] = _mm512_load_ps(P + 16 * WV * jj + 16 * v);
#pragma GCC unroll 12
    for (int b = 0; b < BT; ++b) {
      const __m512 xb = _mm512_set1_ps(x[b * n + jj]);
      for (int v = 0; v < WV; ++v) acc[b][v] = _mm512_fmadd_ps(wv[v], xb, acc[b][v]);
    }
  }
  for (int v = 0; v < WV; ++v) {
    const __m512 base = ACC || !bias ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m[v], bias + 16 * v);
    for (int b = 0; b < BT; ++b) {
      float* yb = y + b * R + 16 * v;
      _mm512_mask_storeu_ps(yb, m[v], _mm512_add_ps(ACC ? _mm512_maskz_loadu_ps(m[v], yb) : base, acc[b][v]));
    }
  }
}

using Micro512 = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, const __mmask16*, const float*);
template <int WV, bool ACC, int... BT>
constexpr std::array<Micro512, sizeof...(BT) + 1> micro512_table(std::integer_sequence<int, BT...>) {
  return {nullptr, micro512<WV, BT + 1, ACC>...};
}
template <int WV, int NT>
struct Micro512Tables {  // first: the first K chunk's (store, adding the bias); later: the others' (accumulate)
  std::array<Micro512, NT + 1> first, later;
};
// Tiles: 32 weight rows x 12 rows of x (2 weight vectors and 12 broadcasts per 24 FMAs) for the
// input gradient's rows, 64 x 6 (4 and 6) for y = x (W ⊙ M)ᵀ.
constexpr Micro512Tables<2, 12> kMicro512x12{micro512_table<2, false>(std::make_integer_sequence<int, 12>{}),
                                             micro512_table<2, true>(std::make_integer_sequence<int, 12>{})};
constexpr Micro512Tables<4, 6> kMicro512x6{micro512_table<4, false>(std::make_integer_sequence<int, 6>{}),
                                           micro512_table<4, true>(std::make_integer_sequence<int, 6>{})};

// ROWS: the weight is [n, R] and y = x (W ⊙ M) (pack_rows512), else it is [R, n] and y = x (W ⊙ M)ᵀ.
// WV: weight vectors per tile (16 WV rows), BT: rows of x per micro-kernel call.
template <bool SIGNED, bool ROWS, int WV, int BT>
AVX512_TARGET void masked_gemm512_tiles(const Micro512Tables<WV, BT>& micros, const float* x, int64_t B, const float* w,
                                        const int32_t* sign_words, const int32_t* words, float scale, int64_t n, int64_t W,
                                        int64_t R, const float* bias, float* y, int64_t r0, int64_t r1) {
  constexpr int64_t kTile = 16 * WV;
  if (n == 0) return init_rows(bias, B, R, y, r0, r1);  // no K chunk to store y
  const int64_t panel = B >= kLargePanelRows && wide_gemm_tiles() ? kLargePanelFloats : kPanelFloats;
  const int64_t rows_block = rows_per_block(n, kTile, panel, r1 - r0);
  float* P = packing_buffer(rows_block * ((std::min(kChunk, n) + 15) / 16 * 16));
  for (int64_t rb = r0; rb < r1; rb += rows_block) {
    const int64_t re = std::min(r1, rb + rows_block);
    for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
      const int64_t kc = std::min(kChunk, n - j0), tile = kTile * ((kc + 15) / 16 * 16);
      for (int64_t rt = rb, t = 0; rt < re; rt += kTile, ++t)
        if constexpr (ROWS) pack_rows512<SIGNED>(w, sign_words, words, scale, R, W, rt, j0, kc, P + t * tile);
        else pack_tile512<SIGNED, WV>(w, sign_words, words, scale, n, W, rt, std::min<int64_t>(kTile, re - rt), j0, kc, P + t * tile);
      for (int64_t b0 = 0; b0 < B; b0 += kBatchBlock) {
        const int64_t be = std::min(B, b0 + kBatchBlock);
        const auto& micro = j0 == 0 ? micros.first : micros.later;
        for (int64_t rt = rb, t = 0; rt < re; rt += kTile, ++t) {
          const int64_t rows = std::min<int64_t>(kTile, re - rt);
          __mmask16 m[WV];
          for (int v = 0; v < WV; ++v)
            m[v] = static_cast<__mmask16>(rows >= 16 * (v + 1) ? 0xFFFF : rows <= 16 * v ? 0 : (1u << (rows - 16 * v)) - 1u);
          for (int64_t bb = b0; bb < be; bb += BT)
            micro[std::min<int64_t>(BT, be - bb)](P + t * tile, kc, x + bb * n + j0, n, y + bb * R + rt, R, m,
                                                  bias ? bias + rt : nullptr);
        }
      }
    }
  }
}

// Whether a thread's `rows` outputs of y = x (W ⊙ M)ᵀ over B rows of x take the 64 x 6 tile
// (wide_gemm_tiles(): Intel CPUs). Paired calls in one process on the Intel Xeon VM (two threads;
// 1024 x 1024, 1024 x 784, 500 x 1024, 4096 x 256 and 2048 x 2048 layers at 128-512 rows of x): 1.03-
// 1.18x faster than 32 x 12 from 128 rows of x with 256+ outputs a thread, its 4 weight vectors and 6
// broadcasts a step loading less than 2 and 12; slower where a 64-row tile is mostly empty (300 x 784
// at two threads, 150 rows a thread: 0.86x) or the layer is small (100 x 300: 0.90x).
inline bool wide_tiles(int64_t B, int64_t rows) {
  const int64_t tail = rows % 64;
  return B >= 128 && rows >= 256 && (tail == 0 || tail > 32) && wide_gemm_tiles();
}

template <bool SIGNED, bool ROWS = false>
AVX512_TARGET void masked_gemm512(const float* x, int64_t B, const float* w, const int32_t* sign_words,
                                  const int32_t* words, float scale, int64_t n, int64_t W, int64_t R,
                                  const float* bias, float* y, int64_t r0, int64_t r1) {
  if (!ROWS && wide_tiles(B, r1 - r0))  // pack_rows512 packs 32 columns: the input gradient keeps 32 x 12
    masked_gemm512_tiles<SIGNED, ROWS, 4, 6>(kMicro512x6, x, B, w, sign_words, words, scale, n, W, R, bias, y, r0, r1);
  else
    masked_gemm512_tiles<SIGNED, ROWS, 2, 12>(kMicro512x12, x, B, w, sign_words, words, scale, n, W, R, bias, y, r0, r1);
}

// ---------------------------------------------------------------------------------------------
// AVX2: the same scheme with 8-lane vectors, 24-row tiles and 4 x rows (12 ymm accumulators; 16 x 6
// ran 5% slower in isolation: 8 loads per 12 FMAs against 7).
constexpr int kTile256 = 24, kXRows256 = 4;  // one tile per block: with AVX2, 48 or more rows ran slower

AVX2_TARGET void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x20);
    r[4 + i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x31);
  }
}

template <bool SIGNED>
AVX2_TARGET void pack_tile256(const float* w, const int32_t* sign_words, const int32_t* words, float scale, int64_t n,
                              int64_t W, int64_t rt, int64_t rows, int64_t j0, int64_t kc, float* P) {
  for (int h = 0; h < kTile256 / 8; ++h)
    for (int64_t jb = 0; jb < kc;) {
      if (jb % 32 == 0 && jb + 32 <= kc) {  // a whole word of each row: one broadcast and 4 compares per row
        __m256 v[4][8];
        for (int t = 0; t < 8; ++t) {
          __m256 u[4];
          if (8 * h + t < rows) masked_word8x4<SIGNED>(w, sign_words, words, scale, n, W, rt + 8 * h + t, (j0 + jb) / 32, u);
          else u[0] = u[1] = u[2] = u[3] = _mm256_setzero_ps();
          for (int c = 0; c < 4; ++c) v[c][t] = u[c];
        }
        for (int c = 0; c < 4; ++c) {
          transpose8(v[c]);
          for (int i = 0; i < 8; ++i) _mm256_store_ps(P + (jb + 8 * c + i) * kTile256 + 8 * h, v[c][i]);
        }
        jb += 32;
        continue;
      }
      __m256 v[8];
      for (int t = 0; t < 8; ++t)
        v[t] = 8 * h + t < rows ? masked_weights8<SIGNED>(w, sign_words, words, scale, n, W, rt + 8 * h + t, j0 + jb)
                                : _mm256_setzero_ps();
      transpose8(v);
      const int64_t cols = std::min<int64_t>(8, kc - jb);
      for (int64_t c = 0; c < cols; ++c) _mm256_store_ps(P + (jb + c) * kTile256 + 8 * h, v[c]);
      jb += 8;
    }
}

// The rows of a [K, R] W ⊙ M as they are (pack_rows512), 24 columns from rt.
template <bool SIGNED>
AVX2_TARGET void pack_rows256(const float* w, const int32_t* sign_words, const int32_t* words, float scale, int64_t R,
                              int64_t W, int64_t rt, int64_t j0, int64_t kc, float* P) {
  for (int64_t jj = 0; jj < kc; ++jj)
    for (int h = 0; h < kTile256 / 8; ++h)  // rt is a multiple of 24, not 32: past R may be past the row's words
      _mm256_store_ps(P + kTile256 * jj + 8 * h, rt + 8 * h < R ? masked_weights8<SIGNED>(w, sign_words, words, scale, R, W, j0 + jj, rt + 8 * h)
                                                              : _mm256_setzero_ps());
}

AVX2_TARGET inline __m256i first_lanes(int64_t count) {  // lanes [0, count) all ones
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(count, 0, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// y[b, 0:24] += sum over jj < kc of x[b, jj] * P[jj, 0:24] for b < BT, only the first `rows` of the
// 24 stored; without ACC (the first K chunk) y = the sum + bias[0:24] (or + 0). 12 accumulators, 3 weight vectors and a broadcast fill the 16 ymm registers, so the
// store masks are made after the loop. x is broadcast by value: _mm256_broadcast_ss(pointer) made GCC
// assume the float pointer may alias the accumulators and store all twelve every step.
template <int BT, bool ACC>
AVX2_TARGET void micro256(const float* P, int64_t kc, const float* x, int64_t n, float* y, int64_t R, int64_t rows,
                          const float* bias) {
  constexpr int NV = kTile256 / 8;
  __m256 acc[BT][NV];
  for (int b = 0; b < BT; ++b)
    for (int v = 0; v < NV; ++v) acc[b][v] = _mm256_setzero_ps();
  for (int64_t jj = 0; jj < kc; ++jj) {
    __m256 wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = _mm256_load_ps(P + kTile256 * jj + 8 * v);
#pragma GCC unroll 4
    for (int b = 0; b < BT; ++b) {
      const __m256 xb = _mm256_set1_ps(x[b * n + jj]);
      for (int v = 0; v < NV; ++v) acc[b][v] = _mm256_fmadd_ps(wv[v], xb, acc[b][v]);
    }
  }
  if (rows == kTile256) {  // a whole tile: plain loads and stores (masked ones cost ~1.5% at 128 rows of x, Intel)
    for (int v = 0; v < NV; ++v) {
      const __m256 base = ACC || !bias ? _mm256_setzero_ps() : _mm256_loadu_ps(bias + 8 * v);
      for (int b = 0; b < BT; ++b) {
        float* yb = y + b * R + 8 * v;
        _mm256_storeu_ps(yb, _mm256_add_ps(ACC ? _mm256_loadu_ps(yb) : base, acc[b][v]));
      }
    }
    return;
  }
  for (int v = 0; v < NV; ++v) {
    const __m256i m = first_lanes(rows - 8 * v);
    const __m256 base = ACC || !bias ? _mm256_setzero_ps() : _mm256_maskload_ps(bias + 8 * v, m);
    for (int b = 0; b < BT; ++b) {
      float* yb = y + b * R + 8 * v;
      _mm256_maskstore_ps(yb, m, _mm256_add_ps(ACC ? _mm256_maskload_ps(yb, m) : base, acc[b][v]));
    }
  }
}

// K per packed chunk: the whole row up to kChunk, or on Intel CPUs (short_gemm_chunks()) chunks of at
// most 256, equal but for a shorter last one once rounded up to whole mask words (pack_tile256 reads a
// word at a time: 784 -> 3 x 224 + 112), so that the 24 x kc tile
// (24 KiB) stays in L1 while every row of x streams past it. On the second Intel Xeon VM (2026-12-08,
// AVX2 capped, MKL capped to AVX2 as well, each against dense F.linear in its own interleaved pair):
// 1024 x 1024 at 32 / 128 rows of x 0.91-0.92x / 0.94x dense against 0.85-0.88x / 0.93x with whole
// rows, 1024 x 784 0.81-0.82x / 0.90-0.91x against 0.77-0.80x / 0.88-0.89x.
constexpr int64_t kShortChunk = 256;
inline int64_t chunk256(int64_t n) {
  if (n <= kShortChunk || !short_gemm_chunks()) return kChunk;
  const int64_t chunks = (n + kShortChunk - 1) / kShortChunk;
  return ((n + chunks - 1) / chunks + 31) / 32 * 32;
}

using Micro256 = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, const float*);
// [0]: the first K chunk's (store, adding the bias), [1]: the others' (accumulate)
constexpr Micro256 kMicro256[2][kXRows256 + 1] = {
    {nullptr, micro256<1, false>, micro256<2, false>, micro256<3, false>, micro256<4, false>},
    {nullptr, micro256<1, true>, micro256<2, true>, micro256<3, true>, micro256<4, true>}};

template <bool SIGNED, bool ROWS = false>
AVX2_TARGET void masked_gemm256(const float* x, int64_t B, const float* w, const int32_t* sign_words,
                                const int32_t* words, float scale, int64_t n, int64_t W, int64_t R, const float* bias,
                                float* y, int64_t r0, int64_t r1) {
  if (n == 0) return init_rows(bias, B, R, y, r0, r1);  // no K chunk to store y
  const int64_t chunk = chunk256(n);
  float* P = packing_buffer(kTile256 * ((std::min(chunk, n) + 7) / 8 * 8));
  for (int64_t rb = r0; rb < r1; rb += kTile256) {
    const int64_t re = std::min(r1, rb + kTile256);
    for (int64_t j0 = 0; j0 < n; j0 += chunk) {
      const int64_t kc = std::min(chunk, n - j0), tile = kTile256 * ((kc + 7) / 8 * 8);
      for (int64_t rt = rb, t = 0; rt < re; rt += kTile256, ++t)
        if constexpr (ROWS) pack_rows256<SIGNED>(w, sign_words, words, scale, R, W, rt, j0, kc, P + t * tile);
        else pack_tile256<SIGNED>(w, sign_words, words, scale, n, W, rt, std::min<int64_t>(kTile256, re - rt), j0, kc, P + t * tile);
      for (int64_t b0 = 0; b0 < B; b0 += kBatchBlock) {
        const int64_t be = std::min(B, b0 + kBatchBlock);
        const Micro256* micro = kMicro256[j0 == 0 ? 0 : 1];
        for (int64_t rt = rb, t = 0; rt < re; rt += kTile256, ++t) {
          const int64_t rows = std::min<int64_t>(kTile256, re - rt);
          for (int64_t bb = b0; bb < be; bb += kXRows256)
            micro[std::min<int64_t>(kXRows256, be - bb)](P + t * tile, kc, x + bb * n + j0, n, y + bb * R + rt, R, rows,
                                                         bias ? bias + rt : nullptr);
        }
      }
    }
  }
}

#endif  // SUPSUP_X86
// ---------------------------------------------------------------------------------------------
// Scalar: the definition, for CPUs without AVX2.

template <bool SIGNED, bool ROWS = false>
void masked_gemm_scalar(const float* x, int64_t B, const float* w, const int32_t* sign_words, const int32_t* words,
                        float scale, int64_t n, int64_t W, const float* bias, float* y, int64_t R, int64_t r0,
                        int64_t r1) {
  std::vector<float> row(n);
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t j = 0; j < n; ++j) {  // element (r, j) of W ⊙ M [R, n], or (j, r) of W ⊙ M [n, R] (ROWS)
      const int64_t word = ROWS ? j * W + r / 32 : r * W + j / 32, bit_at = ROWS ? r % 32 : j % 32;
      const uint32_t bit = (static_cast<uint32_t>(words[word]) >> bit_at) & 1u;
      if constexpr (SIGNED) {
        const bool pos = (static_cast<uint32_t>(sign_words[word]) >> bit_at) & 1u;
        row[j] = bit ? (pos ? scale : -scale) : 0.0f;
      } else {
        row[j] = bit ? w[ROWS ? j * R + r : r * n + j] : 0.0f;
      }
    }
    for (int64_t b = 0; b < B; ++b) {
      float acc = 0.0f;
      for (int64_t j = 0; j < n; ++j) acc += x[b * n + j] * row[j];
      y[b * R + r] = acc + (bias ? bias[r] : 0.0f);
    }
  }
}

}  // namespace

void masked_gemm(Isa isa, const float* x, int64_t B, const float* w, const int32_t* words, int64_t n, int64_t W,
                 int64_t R, const float* bias, float* y, int64_t r0, int64_t r1) {
#if SUPSUP_X86
  if (isa == Isa::Avx512) return masked_gemm512<false>(x, B, w, nullptr, words, 1.0f, n, W, R, bias, y, r0, r1);
  if (isa == Isa::Avx2) return masked_gemm256<false>(x, B, w, nullptr, words, 1.0f, n, W, R, bias, y, r0, r1);
#endif
  masked_gemm_scalar<false>(x, B, w, nullptr, words, 1.0f, n, W, bias, y, R, r0, r1);
}

void signed_masked_gemm(Isa isa, const float* x, int64_t B, const int32_t* sign_words, const int32_t* mask_words,
                        float scale, int64_t n, int64_t W, int64_t R, const float* bias, float* y, int64_t r0,
                        int64_t r1) {
#if SUPSUP_X86
  if (isa == Isa::Avx512)
    return masked_gemm512<true>(x, B, nullptr, sign_words, mask_words, scale, n, W, R, bias, y, r0, r1);
  if (isa == Isa::Avx2)
    return masked_gemm256<true>(x, B, nullptr, sign_words, mask_words, scale, n, W, R, bias, y, r0, r1);
#endif
  masked_gemm_scalar<true>(x, B, nullptr, sign_words, mask_words, scale, n, W, bias, y, R, r0, r1);
}

void masked_gemm_rows(Isa isa, const float* x, int64_t B, const float* w, const int32_t* words, int64_t n, int64_t W,
                      int64_t R, float* y, int64_t r0, int64_t r1) {
#if SUPSUP_X86
  if (isa == Isa::Avx512) return masked_gemm512<false, true>(x, B, w, nullptr, words, 1.0f, n, W, R, nullptr, y, r0, r1);
  if (isa == Isa::Avx2) return masked_gemm256<false, true>(x, B, w, nullptr, words, 1.0f, n, W, R, nullptr, y, r0, r1);
#endif
  masked_gemm_scalar<false, true>(x, B, w, nullptr, words, 1.0f, n, W, nullptr, y, R, r0, r1);
}

void signed_masked_gemm_rows(Isa isa, const float* x, int64_t B, const int32_t* sign_words, const int32_t* mask_words,
                             float scale, int64_t n, int64_t W, int64_t R, float* y, int64_t r0, int64_t r1) {
#if SUPSUP_X86
  if (isa == Isa::Avx512)
    return masked_gemm512<true, true>(x, B, nullptr, sign_words, mask_words, scale, n, W, R, nullptr, y, r0, r1);
  if (isa == Isa::Avx2)
    return masked_gemm256<true, true>(x, B, nullptr, sign_words, mask_words, scale, n, W, R, nullptr, y, r0, r1);
#endif
  masked_gemm_scalar<true, true>(x, B, nullptr, sign_words, mask_words, scale, n, W, nullptr, y, R, r0, r1);
}

}  // namespace supsup_cpu
