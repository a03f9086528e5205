// superpose (sum_i alpha_i M_i) as table lookups. The masked-add kernels of bank.cpp spend a few
// instructions per 16 (8) mask bits of one task: on AVX-512 a kmov to an opmask register (one port,
// about 14 bits per cycle). Here the bits of 8 tasks at one weight are gathered into one byte instead,
// and a few bits of that byte index a table of the subset sums of those tasks' alphas, so one
// vpermps adds the alphas of several tasks at 16 (8) weights. Exact in fp32 up to summation order.
//
// AVX-512 with GFNI and VBMI (Ice Lake and later, Zen 4): byte permutes (vpermt2b) put 8 tasks' bytes
// of 8 consecutive weights side by side in a qword, one GFNI affine transform transposes that 8x8 bit
// block, and each nibble (4 tasks) indexes a 16-entry table. AVX2: unpacks do the byte transpose,
// three delta swaps per qword the bit transpose, and 3-bit groups (3 + 3 + 2 tasks) index 8-entry
// tables (vpermps ymm).
//
// Layout of the work. A thread owns rows [r0, r1); each task's words for those rows are one
// contiguous stream. The stream is cut in blocks of kBlockWords; for each block every task runs over it
// 16 at a time (16 sequential streams), adding into a float scratch of the block (L2-resident). The
// shifts that pick one byte of each dword leave the weights of a 64-weight group in a 4x16 transposed
// order in the scratch; that is undone once per block, when the scratch is copied into the rows.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "kernels.h"
#include "lut.h"
#include "simd.h"

