// Lookup-table mask_dot kernels (see lut.h). AVX-512: 16 tasks per vector, nibble tables of 16
// fp32 subset sums, one vpermps (which reads only the low 4 bits of each index, so a shifted word
// needs no AND) and one add per 4 bits of 16 tasks. AVX2: 8 tasks per vector, 3-bit groups (11 per
// word: ten of 3 bits, the last of 2), tables of 8 fp32 subset sums, one vpermps ymm (low 3 bits)
// and one add per 3 bits of 8 tasks. Words of 16 (8) tasks are read a cache line (half) at a time
// and transposed in registers so that one vector holds the same word of every task.
//
// Rank-1 sources (the α-gradient of one image, v = (g xᵀ) ⊙ w) skip the rows where g is zero: a
// single query packs the words of its live rows back to back into chunks (rows between dead ones
// are often shorter than a chunk) and never reads the others; batched queries look up, per query,
// only the words of its own live rows.
#include "lut.h"
#include "simd.h"
#include "portable.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace supsup_cpu {
namespace {

#define LUT_AVX2 __attribute__((target("avx2,fma")))
#define LUT_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))

// Values of v for one mask word: vals[i] for the 32 bits of word q of row r, zero where the bit
// is padding. Plain loops: the table build is shared by every task and costs little.
struct DenseSrc {
  const float* v;
  int64_t n;
  static bool active(int64_t) { return true; }
  inline void load(int64_t r, int64_t q, float* vals) const {
    const int64_t len = std::min<int64_t>(32, n - 32 * q);
    const float* p = v + r * n + 32 * q;
    for (int64_t i = 0; i < len; ++i) vals[i] = p[i];
    for (int64_t i = len; i < 32; ++i) vals[i] = 0.0f;
  }
};

// Rows with g[r] == 0 (a dead ReLU, or a logit the objective ignores) add exactly zero when x and w
// are finite: with skip_zero_rows their bits are neither read nor looked up.
struct Rank1Src {
  const float* g;
  const float* x;
  const float* w;
  int64_t n;
  bool skip_zero_rows;
  bool active(int64_t r) const { return !skip_zero_rows || g[r] != 0.0f; }
  inline void load(int64_t r, int64_t q, float* vals) const { rank1_values(g[r], x, w + r * n, n, q, vals); }
};

// v = w ⊙ x row by row (every task's masked layer on one input x): Rank1Src with g = 1.
struct RowSrc {
  const float* x;
  const float* w;
  int64_t n;
  static bool active(int64_t) { return true; }
  inline void load(int64_t r, int64_t q, float* vals) const {
    const int64_t len = std::min<int64_t>(32, n - 32 * q);
    const float* xp = x + 32 * q;
    const float* wp = w + r * n + 32 * q;
    for (int64_t i = 0; i < len; ++i) vals[i] = xp[i] * wp[i];
    for (int64_t i = len; i < 32; ++i) vals[i] = 0.0f;
  }
};

// The rows of ng groups of Width tasks from group g on (cnt[gi] tasks in group gi; the last may be short).
template <int Width>
void group_rows(const int32_t* bank, const int64_t* active, int64_t stride, int64_t k, int64_t g, int ng,
                const int32_t* (*rows)[Width], int64_t* cnt) {
  for (int gi = 0; gi < ng; ++gi) {
    const int64_t tg = Width * (g + gi);
    cnt[gi] = std::min<int64_t>(Width, k - tg);
    for (int i = 0; i < cnt[gi]; ++i) rows[gi][i] = task_base(bank, active, tg + i, stride);
  }
}

// The next run [*ra, *rb) of flat words of consecutive active rows of src at or after fw, within fwb.
template <class Src>
bool next_active_run(const Src& src, int64_t W, int64_t fw, int64_t fwb, int64_t* ra, int64_t* rb) {
  while (fw < fwb && !src.active(fw / W)) fw = (fw / W + 1) * W;
  if (fw >= fwb) return false;
  int64_t end = (fw / W + 1) * W;
  while (end < fwb && src.active(end / W)) end += W;
  *ra = fw;
  *rb = std::min(end, fwb);
  return true;
}

// Bit j set where word fw + j (j < len <= 32) lies in an active row of src.
template <class Src>
uint32_t active_words(const Src& src, int64_t W, int64_t fw, int64_t len) {
  uint32_t m = 0;
  for (int64_t a = fw; a < fw + len;) {
    const int64_t e = std::min(fw + len, (a / W + 1) * W);
    if (src.active(a / W)) m |= static_cast<uint32_t>(((uint64_t{1} << (e - fw)) - 1) & ~((uint64_t{1} << (a - fw)) - 1));
    a = e;
  }
  return m;
}

// A block of one query's words: runs [a, b) of active words whose tables lie back to back.
struct Run {
  int64_t a, b;
};

// Fill runs with the active runs of src from *fw on (advancing it) until they hold bw words, building
// each run's tables behind the last; returns the number of runs (0: no active word left before fwb).
template <class Src, class Build>
int64_t gather_runs(const Src& src, int64_t W, int64_t* fw, int64_t fwb, int64_t bw, int64_t tab, float* tables,
                    std::vector<Run>& runs, Build build) {
  runs.clear();
  int64_t filled = 0, ra, rb;
  while (filled < bw && next_active_run(src, W, *fw, fwb, &ra, &rb)) {
    rb = std::min(rb, ra + bw - filled);
    build(src, W, ra, rb, tables + filled * tab);
    runs.push_back(Run{ra, rb});
    filled += rb - ra;
    *fw = rb;
  }
  return static_cast<int64_t>(runs.size());
}

// The block's active words, back to back, in chunks of `width` lanes (the last may be short): lanes
// [l0, l1) of a chunk read the words off + l0 .. off + l1 - 1 of a task, one piece per run it spans.
// Chunks that cross runs keep rows of a few words (a hidden layer between dead units) from wasting
// most of a load and transpose.
struct Piece {
  int64_t off;
  int l0, l1;
};

struct Chunks {
  std::vector<Piece> pieces;
  std::vector<int64_t> first;  // chunk c: pieces [first[c], first[c + 1])
  std::vector<uint32_t> tails; // chunk c: bit l set where lane l holds the last word of a row
  int last_len = 0;            // lanes of the last chunk
  int64_t one_run = -1;        // where there is one run: its first word (chunk c starts at one_run + width * c)
  int64_t count() const { return static_cast<int64_t>(first.size()) - 1; }
  int len(int64_t c, int width) const { return c + 1 < count() ? width : last_len; }
};

inline void chunk_runs(const std::vector<Run>& runs, int width, int64_t W, Chunks& ch) {
  ch.one_run = runs.size() == 1 ? runs[0].a : -1;
  ch.pieces.clear();
  ch.first.assign(1, 0);
  ch.tails.assign(1, 0);
  int lane = 0;
  for (const Run& r : runs)
    for (int64_t fw = r.a; fw < r.b;) {
      const int take = static_cast<int>(std::min<int64_t>(r.b - fw, width - lane));
      ch.pieces.push_back(Piece{fw - lane, lane, lane + take});
      ch.tails.back() |= tail_words(W, fw, take) << lane;
      lane += take;
      fw += take;
      if (lane == width) {
        ch.first.push_back(static_cast<int64_t>(ch.pieces.size()));
        ch.tails.push_back(0);
        lane = 0;
      }
    }
  ch.last_len = width;
  if (lane > 0) {
    ch.first.push_back(static_cast<int64_t>(ch.pieces.size()));
    ch.last_len = lane;
  }
}

// Ask for the next group's words of chunk c (into L2) while this group's chunk c is looked up: the
// loads of short runs (rows between dead ones) defeat the hardware prefetcher and would otherwise
// wait on memory one group at a time.
inline void prefetch_chunk(const int32_t* const* rows, int64_t cnt, const Chunks& ch, int64_t c) {
  for (int64_t p = ch.first[c]; p < ch.first[c + 1]; ++p) {
    const Piece& pc = ch.pieces[p];
    for (int64_t i = 0; i < cnt; ++i) {
      __builtin_prefetch(rows[i] + pc.off + pc.l0, 0, 2);
      __builtin_prefetch(rows[i] + pc.off + pc.l1 - 1, 0, 2);
    }
  }
}

#if SUPSUP_X86
constexpr int64_t kLutBlockFloats = 1024 * 128;  // table floats per block, all queries together (512 KiB; 256 KiB read 10 % slower)

// ------------------------------------------------------------------------------------------------
// AVX-512
// 8 nibble tables (128 floats) per word for words [fw0, fw1); the words of inactive rows, never
// looked up, are left unwritten.
template <class Src>
LUT_AVX512 void build512(const Src& src, int64_t W, int64_t fw0, int64_t fw1, float* tables) {
  const __mmask16 has_bit[4] = {0xAAAA, 0xCCCC, 0xF0F0, 0xFF00};
  alignas(64) float vals[32];
  for (int64_t r = fw0 / W; r * W < fw1; ++r) {
    if (!src.active(r)) continue;
    for (int64_t fw = std::max(fw0, r * W); fw < std::min(fw1, (r + 1) * W); ++fw) {
      src.load(r, fw - r * W, vals);
      float* t = tables + (fw - fw0) * 128;
      for (int p = 0; p < 8; ++p) {
        __m512 tab = _mm512_setzero_ps();
        for (int b = 0; b < 4; ++b) tab = _mm512_mask_add_ps(tab, has_bit[b], tab, _mm512_set1_ps(vals[4 * p + b]));
        _mm512_store_ps(t + 16 * p, tab);
      }
    }
  }
}

// Many queries (batched task inference) over len words of ng <= 4 groups of 16 tasks. Each query's
// tables (512 bytes a word) come from L2, and with one group per table load that traffic bound the
// batched path; here each table row is loaded once for all ng groups. The nibble indices of every
// word are shifted out once into an L1 buffer that all queries read. tables: query jq's rows at
// jq * q_stride; part: query jq's partial sums of group gi at jq * part_stride + 16 gi.
constexpr int kQueryGroups = 4;

LUT_AVX512 void lookup_queries512(const __m512i (*words)[16], int ng, int64_t len, const float* tables,
                                  int64_t q_stride, int64_t nq, const uint32_t* wmask, uint32_t tails, int tail_np,
                                  float* part, int64_t part_stride) {
  alignas(64) __m512i idx[16][kQueryGroups][8];  // 32 KiB
  for (int64_t j = 0; j < len; ++j)
    for (int gi = 0; gi < ng; ++gi) {
      idx[j][gi][0] = words[gi][j];
      for (int p = 1; p < 8; ++p) idx[j][gi][p] = index_bits_at(words[gi][j], 4 * p);
    }
  for (int64_t jq = 0; jq < nq; ++jq) {
    if (!wmask[jq]) continue;
    const float* tb = tables + jq * q_stride;
    __m512 acc[kQueryGroups][2];
    for (int gi = 0; gi < kQueryGroups; ++gi) acc[gi][0] = acc[gi][1] = _mm512_setzero_ps();
    for (uint32_t m = wmask[jq]; m; m &= m - 1) {
      const int j = __builtin_ctz(m);
      const float* t = tb + j * 128;
      if (tails >> j & 1) {  // a row's last word: only its valid nibbles
        for (int p = 0; p < tail_np; ++p) {
          const __m512 tab = _mm512_load_ps(t + 16 * p);
#pragma GCC unroll 4
          for (int gi = 0; gi < kQueryGroups; ++gi)
            if (gi < ng) acc[gi][0] = _mm512_add_ps(acc[gi][0], _mm512_permutexvar_ps(_mm512_load_si512(&idx[j][gi][p]), tab));
        }
        continue;
      }
#pragma GCC unroll 8
      for (int p = 0; p < 8; ++p) {
        const __m512 tab = _mm512_load_ps(t + 16 * p);
#pragma GCC unroll 4
        for (int gi = 0; gi < kQueryGroups; ++gi)
          if (gi < ng)
            acc[gi][p & 1] = _mm512_add_ps(acc[gi][p & 1], _mm512_permutexvar_ps(_mm512_load_si512(&idx[j][gi][p]), tab));
      }
    }
    for (int gi = 0; gi < ng; ++gi) {
      float* pp = part + jq * part_stride + 16 * gi;
      _mm512_storeu_ps(pp, _mm512_add_ps(_mm512_loadu_ps(pp), _mm512_add_ps(acc[gi][0], acc[gi][1])));
    }
  }
}

// A row's last word: its first np nibbles only (the rest are padding).
LUT_AVX512 inline void lookup_tail512(__m512* acc, __m512i wj, const float* t, int np) {
  for (int p = 0; p < np; ++p, wj = index_bits_at(wj, 4))
    acc[0] = _mm512_add_ps(acc[0], _mm512_permutexvar_ps(wj, _mm512_load_ps(t + 16 * p)));
}

// 16 tasks' words [fw, fw + len) as 16 vectors, vector j holding word j of every task (zero past len
// and for absent tasks).
LUT_AVX512 inline void load_words16(const int32_t* const* rows, int64_t cnt, int64_t fw, int64_t len, __m512i* words) {
  const __mmask16 lm = static_cast<__mmask16>((1u << len) - 1u);
  for (int i = 0; i < 16; ++i) words[i] = i < cnt ? _mm512_maskz_loadu_epi32(lm, rows[i] + fw) : _mm512_setzero_si512();
  transpose16x16(words);
}

// 16 tasks' words of chunk c (see Chunks) as 16 vectors, vector j holding lane j of every task.
LUT_AVX512 inline void load_chunk16(const int32_t* const* rows, int64_t cnt, const Chunks& ch, int64_t c, __m512i* words) {
  for (int i = 0; i < 16; ++i) words[i] = _mm512_setzero_si512();
  for (int64_t p = ch.first[c]; p < ch.first[c + 1]; ++p) {
    const Piece& pc = ch.pieces[p];
    const __mmask16 lanes = static_cast<__mmask16>(((1u << pc.l1) - 1u) & ~((1u << pc.l0) - 1u));
    for (int i = 0; i < 16; ++i)  // lanes outside [l0, l1) are not read
      if (i < cnt) words[i] = _mm512_mask_loadu_epi32(words[i], lanes, rows[i] + pc.off);
  }
  transpose16x16(words);
}

// One query over a block's chunks (tables: the block's, back to back), all groups of 16 tasks.
LUT_AVX512 void single512(const int32_t* bank, int64_t stride, const int64_t* active, int64_t k, const float* tables,
                          const Chunks& ch, int tail_np, float* part) {
  const int64_t groups = (k + 15) / 16;
  const int32_t* rows[2][1][16];
  int64_t cnt[2];
  group_rows<16>(bank, active, stride, k, 0, 1, rows[0], &cnt[0]);
  for (int64_t g = 0; g < groups; ++g) {
    const int cur = g & 1;
    if (g + 1 < groups)
      group_rows<16>(bank, active, stride, k, g + 1, 1, rows[cur ^ 1], &cnt[cur ^ 1]);
    else
      cnt[cur ^ 1] = 0;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t c = 0; c < ch.count(); ++c) {
      __m512i words[16];
      if (ch.one_run >= 0) {  // contiguous words: the hardware prefetcher follows them
        load_words16(rows[cur][0], cnt[cur], ch.one_run + 16 * c, ch.len(c, 16), words);
      } else {
        prefetch_chunk(rows[cur ^ 1][0], cnt[cur ^ 1], ch, c);
        load_chunk16(rows[cur][0], cnt[cur], ch, c, words);
      }
      const float* tb = tables + c * 16 * 128;
      const uint32_t tails = tail_np < 8 ? ch.tails[c] : 0;
      for (int j = 0; j < ch.len(c, 16); ++j) {
        if (tails >> j & 1)
          lookup_tail512(acc, words[j], tb + j * 128, tail_np);
        else
          lookup_word512(acc, words[j], tb + j * 128);
      }
    }
    float* pp = part + g * 16;
    const __m512 s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_storeu_ps(pp, _mm512_add_ps(_mm512_loadu_ps(pp), s));
  }
}

