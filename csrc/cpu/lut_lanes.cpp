// Batched rank-1 mask_dot with the queries in the vector lanes (see lut.h, mask_dot_rank1_lanes).
// The task-lane kernels of lut.cpp spend one vpermps per nibble of 16 tasks, and vpermps is what
// bounds them. Here the bits are addresses instead: per word of the bank, eight tables of the 16
// subset sums of 4 weights, each entry holding those sums for 16 queries (one zmm, or two ymm); a
// task's nibble picks the entry, and one vector add (with its load) serves 16 queries.
//
// The tables of a word are 8 KiB; a block of 4 words is built and then read by every task, whose
// words are loaded directly. Byte tables (256 entries, 64 KiB a word, four adds a word) measured
// slower: they live in L2. Building costs 128 vector stores a word, repaid from a few dozen tasks.
#include "lut.h"
#include "simd.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

namespace supsup_cpu {
namespace {

#define LANES_AVX2 __attribute__((target("avx2,fma")))
#define LANES_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))

constexpr int64_t kLanes = kQueryLanes;              // queries per table entry
static_assert(kLanes == 16, "an entry is one zmm or two ymm");
constexpr int64_t kWordFloats = 8 * 16 * kLanes;    // the tables of one word: 8 KiB
constexpr int64_t kBlockWords = 4;                   // words whose tables are built before the tasks read them

#if SUPSUP_X86
// ------------------------------------------------------------------------------------------------
// AVX-512: an entry is one zmm.
// The 8 nibble tables of word (r, qw): vals[c] = g_l[r] * (x_l[32 qw + c] * w[r, 32 qw + c]) over lanes l
// (zero past n), and entry e of table p the sum of vals[4 p + b] over the set bits b of e.
LANES_AVX512 void build_word512(const float* gT, const float* xT, const float* w, int64_t n, int64_t r, int64_t qw,
                                float* t) {
  const __m512 g = _mm512_loadu_ps(gT + r * kLanes);
  for (int p = 0; p < 8; ++p) {
    float* tp = t + p * 16 * kLanes;
    _mm512_store_ps(tp, _mm512_setzero_ps());
    for (int b = 0; b < 4; ++b) {
      const int64_t col = 32 * qw + 4 * p + b;
      const __m512 v = col < n ? _mm512_mul_ps(g, _mm512_mul_ps(_mm512_loadu_ps(xT + col * kLanes), _mm512_set1_ps(w[r * n + col])))
                               : _mm512_setzero_ps();
      const int half = 1 << b;
      for (int e = 0; e < half; ++e) _mm512_store_ps(tp + (half + e) * kLanes, _mm512_add_ps(_mm512_load_ps(tp + e * kLanes), v));
    }
  }
}

// tails: bit j set where word j is a row's last, of which only the first tail_np nibbles are looked up.
LANES_AVX512 void lookup512(const int32_t* bank, int64_t stride, int64_t k, const float* tables, int64_t fw, int64_t len,
                            uint32_t tails, int tail_np, float* out) {
  for (int64_t t = 0; t < k; ++t) {
    const uint32_t* wp = reinterpret_cast<const uint32_t*>(bank + t * stride + fw);
    if (t + 8 < k) __builtin_prefetch(bank + (t + 8) * stride + fw, 0, 1);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (int64_t j = 0; j < len; ++j) {
      const char* tj = reinterpret_cast<const char*>(tables + j * kWordFloats);
      const uint32_t x = wp[j];
      if (tails >> j & 1) {
        for (int p = 0; p < tail_np; ++p)
          a0 = _mm512_add_ps(a0, _mm512_load_ps(tj + p * 1024 + (((x >> (4 * p)) & 15u) << 6)));
        continue;
      }
      // byte offset of nibble p's entry: ((x >> 4p) & 15) * 64 + p * 1024
      a0 = _mm512_add_ps(a0, _mm512_load_ps(tj + ((x << 6) & 0x3C0)));
      a1 = _mm512_add_ps(a1, _mm512_load_ps(tj + 1024 + ((x << 2) & 0x3C0)));
      a0 = _mm512_add_ps(a0, _mm512_load_ps(tj + 2048 + ((x >> 2) & 0x3C0)));
      a1 = _mm512_add_ps(a1, _mm512_load_ps(tj + 3072 + ((x >> 6) & 0x3C0)));
      a0 = _mm512_add_ps(a0, _mm512_load_ps(tj + 4096 + ((x >> 10) & 0x3C0)));
      a1 = _mm512_add_ps(a1, _mm512_load_ps(tj + 5120 + ((x >> 14) & 0x3C0)));
      a0 = _mm512_add_ps(a0, _mm512_load_ps(tj + 6144 + ((x >> 18) & 0x3C0)));
      a1 = _mm512_add_ps(a1, _mm512_load_ps(tj + 7168 + ((x >> 22) & 0x3C0)));
    }
    float* o = out + t * kLanes;
    _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), _mm512_add_ps(a0, a1)));
  }
}

