// Rank-1 mask_dot over a task-interleaved bank (lut.h, mask_dot_rank1_interleaved): word q of row r
// of every task lies in one run of kp int32, so 16 tasks' word is one 64-byte load (no transpose),
// the rows that a query skips are skipped whole (in the canonical layout a dead 25-word row lies
// between live ones, and skipping it saved almost no memory traffic), and a word's lookup tables,
// built once per query and word, stay in registers while every task streams past them.
// AVX-512: 7 tables of 32 fp32 subset sums (5-bit groups), one vpermt2ps per group of 16 tasks.
// AVX2: 11 tables of 8 (3-bit groups), one vpermps ymm per group of 8 tasks. Scalar: the portable
// nibble or byte tables of portable.h, one lookup per 4 (8) bits of a task. Loads are
// unaligned: a view's data need not start on 64 bytes.
#include "lut.h"
#include "simd.h"
#include "portable.h"

#include <algorithm>
#include <vector>

namespace supsup_cpu {
namespace {

#define IL_AVX2 __attribute__((target("avx2,fma")))
#define IL_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))

// Tasks per block of a word's run: its bits (16 KiB) stay in L1 while every query of the call reads them.
constexpr int64_t kTaskBlock = 4096;

// How far ahead the streams prefetch (kernels.h stream_prefetch), in int32: 4 KiB. On the Intel Xeon
// VM 4 and 8 KiB ran alike (superpose over the weight copy at k = 1,000: 12.4 -> 6.4-7.8 ms, AVX-512),
// 16 KiB slower; on the second Xeon VM 4 KiB into L2 ran as fast as 16-64 KiB into L1 (stream_prefetch_l2).
// Past a run's end it fetches the next run, which is where the loops go next.
constexpr int64_t kPrefetchInts = 1024;

// Whether and where the streams prefetch (kernels.h stream_prefetch, stream_prefetch_l2).
enum class Prefetch { None, L1, L2 };

Prefetch prefetch_mode() {
  if (!stream_prefetch()) return Prefetch::None;
  return stream_prefetch_l2() ? Prefetch::L2 : Prefetch::L1;
}

struct Query {
  const float* g;  // [R]
  const float* x;  // [n]
  float* acc;      // [kp]
};

// The loop shared by every ISA: rows [r0, r1), each word, each block of tasks, each query whose row is
// live; `word` looks one query's word up for tasks [t0, t1) (t0, t1 multiples of 16) with np table
// groups (fewer than full only in a row's last word, where the rest hold padding).
template <class Word>
void for_each_query_word(int64_t kp, int64_t R, int64_t W, int64_t n, const float* w, const Query* qs, int64_t nq,
                         int64_t r0, int64_t r1, bool skip_zero_rows, int tail_np, int full_np, Word word) {
  alignas(64) float vals[36];  // 32 values, then zeros for the last table group's missing bits
  (void)R;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t q = 0; q < W; ++q) {
      const int np = q == W - 1 ? tail_np : full_np;
      for (int64_t t0 = 0; t0 < kp; t0 += kTaskBlock) {
        const int64_t t1 = std::min(kp, t0 + kTaskBlock);
        for (int64_t j = 0; j < nq; ++j) {
          const float gr = qs[j].g[r];
          if (skip_zero_rows && gr == 0.0f) continue;
          rank1_values(gr, qs[j].x, w + r * n, n, q, vals);
          vals[32] = vals[33] = vals[34] = vals[35] = 0.0f;
          word(vals, np, (r * W + q) * kp, t0, t1, qs[j].acc);
        }
      }
    }
}

// ------------------------------------------------------------------------------------------------
// AVX-512: 5-bit groups (six of 5 bits, the last of 2), each a 32-entry table in two registers for
// vpermt2ps (bit 4 of an index picks the register): 7 lookups, 6 rotates and 7 adds per 16-task word
// instead of 8, 7 and 8 with nibbles, 1.07-1.1x faster on Zen 4, whose vector issue bounds this loop.
constexpr int kGroups5 = 7;
#if SUPSUP_X86
// One 64-byte line kPrefetchInts ahead of p, into L1 (prefetcht0) or L2 (prefetcht2, which Intel
// cores fill into L2 as prefetcht1).
inline void prefetch_ahead(const int32_t* p, Prefetch mode) {
  if (mode == Prefetch::L2) _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchInts), _MM_HINT_T2);
  else _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchInts), _MM_HINT_T0);
}