template <class Src>
LUT_AVX512 void lut512(const int32_t* bank, int64_t R, int64_t W, const Src* srcs, int64_t nq, const int64_t* active,
                       int64_t k, float* out, int64_t fwa, int64_t fwb) {
  const int64_t stride = R * W, groups = (k + 15) / 16;
  const int64_t bw = std::max<int64_t>(16, (kLutBlockFloats / 128 / std::max<int64_t>(nq, 1)) / 16 * 16);
  std::vector<float> part(static_cast<size_t>(nq) * groups * 16, 0.0f);
  std::vector<float> tbuf(static_cast<size_t>(nq) * bw * 128 + 16);
  float* tables = align64(tbuf);
  const int tail_np = nq > 0 ? tail_lookups(srcs[0].n, W, 4, 8) : 8;
  if (nq == 1) {  // one query: the words of inactive rows are not even read
    std::vector<Run> runs;
    Chunks ch;
    for (int64_t fw = fwa; gather_runs(srcs[0], W, &fw, fwb, bw, 128, tables, runs, build512<Src>);) {
      chunk_runs(runs, 16, W, ch);
      single512(bank, stride, active, k, tables, ch, tail_np, part.data());
    }
  } else {  // batched queries: up to 4 groups share each table load; each query looks up its active words
    std::vector<uint32_t> wmask(static_cast<size_t>(nq) * (bw / 16));
    for (int64_t fw0 = fwa; fw0 < fwb; fw0 += bw) {
      const int64_t fw1 = std::min(fwb, fw0 + bw);
      for (int64_t j = 0; j < nq; ++j) build512(srcs[j], W, fw0, fw1, tables + j * bw * 128);
      for (int64_t fw = fw0; fw < fw1; fw += 16)
        for (int64_t j = 0; j < nq; ++j)
          wmask[(fw - fw0) / 16 * nq + j] = active_words(srcs[j], W, fw, std::min<int64_t>(16, fw1 - fw));
      for (int64_t g = 0; g < groups; g += kQueryGroups) {
        const int ng = static_cast<int>(std::min<int64_t>(kQueryGroups, groups - g));
        const int32_t* rows[kQueryGroups][16];
        int64_t cnt[kQueryGroups];
        group_rows<16>(bank, active, stride, k, g, ng, rows, cnt);
        for (int64_t fw = fw0; fw < fw1; fw += 16) {
          const uint32_t* wm = wmask.data() + (fw - fw0) / 16 * nq;
          if (std::all_of(wm, wm + nq, [](uint32_t m) { return m == 0; })) continue;
          const int64_t len = std::min<int64_t>(16, fw1 - fw);
          __m512i words[kQueryGroups][16];
          for (int gi = 0; gi < ng; ++gi) load_words16(rows[gi], cnt[gi], fw, len, words[gi]);
          const uint32_t tails = tail_np < 8 ? tail_words(W, fw, len) : 0;
          lookup_queries512(words, ng, len, tables + (fw - fw0) * 128, bw * 128, nq, wm, tails, tail_np, part.data() + g * 16,
                            groups * 16);
        }
      }
    }
  }
  for (int64_t jq = 0; jq < nq; ++jq)
    for (int64_t t = 0; t < k; ++t) out[jq * k + t] = part[(jq * groups) * 16 + t];
}

