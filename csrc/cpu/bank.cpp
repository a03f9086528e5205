// Bank ops over k packed masks: mask_dot ((<M_i, v>)_i, the alpha-gradient) and superpose
// (sum_i alpha_i M_i), for every instruction set.
#include "kernels.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>
#include "lut.h"
#include "portable.h"

namespace supsup_cpu {

namespace {

// superpose walks the tasks in blocks: within a block each task's rows are one sequential stream
// (a few dozen pages in the TLB at a time); the output rows are re-read once per block. 16 streams
// stay within what the hardware prefetchers follow: 64 were 1.5x slower (139 vs 89 ms at k = 2,500,
// FC1024, on this project's AVX-512 Xeon), 32 about the same as 16.
constexpr int64_t kSuperposeTaskBlock = 16;

// From this many tasks the table kernel (superpose_lut.cpp) is faster than the masked adds below
// (break-even at 16-20 tasks with AVX-512 and with AVX2 on this project's Xeon).
constexpr int64_t kSuperposeLutMinTasks = 24;

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

// superpose on the scalar ISA from kSuperposeTableTasks tasks on: 32 tasks at a time, their words at
// one position of a row are transposed (transpose32), so that a word holds one weight's bits of those
// 32 tasks, and looked up in byte tables of the 32 tasks' α subset sums: 4 lookups add 32 tasks at
// one weight. Each group's tables (4 KiB, built once per call) stay in L1 while its 32 tasks' rows
// stream past; the output rows are re-read once per group.
constexpr int64_t kSuperposeTableTasks = 8;

void superpose_scalar_tables(const int32_t* bank, int64_t k, int64_t W, int64_t n, int64_t R, const float* alpha,
                             const int64_t* active, float* out, int64_t r0, int64_t r1) {
  const int64_t stride = R * W;
  std::fill(out + r0 * n, out + r1 * n, 0.0f);
  SubsetTables<8> tab;
  const int32_t* task[32];
  uint32_t a[32];
  float vals[32];
  for (int64_t t0 = 0; t0 < k; t0 += 32) {
    const int64_t kb = std::min<int64_t>(32, k - t0);
    for (int64_t i = 0; i < 32; ++i) {
      vals[i] = i < kb ? alpha[t0 + i] : 0.0f;
      task[i] = i < kb ? task_base(bank, active, t0 + i, stride) : nullptr;
    }
    tab.build(vals);
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t q = 0; q < W; ++q) {
        for (int64_t i = 0; i < 32; ++i) a[i] = i < kb ? static_cast<uint32_t>(task[i][r * W + q]) : 0u;
        transpose32(a);  // a[j]: bit i = task t0 + i's bit at column 32 q + j; pad columns are not written
        float* o = out + r * n + 32 * q;
        const int64_t cols = std::min<int64_t>(32, n - 32 * q);
        for (int64_t j = 0; j < cols; ++j) o[j] += tab.lookup(a[j]);
      }
  }
}

#if SUPSUP_X86
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

// The 8 bits of every byte value as 8 floats 0.0f / 1.0f (8 KiB, L1-resident).
struct ByteLanes {
  alignas(32) float row[256][8];
};

const ByteLanes& byte_lanes() {
  static const ByteLanes table = [] {
    ByteLanes t{};
    for (int v = 0; v < 256; ++v)
      for (int i = 0; i < 8; ++i) t.row[v][i] = static_cast<float>((v >> i) & 1);
    return t;
  }();
  return table;
}

// Superpose on AVX2: one table-row FMA per 8 bits of a task (see the loop). Two words per task at a time.
template <int NW>
AVX2_TARGET void superpose_words_avx2(const int32_t* bank, int64_t k, int64_t stride, int64_t off, int64_t q0, int64_t n,
                                      const float* alpha, const int64_t* active, float* o, bool init) {
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
  const ByteLanes& lanes = byte_lanes();
  for (int64_t t = 0; t < k; ++t) {
    // Each byte of the mask indexes a table row of its 8 bits as 0.0f / 1.0f, and one FMA (whose
    // memory operand is that row) adds α to the lanes whose bit is set: exactly acc + α or acc.
    // Pad bits are zero in the canonical layout, and pad lanes are never stored anyway.
    const uint8_t* b = reinterpret_cast<const uint8_t*>(task_base(bank, active, t, stride) + off);
    const __m256 a = _mm256_set1_ps(alpha[t]);
    for (int j = 0; j < NW; ++j)
      for (int c = 0; c < 4; ++c)
        acc[4 * j + c] = _mm256_fmadd_ps(_mm256_load_ps(lanes.row[b[4 * j + c]]), a, acc[4 * j + c]);
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
#endif  // SUPSUP_X86

}  // namespace

void mask_dot(Isa isa, const int32_t* bank, int64_t R, int64_t W, int64_t n, const float* v, const int64_t* active,
              int64_t k, float* out, int64_t fw0, int64_t fw1) {
#if SUPSUP_X86
  if (isa == Isa::Avx512) {
    // The tables cost a few vector ops per word of v, shared by all tasks: worth it from a few tasks on.
    if (k >= 4) return mask_dot_lut(isa, bank, R, W, n, v, 1, 0, active, k, out, fw0, fw1);
    return mask_dot_avx512(bank, R, W, n, v, active, k, out, fw0, fw1);
  }
  if (isa == Isa::Avx2) {
    if (k >= 4) return mask_dot_lut(isa, bank, R, W, n, v, 1, 0, active, k, out, fw0, fw1);
    return mask_dot_avx2(bank, R, W, n, v, active, k, out, fw0, fw1);
  }
#endif  // SUPSUP_X86
  if (k >= 4) return mask_dot_lut(isa, bank, R, W, n, v, 1, 0, active, k, out, fw0, fw1);
  mask_dot_scalar(bank, R, W, n, v, active, k, out, fw0, fw1);
}

bool mask_dot_rank1(Isa isa, const int32_t* bank, int64_t R, int64_t W, int64_t n, const float* g, const float* x,
                    const float* w, int64_t k, float* out, int64_t fw0, int64_t fw1, bool skip_zero_rows) {
  if (k < 4) return false;
  mask_dot_lut_rank1(isa, bank, R, W, n, g, x, w, 1, k, out, fw0, fw1, skip_zero_rows);
  return true;
}

void superpose(Isa isa, const int32_t* bank, int64_t k, int64_t W, int64_t n, int64_t R, const float* alpha,
               const int64_t* active, float* out, int64_t r0, int64_t r1) {
  if (k >= kSuperposeLutMinTasks && superpose_lut_available(isa))
    return superpose_lut(isa, bank, k, W, n, R, alpha, active, out, r0, r1);
#if SUPSUP_X86
  if (isa == Isa::Avx512) return superpose_avx512(bank, k, W, n, R, alpha, active, out, r0, r1);
  if (isa == Isa::Avx2) return superpose_avx2(bank, k, W, n, R, alpha, active, out, r0, r1);
#endif
  if (k >= kSuperposeTableTasks) return superpose_scalar_tables(bank, k, W, n, R, alpha, active, out, r0, r1);
  superpose_scalar(bank, k, W, n, R, alpha, active, out, r0, r1);
}

}  // namespace supsup_cpu
