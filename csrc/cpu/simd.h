// What every CPU kernel shares: the pad-bit rule of the canonical layout, the task addressing of a
// bank, and the instruction-set attributes with their small helpers. Kernels for scalar, AVX2 and
// AVX-512 live side by side in each translation unit (function-level target attributes) and are
// chosen at run time (isa.cpp). AVX-512 maps mask bits straight onto opmask registers: a 32-bit
// word is two __mmask16 for two 16-lane float operations.
#pragma once
#include "kernels.h"  // SUPSUP_X86
#if SUPSUP_X86
#include <immintrin.h>
#endif

#include <cstdint>
#include <vector>

namespace supsup_cpu {

// The first 64-byte aligned element of buf (allocate 64 bytes more than needed).
template <class T>
T* align64(std::vector<T>& buf) {
  const uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<T*>((p + 63) & ~static_cast<uintptr_t>(63));
}

// Bits of word q of a row of n bits that are real (not padding). Padding is ignored even when
// a caller's words have it set, so no kernel reads past the end of a row.
inline uint32_t valid_bits(int64_t n, int64_t q) {
  const int64_t rem = n - 32 * q;
  return rem >= 32 ? 0xFFFFFFFFu : ((1u << rem) - 1u);
}

inline const int32_t* task_base(const int32_t* bank, const int64_t* active, int64_t t, int64_t stride) {
  return bank + (active ? active[t] : t) * stride;
}

#if SUPSUP_X86
// AVX2: 8 bits -> an 8-lane all-ones/zeros mask by broadcast, AND with the lane's bit, compare.
#define AVX2_TARGET __attribute__((target("avx2,fma")))

AVX2_TARGET inline __m256 bits8(uint32_t byte) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i b = _mm256_set1_epi32(static_cast<int>(byte));
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(b, sel), sel));
}

AVX2_TARGET inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// Bits [b, b + 3) of every dword lane of w moved to the lane's low bits, for vpermps ymm, which
// reads only those: a table index (hi: w shifted right by 16, formed once per w). Inside one 16-bit
// half this is a multiply-high, w16 · 2^(16 - s) >> 16 = w16 >> s, which on Zen 4 issues on other
// pipes than shifts and vpermps (a 3-bit lookup loop ran 1.15x faster). lut.cpp's mask_dot loop
// keeps shifts (see lookup_word256); lut_interleaved.cpp's reads its tables from L1 to make room for
// the constants. b must be a compile-time constant once inlined.
AVX2_TARGET inline __m256i index3_bits_at(__m256i w, __m256i hi, int b) {
  if (b == 0) return w;
  if (b == 16) return hi;
  if (b == 14 || b == 15) return _mm256_srli_epi32(w, b);  // the bits straddle the two halves
  return b < 16 ? _mm256_mulhi_epu16(w, _mm256_set1_epi16(static_cast<int16_t>(1u << (16 - b))))
                : _mm256_mulhi_epu16(hi, _mm256_set1_epi16(static_cast<int16_t>(1u << (32 - b))));
}

// r[j] <- the dwords j of r[0..7]: 8 runs of 8 mask words turned into 8 vectors, vector j holding
// word j of every run (the AVX2 table kernels: 8 tasks, or 8 rows, per vector).
AVX2_TARGET inline void transpose8x8(__m256i* r) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i + 0] = _mm256_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
    u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
    u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x20);
    r[4 + j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x31);
  }
}

// The 8-entry subset-sum tables of the 11 3-bit groups of 32 values (vals[32], vals[33] read as
// zero by the caller's padding): entry e of table p is the sum of vals[3p + b] over the bits b of e.
// Written straight to `tables` (8 floats apart, 32-byte aligned): built in a __m256 array first and
// then copied, GCC turned the copy into `rep movsq`, whose stores the lookups that follow cannot
// forward from, so every table build stalled the loop behind it.
AVX2_TARGET inline void subset_sums3(const float* vals, float* tables) {
  const __m256 m0 = _mm256_castsi256_ps(_mm256_setr_epi32(0, -1, 0, -1, 0, -1, 0, -1));
  const __m256 m1 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, -1, -1, 0, 0, -1, -1));
  const __m256 m2 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, 0, 0, -1, -1, -1, -1));
  for (int p = 0; p < 11; ++p) {
    __m256 tab = _mm256_and_ps(m0, _mm256_set1_ps(vals[3 * p]));
    tab = _mm256_add_ps(tab, _mm256_and_ps(m1, _mm256_set1_ps(vals[3 * p + 1])));
    _mm256_store_ps(tables + 8 * p, _mm256_add_ps(tab, _mm256_and_ps(m2, _mm256_set1_ps(vals[3 * p + 2]))));
  }
}

#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))

// Bits [b, b + 4) of every dword lane moved to the lane's low bits, for vpermps, which reads only
// those: a table index. A rotate, not a shift: on Zen 4 shifts share their pipes with vpermps and
// rotates do not (a nibble-lookup loop ran 1.4x faster); on Intel both take the same port. b must
// be a compile-time constant once inlined (an immediate).
AVX512_TARGET inline __m512i index_bits_at(__m512i w, int b) { return _mm512_ror_epi32(w, b); }