// Per-row sums (mask_dot_rows): out[r * k + t] = ⟨M_t[r], w[r] ⊙ x⟩ for rows [r0, r1). The same
// tables, word loads and lookups as lut512 over the same 16-word chunks; the four accumulators are
// flushed to a row's output where its words end (row-aligned chunks wasted most of a 16-word load
// and transpose on a 25-word row: 1.2x slower).
LUT_AVX512 inline void flush_row512(__m512* acc, float* dst, __mmask16 lanes) {
  _mm512_mask_storeu_ps(dst, lanes, _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
  for (int i = 0; i < 4; ++i) acc[i] = _mm512_setzero_ps();
}

LUT_AVX512 void rows512(const int32_t* bank, int64_t R, int64_t W, const RowSrc& src, int64_t k, float* out, int64_t r0,
                        int64_t r1) {
  const int64_t stride = R * W, groups = (k + 15) / 16;
  const int64_t rows_per_block = std::max<int64_t>(1, kLutBlockFloats / 128 / W);
  const int tail_np = tail_lookups(src.n, W, 4, 8);
  thread_local std::vector<float> tbuf;
  if (tbuf.size() < static_cast<size_t>(rows_per_block * W * 128 + 16)) tbuf.resize(rows_per_block * W * 128 + 16);
  float* tables = align64(tbuf);
  for (int64_t rb = r0; rb < r1; rb += rows_per_block) {
    const int64_t re = std::min(r1, rb + rows_per_block), fwa = rb * W, fwb = re * W;
    build512(src, W, fwa, fwb, tables);
    for (int64_t g = 0; g < groups; ++g) {
      const int32_t* rows[1][16];
      int64_t cnt;
      group_rows<16>(bank, nullptr, stride, k, g, 1, rows, &cnt);
      const __mmask16 lanes = static_cast<__mmask16>(cnt >= 16 ? 0xFFFFu : (1u << cnt) - 1u);
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      int64_t row = rb, row_end = fwa + W;
      for (int64_t fw = fwa; fw < fwb; fw += 16) {
        const int64_t len = std::min<int64_t>(16, fwb - fw);
        __m512i words[16];
        load_words16(rows[0], cnt, fw, len, words);
        for (int64_t j = 0; j < len; ++j) {
          if (fw + j == row_end) {
            flush_row512(acc, out + row * k + 16 * g, lanes);
            ++row;
            row_end += W;
          }
          if (tail_np < 8 && fw + j == row_end - 1)
            lookup_tail512(acc, words[j], tables + (fw + j - fwa) * 128, tail_np);
          else
            lookup_word512(acc, words[j], tables + (fw + j - fwa) * 128);
        }
      }
      flush_row512(acc, out + row * k + 16 * g, lanes);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// AVX2
constexpr int kTab2 = kGroups3 * 8;  // floats of tables per word

template <class Src>
LUT_AVX2 void build256(const Src& src, int64_t W, int64_t fw0, int64_t fw1, float* tables) {
  alignas(64) float vals[36];
  for (int64_t r = fw0 / W; r * W < fw1; ++r) {
    if (!src.active(r)) continue;  // never looked up
    for (int64_t fw = std::max(fw0, r * W); fw < std::min(fw1, (r + 1) * W); ++fw) {
      src.load(r, fw - r * W, vals);
      vals[32] = vals[33] = 0.0f;
      subset_sums3(vals, tables + (fw - fw0) * kTab2);
    }
  }
}

// Batched queries on AVX2, as lookup_queries512: each table row (8 floats) is loaded once for ng <= 4
// groups of 8 tasks, and the 11 3-bit indices of every word are shifted out once for all queries.
LUT_AVX2 void lookup_queries256(const __m256i (*words)[8], int ng, int64_t len, const float* tables,
                                int64_t q_stride, int64_t nq, const uint32_t* wmask, uint32_t tails, int tail_nc,
                                float* part, int64_t part_stride) {
  alignas(32) __m256i idx[8][kQueryGroups][kGroups3];  // 11 KiB
  for (int64_t j = 0; j < len; ++j)
    for (int gi = 0; gi < ng; ++gi) {
      idx[j][gi][0] = words[gi][j];
      for (int c = 1; c < kGroups3; ++c) idx[j][gi][c] = _mm256_srli_epi32(words[gi][j], 3 * c);
    }
  for (int64_t jq = 0; jq < nq; ++jq) {
    if (!wmask[jq]) continue;
    const float* tb = tables + jq * q_stride;
    __m256 acc[kQueryGroups][2];
    for (int gi = 0; gi < kQueryGroups; ++gi) acc[gi][0] = acc[gi][1] = _mm256_setzero_ps();
    for (uint32_t m = wmask[jq]; m; m &= m - 1) {
      const int j = __builtin_ctz(m);
      const float* t = tb + j * kTab2;
      if (tails >> j & 1) {  // a row's last word: only its valid groups
        for (int c = 0; c < tail_nc; ++c) {
          const __m256 tab = _mm256_load_ps(t + 8 * c);
#pragma GCC unroll 4
          for (int gi = 0; gi < kQueryGroups; ++gi)
            if (gi < ng) acc[gi][0] = _mm256_add_ps(acc[gi][0], _mm256_permutevar8x32_ps(tab, _mm256_load_si256(&idx[j][gi][c])));
        }
        continue;
      }
#pragma GCC unroll 11
      for (int c = 0; c < kGroups3; ++c) {
        const __m256 tab = _mm256_load_ps(t + 8 * c);
#pragma GCC unroll 4
        for (int gi = 0; gi < kQueryGroups; ++gi)
          if (gi < ng)
            acc[gi][c & 1] = _mm256_add_ps(acc[gi][c & 1], _mm256_permutevar8x32_ps(tab, _mm256_load_si256(&idx[j][gi][c])));
      }
    }
    for (int gi = 0; gi < ng; ++gi) {
      float* pp = part + jq * part_stride + 8 * gi;
      _mm256_storeu_ps(pp, _mm256_add_ps(_mm256_loadu_ps(pp), _mm256_add_ps(acc[gi][0], acc[gi][1])));
    }
  }
}

// One word of 8 tasks against its 11 tables of 3-bit groups t, into four accumulators. The indices
// are shifts: the multiply-high of superpose_lut.cpp (index3_bits_at), faster in an isolated loop, made this kernel
// 4-5 % slower on Zen 4 (sixteen ymm registers hold its constants and the tables poorly).
LUT_AVX2 inline void lookup_word256(__m256* acc, __m256i wj, const float* t) {
#pragma GCC unroll 11
  for (int p = 0; p < kGroups3; ++p)
    acc[p & 3] = _mm256_add_ps(acc[p & 3], _mm256_permutevar8x32_ps(_mm256_load_ps(t + 8 * p), _mm256_srli_epi32(wj, 3 * p)));
}

// A row's last word: its first nc groups only (the rest are padding).
LUT_AVX2 inline void lookup_tail256(__m256* acc, __m256i wj, const float* t, int nc) {
  for (int p = 0; p < nc; ++p, wj = _mm256_srli_epi32(wj, 3))
    acc[0] = _mm256_add_ps(acc[0], _mm256_permutevar8x32_ps(_mm256_load_ps(t + 8 * p), wj));
}

// 8 tasks' words [fw, fw + len) (len <= 8) as 8 vectors, vector j holding word j of every task (zero
// past len and for absent tasks).
LUT_AVX2 inline void load_words8(const int32_t* const* rows, int64_t cnt, int64_t fw, int64_t len, __m256i* words) {
  alignas(32) int32_t tmp[8];
  for (int i = 0; i < 8; ++i) {
    if (i >= cnt) {
      words[i] = _mm256_setzero_si256();
    } else if (len == 8) {
      words[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[i] + fw));
    } else {
      std::memset(tmp, 0, sizeof(tmp));
      std::memcpy(tmp, rows[i] + fw, sizeof(int32_t) * len);
      words[i] = _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp));
    }
  }
  transpose8x8(words);
}

// 8 tasks' words of chunk c (see Chunks) as 8 vectors, vector j holding lane j of every task.
LUT_AVX2 inline void load_chunk8(const int32_t* const* rows, int64_t cnt, const Chunks& ch, int64_t c, __m256i* words) {
  alignas(32) int32_t tmp[8][8] = {};
  for (int64_t p = ch.first[c]; p < ch.first[c + 1]; ++p) {
    const Piece& pc = ch.pieces[p];
    for (int i = 0; i < cnt; ++i) std::memcpy(tmp[i] + pc.l0, rows[i] + pc.off + pc.l0, sizeof(int32_t) * (pc.l1 - pc.l0));
  }
  for (int i = 0; i < 8; ++i) words[i] = _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp[i]));
  transpose8x8(words);
}