IL_AVX512 inline void tables32(const float* vals, __m512* t) {
  const __mmask16 has_bit[4] = {0xAAAA, 0xCCCC, 0xF0F0, 0xFF00};
  for (int p = 0; p < kGroups5; ++p) {
    __m512 lo = _mm512_setzero_ps();
    for (int b = 0; b < 4; ++b) lo = _mm512_mask_add_ps(lo, has_bit[b], lo, _mm512_set1_ps(vals[5 * p + b]));
    t[2 * p] = lo;
    t[2 * p + 1] = _mm512_add_ps(lo, _mm512_set1_ps(vals[5 * p + 4]));
  }
}

// Group p of 16 words: vpermt2ps reads an index's low 5 bits, so a rotate serves; the last group's 2
// bits are shifted down (a rotate would bring bits 0-2 in above them).
IL_AVX512 inline __m512 lookup5(__m512i b, const __m512* t, int p) {
  const __m512i idx = p == 0 ? b : p == kGroups5 - 1 ? _mm512_srli_epi32(b, 5 * p) : index_bits_at(b, 5 * p);
  return _mm512_permutex2var_ps(t[2 * p], idx, t[2 * p + 1]);
}

IL_AVX512 inline __m512 lookup7(__m512i b, const __m512* t) {
  __m512 s0 = lookup5(b, t, 0), s1 = lookup5(b, t, 1), s2 = lookup5(b, t, 2), s3 = lookup5(b, t, 3);
  s0 = _mm512_add_ps(s0, lookup5(b, t, 4));
  s1 = _mm512_add_ps(s1, lookup5(b, t, 5));
  s2 = _mm512_add_ps(s2, lookup5(b, t, 6));
  return _mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3));
}

// Tasks [t0, t1) of one word's run (bits) through the tables t, np groups of them (lookup7 for all 7).
IL_AVX512 inline void stream512(const int32_t* bits, const __m512* t, int np, int64_t t0, int64_t t1, float* acc,
                                Prefetch prefetch) {
  if (np == kGroups5) {
    if (prefetch != Prefetch::None) {
      for (int64_t i = t0; i < t1; i += 16) {  // one 64-byte line of bits per step
        prefetch_ahead(bits + i, prefetch);
        _mm512_storeu_ps(acc + i, _mm512_add_ps(_mm512_loadu_ps(acc + i), lookup7(_mm512_loadu_si512(bits + i), t)));
      }
      return;
    }
    for (int64_t i = t0; i < t1; i += 16)
      _mm512_storeu_ps(acc + i, _mm512_add_ps(_mm512_loadu_ps(acc + i), lookup7(_mm512_loadu_si512(bits + i), t)));
    return;
  }
  for (int64_t i = t0; i < t1; i += 16) {  // a row's last word: its first np (< 7) groups
    __m512i b = _mm512_loadu_si512(bits + i);
    __m512 s = _mm512_loadu_ps(acc + i);
    for (int p = 0; p < np; ++p, b = index_bits_at(b, 5)) s = _mm512_add_ps(s, _mm512_permutex2var_ps(t[2 * p], b, t[2 * p + 1]));
    _mm512_storeu_ps(acc + i, s);
  }
}

IL_AVX512 void word512(const int32_t* bank_t, const float* vals, int np, int64_t base, int64_t t0, int64_t t1, float* acc,
                       Prefetch prefetch) {
  __m512 t[2 * kGroups5];
  tables32(vals, t);
  stream512(bank_t + base, t, np, t0, t1, acc, prefetch);
}

