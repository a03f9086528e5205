// How fast can the AVX-512 nibble-lookup loop of csrc/cpu/lut.cpp (mask_dot over a bank of packed
// masks) read the bits, and what does the bank's task stride cost? Three loops, 2 OpenMP threads
// splitting a layer's words as the kernels do:
//   floor   — 8 lookups (rotate, vpermps, add) per 16-task word, tables held in registers, words
//             from L1: what the instructions alone allow;
//   bank    — the kernel's shape: per block of 1,024 words (512 KiB of tables, from L2), every group
//             of 16 tasks loads its rows 16 words at a time, transposes them in registers and looks
//             them up; 1,024 tasks of a 1,024 x 1,024 layer (128 MiB of bits, from DRAM), their rows
//             R * W = 32,768 words (128 KiB) apart, as in the [k, R, W] bank of an FC1024 layer;
//   padded  — the same with the tasks 16 words further apart;
// and, to see which part of the kernel's shape costs what, the bank loop with its tables or its
// words kept in cache:
//   L1 tables    — the tables of 32 words (16 KiB, in L1) reused across the block, words from DRAM;
//   cached words — 16 tasks' rows (64 KiB a block, in L2) read by every group, tables from L2;
//   both         — both of these.
// With a stride that is a multiple of 4 KiB (and here of 128 KiB) the 16 rows of a group fall in
// one L1 set (and one L2 set) of 8 ways, so the lines the prefetchers fetch ahead evict each other.
//
//   g++ -O3 -fopenmp -o /tmp/lut_bank_stride benchmarks/lut_bank_stride.cpp && /tmp/lut_bank_stride
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "../csrc/cpu/simd.h"  // the kernels' transpose16x16 and lookup_word512

using supsup_cpu::lookup_word512;
using supsup_cpu::transpose16x16;

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"), noinline))

constexpr int64_t kTasks = 1024, kRows = 1024, kWordsPerRow = 32, kLayerWords = kRows * kWordsPerRow;
constexpr int64_t kBlockWords = 1024;  // tables: 128 floats a word, 512 KiB a block (lut.cpp)

AVX512 float floor_loop(const uint32_t* words, const float* tables, int64_t n_words) {
  __m512 tab[8], acc[4];
  for (int p = 0; p < 8; ++p) tab[p] = _mm512_load_ps(tables + 16 * p);
  for (int a = 0; a < 4; ++a) acc[a] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n_words; ++j) {
    const __m512i w = _mm512_loadu_si512(words + 16 * (j & 63));
#pragma GCC unroll 8
    for (int p = 0; p < 8; ++p) acc[p & 3] = _mm512_add_ps(acc[p & 3], _mm512_permutexvar_ps(_mm512_ror_epi32(w, 4 * p), tab[p]));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

// words [f0, f1) of every task (rows `stride` words apart), a block of tables at a time; task t reads
// the rows of task t % hot_tasks, word c the tables of word c % table_words (both powers of 2)
AVX512 float bank_loop(const uint32_t* bank, int64_t stride, const float* tables, int64_t f0, int64_t f1,
                       int64_t hot_tasks = kTasks, int64_t table_words = kBlockWords) {
  float total = 0.0f;
  for (int64_t b0 = f0; b0 < f1; b0 += kBlockWords) {
    const int64_t b1 = std::min(f1, b0 + kBlockWords);
    for (int64_t g = 0; g < kTasks; g += 16) {
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t c = b0; c < b1; c += 16) {
        __m512i w[16];
        for (int i = 0; i < 16; ++i) w[i] = _mm512_loadu_si512(bank + ((g + i) & (hot_tasks - 1)) * stride + c);
        transpose16x16(w);
        for (int j = 0; j < 16; ++j) lookup_word512(acc, w[j], tables + ((c - b0 + j) & (table_words - 1)) * 128);
      }
      total += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
    }
  }
  return total;
}

template <class F>
double best_seconds(F f, int reps) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

int main() {
  if (!__builtin_cpu_supports("avx512f")) {
    std::printf("this CPU has no AVX-512\n");
    return 0;
  }
  std::vector<float> tables(128 * kBlockWords + 16);
  float* tab = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(tables.data()) + 63) & ~uintptr_t{63});
  for (int64_t i = 0; i < 128 * kBlockWords; ++i) tab[i] = 0.25f * static_cast<float>(i % 7);
  std::vector<uint32_t> small(16 * 64);
  uint32_t x = 12345;
  for (uint32_t& w : small) w = x = x * 1664525u + 1013904223u;
  const double bits_per_lookup = 64.0;  // 16 tasks x 4 bits

  volatile float sink = 0.0f;
  const int64_t n_floor = int64_t{1} << 24;
  const double t_floor = best_seconds([&] {
#pragma omp parallel num_threads(2)
    { sink = sink + floor_loop(small.data(), tab, n_floor); }
  }, 5);
  std::printf("floor (tables in registers, 2 threads): %.1f GB/s of bits\n", 2.0 * n_floor * 8 * bits_per_lookup / 8 / t_floor / 1e9);

  auto time_bank = [&](const std::vector<uint32_t>& bank, int64_t stride, int64_t hot_tasks, int64_t table_words) {
    return best_seconds([&] {
#pragma omp parallel num_threads(2)
      {
        const int64_t id = omp_get_thread_num(), n = omp_get_num_threads();
        sink = sink + bank_loop(bank.data(), stride, tab, kLayerWords * id / n, kLayerWords * (id + 1) / n, hot_tasks,
                                table_words);
      }
    }, 5);
  };
  const double bytes = kTasks * kLayerWords * 4.0;
  for (int64_t pad : {int64_t{0}, int64_t{16}}) {
    const int64_t stride = kLayerWords + pad;
    std::vector<uint32_t> bank(static_cast<size_t>(kTasks * stride));
    for (uint32_t& w : bank) w = x = x * 1664525u + 1013904223u;
    const double t = time_bank(bank, stride, kTasks, kBlockWords);
    std::printf("bank, task stride %ld words (%s): %.1f GB/s of bits (%.1f ms for %ld MiB)\n", static_cast<long>(stride),
                stride * 4 % 4096 ? "not a multiple of 4 KiB" : "a multiple of 4 KiB", bytes / t / 1e9, t * 1e3,
                static_cast<long>(kTasks * kLayerWords * 4 >> 20));
    if (pad != 0) continue;
    const struct { const char* what; int64_t hot_tasks, table_words; } parts[] = {
        {"L1 tables (32 words), words from DRAM", kTasks, 32},
        {"cached words (16 tasks' rows), tables from L2", 16, kBlockWords},
        {"both: L1 tables and cached words", 16, 32}};
    for (const auto& part : parts)
      std::printf("  %s: %.1f GB/s of bits\n", part.what, bytes / time_bank(bank, stride, part.hot_tasks, part.table_words) / 1e9);
  }
  return 0;
}