// ------------------------------------------------------------------------------------------------
// AVX2: an entry is two ymm (lanes 0-7 and 8-15).
LANES_AVX2 void build_word256(const float* gT, const float* xT, const float* w, int64_t n, int64_t r, int64_t qw,
                              float* t) {
  const __m256 g0 = _mm256_loadu_ps(gT + r * kLanes), g1 = _mm256_loadu_ps(gT + r * kLanes + 8);
  for (int p = 0; p < 8; ++p) {
    float* tp = t + p * 16 * kLanes;
    _mm256_store_ps(tp, _mm256_setzero_ps());
    _mm256_store_ps(tp + 8, _mm256_setzero_ps());
    for (int b = 0; b < 4; ++b) {
      const int64_t col = 32 * qw + 4 * p + b;
      __m256 v0 = _mm256_setzero_ps(), v1 = _mm256_setzero_ps();
      if (col < n) {
        const __m256 wc = _mm256_set1_ps(w[r * n + col]);
        v0 = _mm256_mul_ps(g0, _mm256_mul_ps(_mm256_loadu_ps(xT + col * kLanes), wc));
        v1 = _mm256_mul_ps(g1, _mm256_mul_ps(_mm256_loadu_ps(xT + col * kLanes + 8), wc));
      }
      const int half = 1 << b;
      for (int e = 0; e < half; ++e) {
        _mm256_store_ps(tp + (half + e) * kLanes, _mm256_add_ps(_mm256_load_ps(tp + e * kLanes), v0));
        _mm256_store_ps(tp + (half + e) * kLanes + 8, _mm256_add_ps(_mm256_load_ps(tp + e * kLanes + 8), v1));
      }
    }
  }
}

LANES_AVX2 void lookup256(const int32_t* bank, int64_t stride, int64_t k, const float* tables, int64_t fw, int64_t len,
                          uint32_t tails, int tail_np, float* out) {
  for (int64_t t = 0; t < k; ++t) {
    const uint32_t* wp = reinterpret_cast<const uint32_t*>(bank + t * stride + fw);
    if (t + 8 < k) __builtin_prefetch(bank + (t + 8) * stride + fw, 0, 1);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
    for (int64_t j = 0; j < len; ++j) {
      const char* tj = reinterpret_cast<const char*>(tables + j * kWordFloats);
      const uint32_t x = wp[j];
      if (tails >> j & 1) {
        for (int p = 0; p < tail_np; ++p) {
          const float* e = reinterpret_cast<const float*>(tj + p * 1024 + (((x >> (4 * p)) & 15u) << 6));
          a0 = _mm256_add_ps(a0, _mm256_load_ps(e));
          a1 = _mm256_add_ps(a1, _mm256_load_ps(e + 8));
        }
        continue;
      }
      for (int p = 0; p < 8; p += 2) {
        const float* e0 = reinterpret_cast<const float*>(tj + p * 1024 + (((x >> (4 * p)) & 15u) << 6));
        const float* e1 = reinterpret_cast<const float*>(tj + (p + 1) * 1024 + (((x >> (4 * p + 4)) & 15u) << 6));
        a0 = _mm256_add_ps(a0, _mm256_load_ps(e0));
        a1 = _mm256_add_ps(a1, _mm256_load_ps(e0 + 8));
        b0 = _mm256_add_ps(b0, _mm256_load_ps(e1));
        b1 = _mm256_add_ps(b1, _mm256_load_ps(e1 + 8));
      }
    }
    float* o = out + t * kLanes;
    _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), _mm256_add_ps(a0, b0)));
    _mm256_storeu_ps(o + 8, _mm256_add_ps(_mm256_loadu_ps(o + 8), _mm256_add_ps(a1, b1)));
  }
}

#endif  // SUPSUP_X86

}  // namespace

bool lanes_available(Isa isa) { return isa == Isa::Avx512 || isa == Isa::Avx2; }

void mask_dot_rank1_lanes(Isa isa, const int32_t* bank, int64_t R, int64_t W, int64_t n, const float* gT,
                          const float* xT, const float* w, int64_t k, float* out, int64_t fw0, int64_t fw1) {
#if SUPSUP_X86
  const int64_t stride = R * W;
  thread_local std::vector<float> tbuf;
  if (tbuf.size() < static_cast<size_t>(kBlockWords * kWordFloats + 16)) tbuf.resize(kBlockWords * kWordFloats + 16);
  float* tables = align64(tbuf);
  const int tail_np = tail_lookups(n, W, 4, 8);
  for (int64_t fw = fw0; fw < fw1; fw += kBlockWords) {
    const int64_t len = std::min(kBlockWords, fw1 - fw);
    const uint32_t tails = tail_np < 8 ? tail_words(W, fw, len) : 0;
    for (int64_t j = 0; j < len; ++j) {
      const int64_t r = (fw + j) / W, qw = (fw + j) % W;
      if (isa == Isa::Avx512)
        build_word512(gT, xT, w, n, r, qw, tables + j * kWordFloats);
      else
        build_word256(gT, xT, w, n, r, qw, tables + j * kWordFloats);
    }
    if (isa == Isa::Avx512)
      lookup512(bank, stride, k, tables, fw, len, tails, tail_np, out);
    else
      lookup256(bank, stride, k, tables, fw, len, tails, tail_np, out);
  }
#else
  throw std::logic_error("mask_dot_rank1_lanes needs AVX2 or AVX-512 (lanes_available)");
#endif
}

}  // namespace supsup_cpu