// ------------------------------------------------------------------------------------------------
// AVX2: 3-bit groups (lut.h kGroups3)
// The tables are read from L1 as vpermps memory operands: in registers, 11 of them leave no room
// for the multiply-high constants of index3_bits_at, whose indices (on other pipes than the shifts
// that share vpermps's) made this loop 1.1x faster on Zen 4. On Intel every index costs a uop on
// ports 0/1/5 either way, so there (shift_indices) plain shifts save the `hi` shift, and four partial
// sums shorten the add chains: 1.00-1.09x faster in isolation on the Xeon VM, 1.02-1.06x in superpose
// and mask_dot over a 1024 x 1024 layer's copies at k = 250 and 2,500 (paired calls, one process).
// There the sums are also FMAs by 1.0 (exactly an add): Intel cores since Golden Cove add on ports 1
// and 5, where the 11 vpermps already queue, and FMAs issue on 0 and 1 beside the shifts. On the
// second Xeon VM (2026-12-08, FC1024 at k = 2,500, interleaved in one process) superpose / mask_dot over
// the copies went from 1.96-2.03x / 2.10-2.13x one read to 1.92x / 1.95-1.96x.
IL_AVX2 inline __m256 add_on_fma_ports(__m256 a, __m256 b, __m256 one) { return _mm256_fmadd_ps(b, one, a); }

// One step: 8 tasks' word (bits) through the 11 tables, added to acc[0:8].
template <bool SHIFTS>
IL_AVX2 inline void step256(const int32_t* bits, const float* tab, float* acc, __m256 one) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits));
  if constexpr (SHIFTS) {
    __m256 s[4];
#pragma GCC unroll 11
    for (int p = 0; p < kGroups3; ++p) {
      const __m256 v = _mm256_permutevar8x32_ps(_mm256_load_ps(tab + 8 * p), p ? _mm256_srli_epi32(b, 3 * p) : b);
      s[p & 3] = p < 4 ? v : add_on_fma_ports(s[p & 3], v, one);
    }
    const __m256 sum = add_on_fma_ports(add_on_fma_ports(s[0], s[1], one), add_on_fma_ports(s[2], s[3], one), one);
    _mm256_storeu_ps(acc, add_on_fma_ports(_mm256_loadu_ps(acc), sum, one));
  } else {
    (void)one;
    const __m256i hi = _mm256_srli_epi32(b, 16);
    __m256 s0 = _mm256_permutevar8x32_ps(_mm256_load_ps(tab), b);
    __m256 s1 = _mm256_permutevar8x32_ps(_mm256_load_ps(tab + 8), index3_bits_at(b, hi, 3));
#pragma GCC unroll 9
    for (int p = 2; p < kGroups3; ++p) {
      const __m256 v = _mm256_permutevar8x32_ps(_mm256_load_ps(tab + 8 * p), index3_bits_at(b, hi, 3 * p));
      if (p & 1) s1 = _mm256_add_ps(s1, v); else s0 = _mm256_add_ps(s0, v);
    }
    _mm256_storeu_ps(acc, _mm256_add_ps(_mm256_loadu_ps(acc), _mm256_add_ps(s0, s1)));
  }
}

// Tasks [t0, t1) (both multiples of 16: kp and np are): two steps, one 64-byte line of bits and its prefetch, per
// iteration. On the second Xeon VM (2026-12-08, FC1024 at k = 2,500, the two loops interleaved in one
// process, twice) the loop of one step per iteration, which tested (i & 8) and the prefetch mode at
// every step, ran superpose / mask_dot over the copies at 1.99-2.02x / 2.11x one read, this one at
// 1.88-1.93x / 1.98-2.00x: the loop's scalar uops had shared ports 0 and 1 with the shifts and sums.
// Four steps per iteration ran slower than two. (AMD CPUs' multiply-high form takes it too, unmeasured.)
template <bool SHIFTS, Prefetch PF>
IL_AVX2 inline void full_steps256(const int32_t* bits, const float* tab, int64_t t0, int64_t t1, float* acc) {
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t i = t0; i < t1; i += 16) {
    if constexpr (PF != Prefetch::None) prefetch_ahead(bits + i, PF);
    step256<SHIFTS>(bits + i, tab, acc + i, one);
    step256<SHIFTS>(bits + i + 8, tab, acc + i + 8, one);
  }
}