// One query over a block's chunks (tables: the block's, back to back), all groups of 8 tasks.
LUT_AVX2 void single256(const int32_t* bank, int64_t stride, const int64_t* active, int64_t k, const float* tables,
                        const Chunks& ch, int tail_nc, float* part) {
  const int64_t groups = (k + 7) / 8;
  const int32_t* rows[2][1][8];
  int64_t cnt[2];
  group_rows<8>(bank, active, stride, k, 0, 1, rows[0], &cnt[0]);
  for (int64_t g = 0; g < groups; ++g) {
    const int cur = g & 1;
    if (g + 1 < groups)
      group_rows<8>(bank, active, stride, k, g + 1, 1, rows[cur ^ 1], &cnt[cur ^ 1]);
    else
      cnt[cur ^ 1] = 0;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t c = 0; c < ch.count(); ++c) {
      __m256i words[8];
      if (ch.one_run >= 0) {  // contiguous words: the hardware prefetcher follows them
        load_words8(rows[cur][0], cnt[cur], ch.one_run + 8 * c, ch.len(c, 8), words);
      } else {
        prefetch_chunk(rows[cur ^ 1][0], cnt[cur ^ 1], ch, c);
        load_chunk8(rows[cur][0], cnt[cur], ch, c, words);
      }
      const float* tb = tables + c * 8 * kTab2;
      const uint32_t tails = tail_nc < kGroups3 ? ch.tails[c] : 0;
      for (int j = 0; j < ch.len(c, 8); ++j) {
        if (tails >> j & 1)
          lookup_tail256(acc, words[j], tb + j * kTab2, tail_nc);
        else
          lookup_word256(acc, words[j], tb + j * kTab2);
      }
    }
    float* pp = part + g * 8;
    const __m256 s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    _mm256_storeu_ps(pp, _mm256_add_ps(_mm256_loadu_ps(pp), s));
  }
}