namespace supsup_cpu {

namespace {
#if SUPSUP_X86

#define AVX512_GFNI_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,gfni,fma")))

#define AVX2_LUT_TARGET __attribute__((target("avx2,fma")))

constexpr int64_t kBlockWords = 4096;  // 16 KiB of each task's stream, 512 KiB of float scratch (L2)
constexpr int64_t kTasksPerPass = 16;  // more streams at once are slower (32: 1.1-1.4x, 64: 1.9x at k = 2,500)
constexpr int64_t kChunkWords = 16;  // AVX-512: one 64-byte load per task, 512 weights (AVX2: half)

// The byte-transpose indices: three rounds of vpermt2b that turn 8 tasks' 64 bytes into 8 vectors
// whose qword m holds byte (8j + m) of task 0..7 (vector j). Round 1 interleaves task pairs byte by
// byte, round 2 pairs of pairs, round 3 quads; each round's vector h takes the lower or upper half.
struct TransposeIndices {
  __m512i round[3][2];
};

AVX512_GFNI_TARGET TransposeIndices make_transpose_indices() {
  TransposeIndices t;
  alignas(64) uint8_t idx[64];
  for (int h = 0; h < 2; ++h) {
    for (int m = 0; m < 32; ++m)
      for (int e = 0; e < 2; ++e) idx[2 * m + e] = static_cast<uint8_t>(64 * e + 32 * h + m);
    t.round[0][h] = _mm512_load_si512(idx);
    for (int m = 0; m < 16; ++m)
      for (int f = 0; f < 4; ++f) idx[4 * m + f] = static_cast<uint8_t>(64 * (f >> 1) + 2 * (16 * h + m) + (f & 1));
    t.round[1][h] = _mm512_load_si512(idx);
    for (int m = 0; m < 8; ++m)
      for (int f = 0; f < 8; ++f) idx[8 * m + f] = static_cast<uint8_t>(64 * (f >> 2) + 4 * (8 * h + m) + (f & 3));
    t.round[2][h] = _mm512_load_si512(idx);
  }
  return t;
}

// in[0..7]: 64 bytes of tasks 0..7 (bit b of byte p = weight 8p + b). out[j]: byte (b) of the 64 = weight
// 64j + b, whose bit i is task (7 - i)'s bit (GFNI's row order: result bit i reads matrix byte 7 - i).
AVX512_GFNI_TARGET inline void transpose_8_tasks(const __m512i* in, const TransposeIndices& ix, __m512i* out) {
  __m512i pair[8], quad[8];
  for (int a = 0; a < 4; ++a)
    for (int h = 0; h < 2; ++h) pair[2 * a + h] = _mm512_permutex2var_epi8(in[2 * a], ix.round[0][h], in[2 * a + 1]);
  // pair[2a + h]: tasks 2a, 2a+1, bytes 32h..32h+31
  for (int c = 0; c < 2; ++c)
    for (int h = 0; h < 2; ++h)
      for (int h2 = 0; h2 < 2; ++h2)
        quad[4 * c + 2 * h + h2] = _mm512_permutex2var_epi8(pair[4 * c + h], ix.round[1][h2], pair[4 * c + 2 + h]);
  // quad[4c + 2h + h2]: tasks 4c..4c+3, bytes 32h + 16h2 .. +15
  const __m512i bit_columns = _mm512_set1_epi64(0x8040201008040201LL);
  for (int h = 0; h < 2; ++h)
    for (int h2 = 0; h2 < 2; ++h2)
      for (int h3 = 0; h3 < 2; ++h3) {
        const __m512i bytes = _mm512_permutex2var_epi8(quad[2 * h + h2], ix.round[2][h3], quad[4 + 2 * h + h2]);
        out[4 * h + 2 * h2 + h3] = _mm512_gf2p8affine_epi64_epi8(bit_columns, bytes, 0);
      }
}

// The 16-entry tables of one pass: table[2g] for the low nibble of group g's bytes (tasks 8g+7 ..
// 8g+4 at bits 0..3), table[2g + 1] for the high nibble (tasks 8g+3 .. 8g). Absent tasks have alpha 0.
void make_tables512(const float* alpha, int64_t kb, float* table) {
  for (int g = 0; g < 2; ++g)
    for (int half = 0; half < 2; ++half) {
      float a[4];
      for (int i = 0; i < 4; ++i) {
        const int64_t t = 8 * g + (half == 0 ? 7 - i : 3 - i);
        a[i] = t < kb ? alpha[t] : 0.0f;
      }
      for (int idx = 0; idx < 16; ++idx) {
        float s = 0.0f;
        for (int i = 0; i < 4; ++i)
          if (idx >> i & 1) s += a[i];
        table[16 * (2 * g + half) + idx] = s;
      }
    }
}

// One pass of 16 tasks over a block's words [0, words), adding into scratch (writing, if init): for each
// 512-weight chunk, both groups of 8 tasks are transposed and their lookups summed before the scratch
// is touched. A partial chunk adds zeros past its words: the scratch has room.
AVX512_GFNI_TARGET void pass512(const int32_t* const* task, int64_t words, const float* tables, float* scratch,
                                bool init) {
  static const TransposeIndices ix = make_transpose_indices();
  const __m512 table0 = _mm512_load_ps(tables), table1 = _mm512_load_ps(tables + 16),
               table2 = _mm512_load_ps(tables + 32), table3 = _mm512_load_ps(tables + 48);
  for (int64_t w = 0; w < words; w += kChunkWords) {
    const int64_t nw = std::min<int64_t>(kChunkWords, words - w);
    const __mmask16 load = static_cast<__mmask16>((1u << nw) - 1u);
    float* s = scratch + 32 * w;
    __m512i in[16], grp[2][8];
    for (int t = 0; t < 16; ++t) in[t] = _mm512_maskz_loadu_epi32(load, task[t] + w);
    transpose_8_tasks(in, ix, grp[0]);
    transpose_8_tasks(in + 8, ix, grp[1]);
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
#pragma GCC unroll 4
      for (int sh = 0; sh < 4; ++sh) {
        // dword lane i of grp holds weights 64j + 4i .. 4i+3: weight 4i + sh's byte, a nibble at a time
        const __m512i a_lo = index_bits_at(grp[0][j], 8 * sh), a_hi = index_bits_at(grp[0][j], 8 * sh + 4);
        const __m512i b_lo = index_bits_at(grp[1][j], 8 * sh), b_hi = index_bits_at(grp[1][j], 8 * sh + 4);
        const __m512 x = _mm512_add_ps(_mm512_permutexvar_ps(a_lo, table0), _mm512_permutexvar_ps(a_hi, table1));
        const __m512 y = _mm512_add_ps(_mm512_permutexvar_ps(b_lo, table2), _mm512_permutexvar_ps(b_hi, table3));
        float* p = s + 64 * j + 16 * sh;
        const __m512 sum = _mm512_add_ps(x, y);
        _mm512_store_ps(p, init ? sum : _mm512_add_ps(_mm512_load_ps(p), sum));
      }
    }
  }
}

// scratch -> weight order, for chunks [0, chunks): in each 64-weight group, slot 16 sh + i is weight 4i + sh.
AVX512_GFNI_TARGET void unpermute512(float* scratch, int64_t chunks) {
  const int64_t groups = chunks * 8;
  // Output vector m, lane u is weight 16m + u = 4i + sh: row sh, lane i = 4m + u / 4. Rows 0 and 1 give
  // the lanes with sh < 2 (one two-source permute), rows 2 and 3 the others, with the same indices.
  alignas(64) int32_t from_pair[4][16];
  for (int m = 0; m < 4; ++m)
    for (int u = 0; u < 16; ++u) from_pair[m][u] = (u % 4 & 1) * 16 + 4 * m + u / 4;
  __m512i idx[4];
  for (int m = 0; m < 4; ++m) idx[m] = _mm512_load_si512(from_pair[m]);
  const __mmask16 upper = 0xCCCC;  // lanes whose sh is 2 or 3
  for (int64_t g = 0; g < groups; ++g) {
    float* p = scratch + 64 * g;
    const __m512 r0 = _mm512_load_ps(p), r1 = _mm512_load_ps(p + 16), r2 = _mm512_load_ps(p + 32),
                 r3 = _mm512_load_ps(p + 48);
    __m512 o[4];
    for (int m = 0; m < 4; ++m)
      o[m] = _mm512_mask_blend_ps(upper, _mm512_permutex2var_ps(r0, idx[m], r1), _mm512_permutex2var_ps(r2, idx[m], r3));
    for (int m = 0; m < 4; ++m) _mm512_store_ps(p + 16 * m, o[m]);
  }
}

// Stream weights [p0, p1) of the thread's rows (row length 32W in the stream) into out's rows (length n).
void copy_to_rows(const float* scratch, int64_t p0, int64_t p1, int64_t W, int64_t n, int64_t r0, float* out) {
  const int64_t row_len = 32 * W;
  for (int64_t p = p0; p < p1;) {
    const int64_t r = p / row_len, c = p % row_len;
    const int64_t end = std::min(p1 - p, row_len - c);  // this row's part of the block
    if (c < n) std::memcpy(out + (r0 + r) * n + c, scratch + (p - p0), sizeof(float) * std::min(end, n - c));
    p += end;
  }
}

alignas(64) const int32_t kZeroWords[kBlockWords + kChunkWords] = {};

// ------------------------------------------------------------------------------------------------
// AVX2. A chunk is 8 words (256 weights) of each task.
constexpr int64_t kChunkWords2 = 8;

// Tables of 16 tasks: for group g (tasks 8g..8g+7), table 3g + c holds the subset sums of tasks
// 8g + 3c .. 8g + 3c + 2 indexed by their bits; the last (2 tasks) repeats its 4 entries, so a third
// index bit (the next weight's bit, shifted in) is ignored.
void make_tables256(const float* alpha, int64_t kb, float* table) {
  for (int g = 0; g < 2; ++g)
    for (int c = 0; c < 3; ++c)
      for (int idx = 0; idx < 8; ++idx) {
        float s = 0.0f;
        for (int i = 0; i < 3; ++i) {
          const int64_t t = 8 * g + 3 * c + i;
          if ((c < 2 || i < 2) && (idx >> i & 1) && t < kb) s += alpha[t];
        }
        table[8 * (3 * g + c) + idx] = s;
      }
}

// Slot -> weight within a 256-weight chunk (see pass256): slot 32 v + 8 sh + d.
struct ChunkOrder256 {
  int16_t weight[256];
};

const ChunkOrder256& chunk_order256() {
  static const ChunkOrder256 order = [] {
    ChunkOrder256 o{};
    for (int v = 0; v < 8; ++v)
      for (int sh = 0; sh < 4; ++sh)
        for (int d = 0; d < 8; ++d) {
          const int byte = 4 * d + sh, Q = byte / 8, j = byte % 8;  // qword Q of vector v, bit column j
          const int L = Q / 2, m = Q % 2, h = v >> 2 & 1, h2 = v >> 1 & 1, h3 = v & 1;
          const int p = 16 * L + 8 * h + 4 * h2 + 2 * h3 + m;  // the tasks' byte in the qword
          o.weight[32 * v + 8 * sh + d] = static_cast<int16_t>(8 * p + j);
        }
    return o;
  }();
  return order;
}

// 8 tasks' 32 bytes -> 8 vectors of 4 qwords; qword (2L + m) of vector v = 4h + 2h2 + h3 holds byte
// p = 16L + 8h + 4h2 + 2h3 + m of tasks 0..7 (in-lane unpacks: L is the 128-bit lane), and after the
// bit transpose its byte j is weight 8p + j with bit t = task t.
AVX2_LUT_TARGET inline void transpose_8_tasks256(const __m256i* in, __m256i* out) {
  __m256i a[8], b[8];
  for (int i = 0; i < 4; ++i) {
    a[2 * i] = _mm256_unpacklo_epi8(in[2 * i], in[2 * i + 1]);      // h = 0
    a[2 * i + 1] = _mm256_unpackhi_epi8(in[2 * i], in[2 * i + 1]);  // h = 1
  }
  for (int c = 0; c < 2; ++c)
    for (int h = 0; h < 2; ++h) {
      b[4 * c + 2 * h] = _mm256_unpacklo_epi16(a[4 * c + h], a[4 * c + 2 + h]);
      b[4 * c + 2 * h + 1] = _mm256_unpackhi_epi16(a[4 * c + h], a[4 * c + 2 + h]);
    }
  const __m256i m1 = _mm256_set1_epi64x(0x00AA00AA00AA00AALL), m2 = _mm256_set1_epi64x(0x0000CCCC0000CCCCLL),
                m3 = _mm256_set1_epi64x(0x00000000F0F0F0F0LL);
  for (int hh = 0; hh < 4; ++hh)  // hh = 2h + h2
    for (int h3 = 0; h3 < 2; ++h3) {
      __m256i x = h3 ? _mm256_unpackhi_epi32(b[hh], b[4 + hh]) : _mm256_unpacklo_epi32(b[hh], b[4 + hh]);
      __m256i t = _mm256_and_si256(_mm256_xor_si256(_mm256_srli_epi64(x, 7), x), m1);
      x = _mm256_xor_si256(x, _mm256_xor_si256(t, _mm256_slli_epi64(t, 7)));
      t = _mm256_and_si256(_mm256_xor_si256(_mm256_srli_epi64(x, 14), x), m2);
      x = _mm256_xor_si256(x, _mm256_xor_si256(t, _mm256_slli_epi64(t, 14)));
      t = _mm256_and_si256(_mm256_xor_si256(_mm256_srli_epi64(x, 28), x), m3);
      out[2 * hh + h3] = _mm256_xor_si256(x, _mm256_xor_si256(t, _mm256_slli_epi64(t, 28)));
    }
}

AVX2_LUT_TARGET void pass256(const int32_t* const* task, int64_t words, const float* tables, float* scratch,
                             bool init) {
  for (int64_t w = 0; w < words; w += kChunkWords2) {
    const int64_t nw = std::min<int64_t>(kChunkWords2, words - w);
    const __m256i load = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(nw)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    float* s = scratch + 32 * w;
    for (int g = 0; g < 2; ++g) {
      __m256i in[8], tr[8];
      for (int t = 0; t < 8; ++t) in[t] = _mm256_maskload_epi32(task[8 * g + t] + w, load);
      transpose_8_tasks256(in, tr);
      const float* tb = tables + 24 * g;
      const __m256 t0 = _mm256_load_ps(tb), t1 = _mm256_load_ps(tb + 8), t2 = _mm256_load_ps(tb + 16);
#pragma GCC unroll 8
      for (int v = 0; v < 8; ++v) {
        const __m256i hi = _mm256_srli_epi32(tr[v], 16);
#pragma GCC unroll 4
        for (int sh = 0; sh < 4; ++sh) {
          // tasks 0-2, 3-5 and 6-7 of weight byte 4d + sh
          const __m256 x = _mm256_add_ps(
              _mm256_add_ps(_mm256_permutevar8x32_ps(t0, index3_bits_at(tr[v], hi, 8 * sh)),
                            _mm256_permutevar8x32_ps(t1, index3_bits_at(tr[v], hi, 8 * sh + 3))),
              _mm256_permutevar8x32_ps(t2, index3_bits_at(tr[v], hi, 8 * sh + 6)));
          float* p = s + 32 * v + 8 * sh;
          _mm256_store_ps(p, init && g == 0 ? x : _mm256_add_ps(_mm256_load_ps(p), x));
        }
      }
    }
  }
}

void unpermute256(float* scratch, int64_t chunks) {
  const ChunkOrder256& order = chunk_order256();
  alignas(64) float tmp[256];
  for (int64_t c = 0; c < chunks; ++c) {
    float* p = scratch + 256 * c;
    for (int i = 0; i < 256; ++i) tmp[order.weight[i]] = p[i];
    std::memcpy(p, tmp, sizeof(tmp));
  }
}

// ------------------------------------------------------------------------------------------------
// The walk shared by both: blocks of each thread's stream, 16 tasks a pass, then the scratch to the rows.
struct LutKernel {
  int64_t chunk_words;   // words of each task per step
  int64_t table_floats;  // per 16 tasks
  void (*make_tables)(const float* alpha, int64_t kb, float* table);
  void (*pass)(const int32_t* const* task, int64_t words, const float* tables, float* scratch, bool init);
  void (*unpermute)(float* scratch, int64_t chunks);
};

void superpose_lut_rows(const LutKernel& kern, const int32_t* bank, int64_t k, int64_t W, int64_t n, int64_t R,
                        const float* alpha, const int64_t* active, float* out, int64_t r0, int64_t r1) {
  if (r1 <= r0) return;
  const int64_t stride = R * W, words = (r1 - r0) * W;
  // One block of scratch per thread, kept between calls (a fresh 512 KiB costs page faults every call).
  thread_local std::vector<float> scratch_buf(32 * kBlockWords + 512 + 16);
  float* scratch = align64(scratch_buf);
  const int64_t passes = (k + kTasksPerPass - 1) / kTasksPerPass;
  std::vector<float> tables_buf(kern.table_floats * passes + 16, 0.0f);
  float* tables = align64(tables_buf);
  for (int64_t p = 0; p < passes; ++p)
    kern.make_tables(alpha + 16 * p, std::min<int64_t>(16, k - 16 * p), tables + kern.table_floats * p);
  for (int64_t b0 = 0; b0 < words; b0 += kBlockWords) {
    const int64_t b1 = std::min(words, b0 + kBlockWords);
    for (int64_t p = 0; p < passes; ++p) {
      const int64_t t0 = kTasksPerPass * p, kb = std::min(kTasksPerPass, k - t0);
      const int32_t* task[kTasksPerPass];
      for (int64_t t = 0; t < kTasksPerPass; ++t)
        task[t] = t < kb ? task_base(bank, active, t0 + t, stride) + r0 * W + b0 : kZeroWords;
      kern.pass(task, b1 - b0, tables + kern.table_floats * p, scratch, p == 0);
    }
    kern.unpermute(scratch, (b1 - b0 + kern.chunk_words - 1) / kern.chunk_words);
    copy_to_rows(scratch, 32 * b0, 32 * b1, W, n, r0, out);
  }
}

constexpr LutKernel kLut512{kChunkWords, 64, make_tables512, pass512, unpermute512};
constexpr LutKernel kLut256{kChunkWords2, 48, make_tables256, pass256, unpermute256};

#endif  // SUPSUP_X86

}  // namespace

bool superpose_lut_available(Isa isa) {
  if (isa == Isa::Avx2) return true;
  if (isa != Isa::Avx512) return false;
#if SUPSUP_X86
  static const bool ok = [] {
    __builtin_cpu_init();
    const char* env = std::getenv("SUPSUP_CPU_GFNI");
    if (env && !std::strcmp(env, "0")) return false;
    return __builtin_cpu_supports("gfni") && __builtin_cpu_supports("avx512vbmi");
  }();
  return ok;
#else
  return false;
#endif
}

void superpose_lut(Isa isa, const int32_t* bank, int64_t k, int64_t W, int64_t n, int64_t R, const float* alpha,
                   const int64_t* active, float* out, int64_t r0, int64_t r1) {
  // AVX-512 without GFNI keeps the masked adds (superpose_lut_available is false there).
#if SUPSUP_X86
  superpose_lut_rows(isa == Isa::Avx512 ? kLut512 : kLut256, bank, k, W, n, R, alpha, active, out, r0, r1);
#else
  throw std::logic_error("superpose_lut needs AVX2 or AVX-512 (superpose_lut_available)");
#endif
}

}  // namespace supsup_cpu
