// Which instruction should cut a table index out of a mask word? The lookup loop of csrc/cpu/lut.cpp
// (one word of 16 tasks: 8 nibble lookups by vpermps; AVX2: 8 tasks, 11 3-bit lookups by vpermps ymm)
// with its index formed four ways, single thread, words and tables in L1, best of 30 runs.
//
//   g++ -O3 -o /tmp/lut_index_ops benchmarks/lut_index_ops.cpp && /tmp/lut_index_ops
//
// On Zen 4 a shift shares its pipes with vpermps and a rotate (AVX-512) or a multiply-high (AVX2)
// does not; "none" (the word itself every time, a wrong result) is the floor of the lookups alone.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi"), noinline))
#define AVX2 __attribute__((target("avx2,fma"), noinline))

constexpr int kWords = 1024;  // 16-task words (AVX2: 8-task words), 64 KiB or 32 KiB

#define LOOP512(INDEX)                                                                                    \
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()}; \
  for (int j = 0; j < kWords; ++j) {                                                                     \
    const __m512i w = _mm512_loadu_si512(words + 16 * j);                                                \
    const float* t = tables + 128 * (j & 15);                                                            \
    _Pragma("GCC unroll 8") for (int p = 0; p < 8; ++p) acc[p & 3] =                                     \
        _mm512_add_ps(acc[p & 3], _mm512_permutexvar_ps(INDEX, _mm512_loadu_ps(t + 16 * p)));            \
  }                                                                                                      \
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));

AVX512 float shift512(const uint32_t* words, const float* tables) { LOOP512(_mm512_srli_epi32(w, 4 * p)) }
AVX512 float rotate512(const uint32_t* words, const float* tables) { LOOP512(_mm512_ror_epi32(w, 4 * p)) }
AVX512 float multishift512(const uint32_t* words, const float* tables) {
  // byte 0 of each dword <- bits 4p.. of the dword (qword offsets 4p and 32 + 4p)
  LOOP512(_mm512_multishift_epi64_epi8(_mm512_set1_epi64(static_cast<long long>((uint64_t{32} + 4 * p) << 32 | (4 * p))), w))
}
AVX512 float none512(const uint32_t* words, const float* tables) { LOOP512(w) }

#define LOOP256(INDEX)                                                                                    \
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}; \
  for (int j = 0; j < kWords; ++j) {                                                                     \
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words + 8 * j));              \
    const __m256i hi = _mm256_srli_epi32(w, 16);                                                         \
    (void)hi;                                                                                            \
    const float* t = tables + 88 * (j & 15);                                                             \
    _Pragma("GCC unroll 11") for (int c = 0; c < 11; ++c) acc[c & 3] =                                   \
        _mm256_add_ps(acc[c & 3], _mm256_permutevar8x32_ps(_mm256_loadu_ps(t + 8 * c), INDEX));         \
  }                                                                                                      \
  __m256 s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));               \
  alignas(32) float o[8];                                                                                \
  _mm256_store_ps(o, s);                                                                                 \
  return o[0] + o[7];

// as csrc/cpu/simd.h index3_bits_at: bits [b, b + 3) by a multiply-high inside a 16-bit half
__attribute__((target("avx2,fma"), always_inline)) inline __m256i mulhi_index(__m256i w, __m256i hi, int b) {
  if (b == 0) return w;
  if (b == 16) return hi;
  if (b == 14 || b == 15) return _mm256_srli_epi32(w, b);
  return b < 16 ? _mm256_mulhi_epu16(w, _mm256_set1_epi16(static_cast<int16_t>(1u << (16 - b))))
                : _mm256_mulhi_epu16(hi, _mm256_set1_epi16(static_cast<int16_t>(1u << (32 - b))));
}
AVX2 float shift256(const uint32_t* words, const float* tables) { LOOP256(_mm256_srli_epi32(w, 3 * c)) }
AVX2 float mulhi256(const uint32_t* words, const float* tables) { LOOP256(mulhi_index(w, hi, 3 * c)) }
AVX2 float none256(const uint32_t* words, const float* tables) { LOOP256(w) }

template <class F>
double best_ns(F f, const uint32_t* words, const float* tables) {
  double best = 1e30;
  volatile float sink = 0;
  for (int rep = 0; rep < 30; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int it = 0; it < 100; ++it) sink = sink + f(words, tables);
    best = std::min(best, std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count() / (100.0 * kWords));
  }
  return best;
}

int main() {
  std::vector<uint32_t> words(16 * kWords);
  uint32_t x = 12345;
  for (uint32_t& w : words) w = x = x * 1664525u + 1013904223u;
  std::vector<float> tables(128 * 16);
  for (size_t i = 0; i < tables.size(); ++i) tables[i] = 0.25f * static_cast<float>(i % 7);
  // the same sums whichever way the index is formed
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vbmi")) {
    const float ref = shift512(words.data(), tables.data());
    if (rotate512(words.data(), tables.data()) != ref || multishift512(words.data(), tables.data()) != ref) return 1;
    std::printf("AVX-512, ns per 16-task word: shift %.2f  rotate %.2f  multishift %.2f  none %.2f\n",
                best_ns(shift512, words.data(), tables.data()), best_ns(rotate512, words.data(), tables.data()),
                best_ns(multishift512, words.data(), tables.data()), best_ns(none512, words.data(), tables.data()));
  }
  if (__builtin_cpu_supports("avx2")) {
    if (mulhi256(words.data(), tables.data()) != shift256(words.data(), tables.data())) return 1;
    std::printf("AVX2, ns per 8-task word: shift %.2f  multiply-high %.2f  none %.2f\n",
                best_ns(shift256, words.data(), tables.data()), best_ns(mulhi256, words.data(), tables.data()),
                best_ns(none256, words.data(), tables.data()));
  }
  return 0;
}