template <class Src>
LUT_AVX2 void lut256(const int32_t* bank, int64_t R, int64_t W, const Src* srcs, int64_t nq, const int64_t* active,
                     int64_t k, float* out, int64_t fwa, int64_t fwb) {
  const int64_t stride = R * W, groups = (k + 7) / 8;
  const int64_t bw = std::max<int64_t>(8, (kLutBlockFloats / kTab2 / std::max<int64_t>(nq, 1)) / 8 * 8);
  std::vector<float> part(static_cast<size_t>(nq) * groups * 8, 0.0f);
  std::vector<float> tbuf(static_cast<size_t>(nq) * bw * kTab2 + 16);
  float* tables = align64(tbuf);
  const int tail_nc = nq > 0 ? tail_lookups(srcs[0].n, W, 3, kGroups3) : kGroups3;
  if (nq == 1) {  // one query: the words of inactive rows are not even read
    std::vector<Run> runs;
    Chunks ch;
    for (int64_t fw = fwa; gather_runs(srcs[0], W, &fw, fwb, bw, kTab2, tables, runs, build256<Src>);) {
      chunk_runs(runs, 8, W, ch);
      single256(bank, stride, active, k, tables, ch, tail_nc, part.data());
    }
  } else {  // batched queries: up to 4 groups share each table load; each query looks up its active words
    std::vector<uint32_t> wmask(static_cast<size_t>(nq) * (bw / 8));
    for (int64_t fw0 = fwa; fw0 < fwb; fw0 += bw) {
      const int64_t fw1 = std::min(fwb, fw0 + bw);
      for (int64_t j = 0; j < nq; ++j) build256(srcs[j], W, fw0, fw1, tables + j * bw * kTab2);
      for (int64_t fw = fw0; fw < fw1; fw += 8)
        for (int64_t j = 0; j < nq; ++j)
          wmask[(fw - fw0) / 8 * nq + j] = active_words(srcs[j], W, fw, std::min<int64_t>(8, fw1 - fw));
      for (int64_t g = 0; g < groups; g += kQueryGroups) {
        const int ng = static_cast<int>(std::min<int64_t>(kQueryGroups, groups - g));
        const int32_t* rows[kQueryGroups][8];
        int64_t cnt[kQueryGroups];
        group_rows<8>(bank, active, stride, k, g, ng, rows, cnt);
        for (int64_t fw = fw0; fw < fw1; fw += 8) {
          const uint32_t* wm = wmask.data() + (fw - fw0) / 8 * nq;
          if (std::all_of(wm, wm + nq, [](uint32_t m) { return m == 0; })) continue;
          const int64_t len = std::min<int64_t>(8, fw1 - fw);
          __m256i words[kQueryGroups][8];
          for (int gi = 0; gi < ng; ++gi) load_words8(rows[gi], cnt[gi], fw, len, words[gi]);
          const uint32_t tails = tail_nc < kGroups3 ? tail_words(W, fw, len) : 0;
          lookup_queries256(words, ng, len, tables + (fw - fw0) * kTab2, bw * kTab2, nq, wm, tails, tail_nc, part.data() + g * 8,
                            groups * 8);
        }
      }
    }
  }
  for (int64_t jq = 0; jq < nq; ++jq)
    for (int64_t t = 0; t < k; ++t) out[jq * k + t] = part[(jq * groups) * 8 + t];
}

