// Portable helpers of the scalar ISA's kernels (ARM and any CPU without AVX2): plain C++, no
// intrinsics, written so that compilers vectorise them (SSE on x86, NEON on ARM) where they can.
//
// Table lookups: a word's 32 values become 32/G tables of the 2^G subset sums of G consecutive values,
// so the sum of the values at a word's set bits is 32/G lookups instead of a loop over its set bits
// (a branch per bit, mispredicted at random masks). The tables are fp32 sums, so results are exact
// in fp32 up to summation order, as in the AVX kernels' tables (lut.h).
#pragma once
#include <cstdint>

namespace supsup_cpu {

// Bit i alone: `word & kBit[i]` in a loop over i is an AND with a constant vector once vectorised
// (a variable shift per lane has no SSE2 instruction).
constexpr uint32_t kBit[32] = {1u << 0,  1u << 1,  1u << 2,  1u << 3,  1u << 4,  1u << 5,  1u << 6,  1u << 7,
                               1u << 8,  1u << 9,  1u << 10, 1u << 11, 1u << 12, 1u << 13, 1u << 14, 1u << 15,
                               1u << 16, 1u << 17, 1u << 18, 1u << 19, 1u << 20, 1u << 21, 1u << 22, 1u << 23,
                               1u << 24, 1u << 25, 1u << 26, 1u << 27, 1u << 28, 1u << 29, 1u << 30, 1u << 31};

// A 32 x 32 bit matrix, bit j of a[i] at row i, column j, transposed in place by swapping ever
// smaller off-diagonal blocks (Hacker's Delight 7-3, in the LSB-first order).
inline void transpose32(uint32_t* a) {
  uint32_t m = 0x0000FFFFu;
  for (int j = 16; j != 0; j >>= 1, m ^= m << j)
    for (int i = 0; i < 32; i = (i + j + 1) & ~j) {
      const uint32_t t = ((a[i] >> j) ^ a[i + j]) & m;
      a[i] ^= t << j;
      a[i + j] ^= t;
    }
}

// Tables of one word's 32 values: G = 8 (four tables of 256, 4 KiB, 1,020 adds to build, 4 lookups a
// word) or G = 4 (eight of 16, 120 adds, 8 lookups).
template <int G>
struct SubsetTables {
  static constexpr int kGroups = 32 / G;
  static constexpr uint32_t kIndex = (1u << G) - 1;
  alignas(64) float t[kGroups][1 << G];

  // vals[32], zero past the row's end: a set pad bit then adds nothing.
  void build(const float* vals) {
    for (int g = 0; g < kGroups; ++g) {
      float* T = t[g];
      T[0] = 0.0f;
      for (int i = 0; i < G; ++i) {
        const float v = vals[G * g + i];
        for (int m = 0; m < (1 << i); ++m) T[(1 << i) + m] = T[m] + v;
      }
    }
  }

  // Sum of vals over the set bits of word, in pairs (short dependency chains).
  float lookup(uint32_t word) const {
    if constexpr (G == 8) {
      return (t[0][word & kIndex] + t[1][(word >> 8) & kIndex]) + (t[2][(word >> 16) & kIndex] + t[3][word >> 24]);
    } else {
      static_assert(G == 4, "nibble or byte tables");
      const float a = t[0][word & kIndex] + t[1][(word >> 4) & kIndex];
      const float b = t[2][(word >> 8) & kIndex] + t[3][(word >> 12) & kIndex];
      const float c = t[4][(word >> 16) & kIndex] + t[5][(word >> 20) & kIndex];
      const float d = t[6][(word >> 24) & kIndex] + t[7][word >> 28];
      return (a + b) + (c + d);
    }
  }
};

// Up to this many words against one set of values, a loop over the set bits; from it nibble tables,
// and from kByteTableWords byte tables (their build, 8x the nibble tables', pays from there; measured
// on this project's Xeon at SUPSUP_CPU_ISA=scalar).
constexpr int64_t kNibbleTableWords = 4;
constexpr int64_t kByteTableWords = 48;

inline float set_bit_sum(const float* vals, uint32_t word) {
  float s = 0.0f;
  for (; word; word &= word - 1) s += vals[__builtin_ctz(word)];
  return s;
}

// Up to this many words of one task a pass: in a bank's own layout a task's words of a block are
// adjacent (one cache line and page touched per task and block, where the tasks lie a whole task's
// bits apart), and a block's tables (16 KiB of byte tables) stay in L1.
constexpr int kBlockWords = 4;

template <class Tables, class WordAt, class Acc>
inline void lookup_block(const float* const* vals, int nb, int64_t count, WordAt word_at, Acc* acc) {
  Tables tab[kBlockWords];
  for (int b = 0; b < nb; ++b) tab[b].build(vals[b]);
  for (int64_t i = 0; i < count; ++i) {
    float s = 0.0f;
    for (int b = 0; b < nb; ++b) s += tab[b].lookup(word_at(i, b));
    acc[i] += s;
  }
}

// acc[i] += the sums of vals[b] (32 values each, zero past the row's end) over the set bits of
// word_at(i, b), b < nb <= kBlockWords, for i < count: nb words of many tasks (or, with tasks and
// weights swapped, of many weights).
template <class WordAt, class Acc>
inline void add_set_bit_sums(const float* const* vals, int nb, int64_t count, WordAt word_at, Acc* acc) {
  if (count >= kByteTableWords) return lookup_block<SubsetTables<8>>(vals, nb, count, word_at, acc);
  if (count >= kNibbleTableWords) return lookup_block<SubsetTables<4>>(vals, nb, count, word_at, acc);
  for (int64_t i = 0; i < count; ++i) {
    float s = 0.0f;
    for (int b = 0; b < nb; ++b) s += set_bit_sum(vals[b], word_at(i, b));
    acc[i] += s;
  }
}

}  // namespace supsup_cpu