// r[j] <- the dwords j of r[0..15]: 16 tasks' runs of 16 mask words turned into 16 vectors, vector j
// holding word j of every task (the table kernels of lut.cpp).
AVX512_TARGET inline void transpose16x16(__m512i* r) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_i32x4(u[8 * i + j], u[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_i32x4(u[8 * i + j], u[8 * i + 4 + j], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
  }
}

// One word of 16 tasks against its 8 nibble tables t, into four accumulators.
AVX512_TARGET inline void lookup_word512(__m512* acc, __m512i wj, const float* t) {
#pragma GCC unroll 8
  for (int p = 0; p < 8; ++p)
    acc[p & 3] = _mm512_add_ps(acc[p & 3], _mm512_permutexvar_ps(index_bits_at(wj, 4 * p), _mm512_load_ps(t + 16 * p)));
}

// The weights of row `row`, columns [j, j + 16) (AVX-512; j a multiple of 16) or [j, j + 8) (AVX2; j
// a multiple of 8), with its mask applied: W ⊙ M, or for a signed-constant layer (SIGNED, w unused)
// ±scale from the sign bits. Zero where masked or past n; masked-off lanes of a masked load never
// fault, so the tail of the last row is never read. The packing step of the masked GEMMs.
template <bool SIGNED>
AVX512_TARGET inline __m512 masked_weights16(const float* w, const int32_t* sign_words, const int32_t* words, float scale,
                                             int64_t n, int64_t W, int64_t row, int64_t j) {
  const int64_t q = j / 32;
  const int shift = static_cast<int>(j % 32);
  const __mmask16 m = static_cast<__mmask16>((static_cast<uint32_t>(words[row * W + q]) & valid_bits(n, q)) >> shift);
  if constexpr (SIGNED) {
    const __mmask16 s = static_cast<__mmask16>(static_cast<uint32_t>(sign_words[row * W + q]) >> shift);
    return _mm512_maskz_mov_ps(m, _mm512_mask_blend_ps(s, _mm512_set1_ps(-scale), _mm512_set1_ps(scale)));
  } else {
    return _mm512_maskz_loadu_ps(m, w + row * n + j);
  }
}

template <bool SIGNED>
AVX2_TARGET inline __m256 masked_weights8(const float* w, const int32_t* sign_words, const int32_t* words, float scale,
                                          int64_t n, int64_t W, int64_t row, int64_t j) {
  const int64_t q = j / 32;
  const int shift = static_cast<int>(j % 32);
  const __m256 m = bits8(((static_cast<uint32_t>(words[row * W + q]) & valid_bits(n, q)) >> shift) & 0xFFu);
  if constexpr (SIGNED) {
    const __m256 s = bits8((static_cast<uint32_t>(sign_words[row * W + q]) >> shift) & 0xFFu);
    return _mm256_and_ps(m, _mm256_blendv_ps(_mm256_set1_ps(-scale), _mm256_set1_ps(scale), s));
  } else {
    return _mm256_maskload_ps(w + row * n + j, _mm256_castps_si256(m));
  }
}

// Word q of row `row` of W ⊙ M (or of the signed-constant weight) as four 8-lane vectors, for a
// word that lies wholly inside the row (32q + 32 <= n): the word is broadcast once and each 8 bits
// picked by a compare, and W is loaded plainly and ANDed with the mask (no per-8 scalar shifts: on the
// Intel Xeon VM the per-8 path ran the batch-1 GEMV at about half MKL's speed). The packing steps and
// batch 2 use it; the float batch-1 GEMV (small_gemm.cpp's gemv256) shifts the broadcast word into
// vmaskmovps masks instead, one uop fewer per 8 weights.
template <bool SIGNED>
AVX2_TARGET inline void masked_word8x4(const float* w, const int32_t* sign_words, const int32_t* words, float scale,
                                       int64_t n, int64_t W, int64_t row, int64_t q, __m256 out[4]) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i mb = _mm256_set1_epi32(words[row * W + q]);
  [[maybe_unused]] __m256i sb;
  if constexpr (SIGNED) sb = _mm256_set1_epi32(sign_words[row * W + q]);
  for (int c = 0; c < 4; ++c) {
    const __m256i sc = _mm256_slli_epi32(sel, 8 * c);
    const __m256 m = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(mb, sc), sc));
    if constexpr (SIGNED) {
      const __m256 s = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(sb, sc), sc));
      out[c] = _mm256_and_ps(m, _mm256_blendv_ps(_mm256_set1_ps(-scale), _mm256_set1_ps(scale), s));
    } else {
      out[c] = _mm256_and_ps(_mm256_loadu_ps(w + row * n + 32 * q + 8 * c), m);
    }
  }
}

// The same for any word: a row's last, partial word takes the per-8 path (masked loads stay inside the row).
template <bool SIGNED>
AVX2_TARGET inline void masked_word8x4_any(const float* w, const int32_t* sign_words, const int32_t* words, float scale,
                                           int64_t n, int64_t W, int64_t row, int64_t q, __m256 out[4]) {
  if (32 * q + 32 <= n) return masked_word8x4<SIGNED>(w, sign_words, words, scale, n, W, row, q, out);
  for (int c = 0; c < 4; ++c) out[c] = masked_weights8<SIGNED>(w, sign_words, words, scale, n, W, row, 32 * q + 8 * c);
}
#endif  // SUPSUP_X86

}  // namespace supsup_cpu