LUT_AVX2 inline void flush_row256(__m256* acc, float* dst, int64_t cnt) {
  alignas(32) float sums[8];
  _mm256_store_ps(sums, _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  std::copy(sums, sums + cnt, dst);
  for (int i = 0; i < 4; ++i) acc[i] = _mm256_setzero_ps();
}

// mask_dot_rows on AVX2: as rows512, 8 tasks per vector.
LUT_AVX2 void rows256(const int32_t* bank, int64_t R, int64_t W, const RowSrc& src, int64_t k, float* out, int64_t r0,
                      int64_t r1) {
  const int64_t stride = R * W, groups = (k + 7) / 8;
  const int64_t rows_per_block = std::max<int64_t>(1, kLutBlockFloats / kTab2 / W);
  const int tail_nc = tail_lookups(src.n, W, 3, kGroups3);
  thread_local std::vector<float> tbuf;
  if (tbuf.size() < static_cast<size_t>(rows_per_block * W * kTab2 + 16)) tbuf.resize(rows_per_block * W * kTab2 + 16);
  float* tables = align64(tbuf);
  for (int64_t rb = r0; rb < r1; rb += rows_per_block) {
    const int64_t re = std::min(r1, rb + rows_per_block), fwa = rb * W, fwb = re * W;
    build256(src, W, fwa, fwb, tables);
    for (int64_t g = 0; g < groups; ++g) {
      const int32_t* rows[1][8];
      int64_t cnt;
      group_rows<8>(bank, nullptr, stride, k, g, 1, rows, &cnt);
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      int64_t row = rb, row_end = fwa + W;
      for (int64_t fw = fwa; fw < fwb; fw += 8) {
        const int64_t len = std::min<int64_t>(8, fwb - fw);
        __m256i words[8];
        load_words8(rows[0], cnt, fw, len, words);
        for (int64_t j = 0; j < len; ++j) {
          if (fw + j == row_end) {
            flush_row256(acc, out + row * k + 8 * g, cnt);
            ++row;
            row_end += W;
          }
          if (tail_nc < kGroups3 && fw + j == row_end - 1)
            lookup_tail256(acc, words[j], tables + (fw + j - fwa) * kTab2, tail_nc);
          else
            lookup_word256(acc, words[j], tables + (fw + j - fwa) * kTab2);
        }
      }
      flush_row256(acc, out + row * k + 8 * g, cnt);
    }
  }
}
#endif  // SUPSUP_X86

// ------------------------------------------------------------------------------------------------
// scalar: per block of up to kBlockWords words and per query, the words' subset-sum tables
// (portable.h), then one to eight lookups per word of each task (portable C++: the path of ARM CPUs).
template <class Src>
void lut_scalar(const int32_t* bank, int64_t R, int64_t W, const Src* srcs, int64_t nq, const int64_t* active,
                int64_t k, float* out, int64_t fw0, int64_t fw1) {
  const int64_t stride = R * W;
  float vals[kBlockWords][32];
  const float* live[kBlockWords];
  int64_t offset[kBlockWords];
  std::vector<double> acc(static_cast<size_t>(nq * k), 0.0);
  for (int64_t fb = fw0; fb < fw1; fb += kBlockWords) {
    const int64_t len = std::min<int64_t>(kBlockWords, fw1 - fb);
    for (int64_t j = 0; j < nq; ++j) {
      int nb = 0;
      for (int64_t b = 0; b < len; ++b) {
        const int64_t r = (fb + b) / W, q = (fb + b) % W;
        if (!srcs[j].active(r)) continue;
        srcs[j].load(r, q, vals[nb]);
        live[nb] = vals[nb];
        offset[nb++] = fb + b;
      }
      if (nb == 0) continue;
      add_set_bit_sums(live, nb, k, [&](int64_t t, int b) {
        return static_cast<uint32_t>(bank[(active ? active[t] : t) * stride + offset[b]]);
      }, acc.data() + j * k);
    }
  }
  for (int64_t i = 0; i < nq * k; ++i) out[i] = static_cast<float>(acc[i]);
}

template <class Src>
void dispatch(Isa isa, const int32_t* bank, int64_t R, int64_t W, int64_t n, const Src* srcs, int64_t nq,
              const int64_t* active, int64_t k, float* out, int64_t fw0, int64_t fw1) {
#if SUPSUP_X86
  if (isa == Isa::Avx512) return lut512(bank, R, W, srcs, nq, active, k, out, fw0, fw1);
  if (isa == Isa::Avx2) return lut256(bank, R, W, srcs, nq, active, k, out, fw0, fw1);
#endif
  lut_scalar(bank, R, W, srcs, nq, active, k, out, fw0, fw1);
}

void rows_scalar(const int32_t* bank, int64_t R, int64_t W, const RowSrc& src, int64_t k, float* out, int64_t r0,
                 int64_t r1) {
  float vals[kBlockWords][32];
  const float* live[kBlockWords];
  std::vector<double> acc(static_cast<size_t>(k));
  for (int64_t r = r0; r < r1; ++r) {
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t q0 = 0; q0 < W; q0 += kBlockWords) {
      const int nb = static_cast<int>(std::min<int64_t>(kBlockWords, W - q0));
      for (int b = 0; b < nb; ++b) {
        src.load(r, q0 + b, vals[b]);
        live[b] = vals[b];
      }
      const int32_t* words = bank + r * W + q0;
      add_set_bit_sums(live, nb, k, [&](int64_t t, int b) { return static_cast<uint32_t>(words[t * R * W + b]); },
                       acc.data());
    }
    for (int64_t t = 0; t < k; ++t) out[r * k + t] = static_cast<float>(acc[t]);
  }
}

}  // namespace