template <bool SHIFTS>
IL_AVX2 inline void full_steps256(const int32_t* bits, const float* tab, int64_t t0, int64_t t1, float* acc,
                                  Prefetch prefetch) {
  switch (prefetch) {
    case Prefetch::None: return full_steps256<SHIFTS, Prefetch::None>(bits, tab, t0, t1, acc);
    case Prefetch::L1: return full_steps256<SHIFTS, Prefetch::L1>(bits, tab, t0, t1, acc);
    case Prefetch::L2: return full_steps256<SHIFTS, Prefetch::L2>(bits, tab, t0, t1, acc);
  }
}

IL_AVX2 inline void stream256(const int32_t* bits, const float* tab, int np, int64_t t0, int64_t t1, float* acc,
                              Prefetch prefetch, bool shifts) {
  if (np == kGroups3) {
    if (shifts) full_steps256<true>(bits, tab, t0, t1, acc, prefetch);
    else full_steps256<false>(bits, tab, t0, t1, acc, prefetch);
    return;
  }
  for (int64_t i = t0; i < t1; i += 8) {  // a row's last word: its first np groups
    __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + i));
    __m256 s = _mm256_loadu_ps(acc + i);
    for (int p = 0; p < np; ++p, b = _mm256_srli_epi32(b, 3)) s = _mm256_add_ps(s, _mm256_permutevar8x32_ps(_mm256_load_ps(tab + 8 * p), b));
    _mm256_storeu_ps(acc + i, s);
  }
}

IL_AVX2 void word256(const int32_t* bank_t, const float* vals, int np, int64_t base, int64_t t0, int64_t t1, float* acc,
                     Prefetch prefetch, bool shifts) {
  alignas(32) float tab[kGroups3 * 8];
  subset_sums3(vals, tab);
  stream256(bank_t + base, tab, np, t0, t1, acc, prefetch, shifts);
}
#endif  // SUPSUP_X86

// ------------------------------------------------------------------------------------------------
// vals is zero past n, so set pad bits add nothing.
void word_scalar(const int32_t* bank_t, const float* vals, int64_t base, int64_t t0, int64_t t1, float* acc) {
  const int32_t* words = bank_t + base + t0;
  add_set_bit_sums(&vals, 1, t1 - t0, [&](int64_t i, int) { return static_cast<uint32_t>(words[i]); }, acc + t0);
}

#if SUPSUP_X86
// ------------------------------------------------------------------------------------------------
// superpose over the weight-interleaved copy (lut.h interleave_weights): Σ_t α_t M_t[r, c] is
// mask_dot with the roles of tasks and weights swapped. Word q of weight c holds tasks 32q..32q+31,
// so the tables are of α's subset sums, and 16 (8) weights' words stream past them per vector, each
// lane accumulating one weight of the row.

// The tables are rebuilt per row and q (about 5 % of the loop at 1,024 columns). Loaded from memory
// instead, they were folded into every lookup as memory operands: 1.2x slower. Sharing one build
// among 2 rows' runs gained nothing, 4 (four streams from DRAM) or column blocks were slower.
IL_AVX512 void superpose_rows512(const int32_t* bank_w, int64_t KW, int64_t n, int64_t np, const float* vals,
                                 int tail_np, float* acc, float* out, int64_t r0, int64_t r1) {
  const Prefetch prefetch = prefetch_mode();
  for (int64_t r = r0; r < r1; ++r) {
    std::fill(acc, acc + np, 0.0f);
    for (int64_t q = 0; q < KW; ++q) {
      __m512 t[2 * kGroups5];
      tables32(vals + 36 * q, t);
      stream512(bank_w + (r * KW + q) * np, t, q == KW - 1 ? tail_np : kGroups5, 0, np, acc, prefetch);
    }
    std::copy(acc, acc + n, out + r * n);
  }
}