void mask_dot_rows(Isa isa, const int32_t* bank, int64_t R, int64_t W, int64_t n, const float* x, const float* w,
                   int64_t k, float* out, int64_t r0, int64_t r1) {
  const RowSrc src{x, w, n};
#if SUPSUP_X86
  if (isa == Isa::Avx512) return rows512(bank, R, W, src, k, out, r0, r1);
  if (isa == Isa::Avx2) return rows256(bank, R, W, src, k, out, r0, r1);
#endif
  rows_scalar(bank, R, W, src, k, out, r0, r1);
}

void mask_dot_lut(Isa isa, const int32_t* bank, int64_t R, int64_t W, int64_t n, const float* v, int64_t q,
                  int64_t q_stride, const int64_t* active, int64_t k, float* out, int64_t fw0, int64_t fw1) {
  std::vector<DenseSrc> srcs;
  srcs.reserve(static_cast<size_t>(q));
  for (int64_t j = 0; j < q; ++j) srcs.push_back(DenseSrc{v + j * q_stride, n});
  dispatch(isa, bank, R, W, n, srcs.data(), q, active, k, out, fw0, fw1);
}

void mask_dot_lut_rank1(Isa isa, const int32_t* bank, int64_t R, int64_t W, int64_t n, const float* g,
                        const float* x, const float* w, int64_t q, int64_t k, float* out, int64_t fw0, int64_t fw1,
                        bool skip_zero_rows) {
  std::vector<Rank1Src> srcs;
  srcs.reserve(static_cast<size_t>(q));
  for (int64_t j = 0; j < q; ++j) srcs.push_back(Rank1Src{g + j * R, x + j * n, w, n, skip_zero_rows});
  dispatch(isa, bank, R, W, n, srcs.data(), q, nullptr, k, out, fw0, fw1);
}

}  // namespace supsup_cpu