// AVX2 reads its tables from L1 as memory operands anyway (see word256): built once per call.
IL_AVX2 void superpose_rows256(const int32_t* bank_w, int64_t KW, int64_t n, int64_t np, const float* vals,
                               int tail_np, float* acc, float* out, int64_t r0, int64_t r1) {
  const Prefetch prefetch = prefetch_mode();
  const bool shifts = shift_indices();
  constexpr int kT = kGroups3 * 8;
  std::vector<float> buf(static_cast<size_t>(KW * kT + 16));
  float* tabs = align64(buf);
  for (int64_t q = 0; q < KW; ++q) subset_sums3(vals + 36 * q, tabs + q * kT);
  for (int64_t r = r0; r < r1; ++r) {
    std::fill(acc, acc + np, 0.0f);
    for (int64_t q = 0; q < KW; ++q)
      stream256(bank_w + (r * KW + q) * np, tabs + q * kT, q == KW - 1 ? tail_np : kGroups3, 0, np, acc, prefetch, shifts);
    std::copy(acc, acc + n, out + r * n);
  }
}
#endif  // SUPSUP_X86

}  // namespace

void interleave_tasks(const int32_t* bank, int64_t k, int64_t RW, int64_t kp, int32_t* bank_t, int64_t fw0, int64_t fw1) {
  constexpr int64_t kTile = 64;  // a tile of 64 words x 64 tasks: both sides touch whole cache lines
  for (int64_t f0 = fw0; f0 < fw1; f0 += kTile)
    for (int64_t t0 = 0; t0 < kp; t0 += kTile)
      for (int64_t f = f0; f < std::min(fw1, f0 + kTile); ++f)
        for (int64_t t = t0; t < std::min(kp, t0 + kTile); ++t) bank_t[f * kp + t] = t < k ? bank[t * RW + f] : 0;
}

void mask_dot_rank1_interleaved(Isa isa, const int32_t* bank_t, int64_t kp, int64_t R, int64_t W, int64_t n,
                                const float* g, const float* x, const float* w, int64_t q, float* acc, int64_t r0,
                                int64_t r1, bool skip_zero_rows) {
  std::vector<Query> qs;
  qs.reserve(static_cast<size_t>(q));
  for (int64_t j = 0; j < q; ++j) qs.push_back(Query{g + j * R, x + j * n, acc + j * kp});
  const Prefetch prefetch = prefetch_mode();
  const bool shifts = shift_indices();  // once: a call per word cost a vzeroupper and spills
#if SUPSUP_X86
  if (isa == Isa::Avx512) {
    for_each_query_word(kp, R, W, n, w, qs.data(), q, r0, r1, skip_zero_rows, tail_lookups(n, W, 5, kGroups5),
                        kGroups5,
                        [&](const float* vals, int np, int64_t base, int64_t t0, int64_t t1, float* a) {
                          word512(bank_t, vals, np, base, t0, t1, a, prefetch);
                        });
  } else if (isa == Isa::Avx2) {
    for_each_query_word(kp, R, W, n, w, qs.data(), q, r0, r1, skip_zero_rows, tail_lookups(n, W, 3, kGroups3), kGroups3,
                        [&](const float* vals, int np, int64_t base, int64_t t0, int64_t t1, float* a) {
                          word256(bank_t, vals, np, base, t0, t1, a, prefetch, shifts);
                        });
  } else
#endif
  {
    for_each_query_word(kp, R, W, n, w, qs.data(), q, r0, r1, skip_zero_rows, 0, 0,
                        [&](const float* vals, int, int64_t base, int64_t t0, int64_t t1, float* a) {
                          word_scalar(bank_t, vals, base, t0, t1, a);
                        });
  }
}

}  // namespace supsup_cpu

namespace supsup_cpu {

void interleave_weights(const int32_t* bank, int64_t k, int64_t R, int64_t W, int64_t n, int64_t KW, int64_t np,
                        int32_t* bank_w, int64_t r0, int64_t r1) {
  uint32_t a[32];
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t q = 0; q < KW; ++q) {
      int32_t* dst = bank_w + (r * KW + q) * np;
      for (int64_t w = 0; w < W; ++w) {
        for (int64_t i = 0; i < 32; ++i)
          a[i] = 32 * q + i < k ? static_cast<uint32_t>(bank[((32 * q + i) * R + r) * W + w]) : 0u;
        transpose32(a);
        for (int64_t j = 0; j < 32 && 32 * w + j < n; ++j) dst[32 * w + j] = static_cast<int32_t>(a[j]);
      }
      std::fill(dst + n, dst + np, 0);  // padding columns (the bank's pad bits, which may be set, stay out)
    }
}

void superpose_interleaved(Isa isa, const int32_t* bank_w, int64_t k, int64_t KW, int64_t n, int64_t np,
                           const float* alpha, float* out, int64_t r0, int64_t r1) {
  std::vector<float> vals(static_cast<size_t>(KW * 36), 0.0f);  // α of word q at 36 q, zeros past k
  for (int64_t q = 0; q < KW; ++q)
    for (int64_t i = 0; i < 32 && 32 * q + i < k; ++i) vals[36 * q + i] = alpha[32 * q + i];
  std::vector<float> acc(static_cast<size_t>(np));
#if SUPSUP_X86
  if (isa == Isa::Avx512) {
    superpose_rows512(bank_w, KW, n, np, vals.data(), tail_lookups(k, KW, 5, kGroups5), acc.data(), out, r0, r1);
  } else if (isa == Isa::Avx2) {
    superpose_rows256(bank_w, KW, n, np, vals.data(), tail_lookups(k, KW, 3, kGroups3), acc.data(), out, r0, r1);
  } else
#endif
  {
    for (int64_t r = r0; r < r1; ++r) {
      std::fill(acc.begin(), acc.begin() + np, 0.0f);
      for (int64_t q = 0; q < KW; ++q) word_scalar(bank_w, vals.data() + 36 * q, (r * KW + q) * np, 0, np, acc.data());
      std::copy(acc.begin(), acc.begin() + n, out + r * n);
    }
  }
}

}  // namespace supsup_cpu

namespace supsup_cpu {

void mask_dot_rows_interleaved(Isa isa, const int32_t* bank_t, int64_t kp, int64_t W, int64_t n, const float* x,
                               const float* w, int64_t k, float* out, int64_t r0, int64_t r1) {
  alignas(64) float vals[36];
  vals[32] = vals[33] = vals[34] = vals[35] = 0.0f;
  std::vector<float> acc(static_cast<size_t>(kp));
  const int tail5 = tail_lookups(n, W, 5, kGroups5), tail3 = tail_lookups(n, W, 3, kGroups3);
  const Prefetch prefetch = prefetch_mode();
  const bool shifts = shift_indices();
  for (int64_t r = r0; r < r1; ++r) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t q = 0; q < W; ++q) {
      rank1_values(1.0f, x, w + r * n, n, q, vals);
      const int64_t base = (r * W + q) * kp;
#if SUPSUP_X86
      if (isa == Isa::Avx512)
        word512(bank_t, vals, q == W - 1 ? tail5 : kGroups5, base, 0, kp, acc.data(), prefetch);
      else if (isa == Isa::Avx2)
        word256(bank_t, vals, q == W - 1 ? tail3 : kGroups3, base, 0, kp, acc.data(), prefetch, shifts);
      else
#endif
        word_scalar(bank_t, vals, base, 0, kp, acc.data());
    }
    std::copy(acc.begin(), acc.begin() + k, out + r * k);
  }
}

}  // namespace supsup_cpu
