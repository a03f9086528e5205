// Run-time choice of the instruction set (capped by SUPSUP_CPU_ISA).
#include "kernels.h"
#include "simd.h"

#if SUPSUP_X86
#include <cpuid.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace supsup_cpu {

Isa detect_isa() {
  Isa best = Isa::Scalar;
#if SUPSUP_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::Avx2;
  if (best == Isa::Avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    best = Isa::Avx512;
#endif
  if (const char* env = std::getenv("SUPSUP_CPU_ISA")) {
    Isa want = best;
    if (!std::strcmp(env, "scalar")) want = Isa::Scalar;
    else if (!std::strcmp(env, "avx2")) want = Isa::Avx2;
    else if (!std::strcmp(env, "avx512")) want = Isa::Avx512;
    if (static_cast<int>(want) < static_cast<int>(best)) best = want;  // never above what the CPU has
  }
  return best;
}

const char* cpu_vendor() {
#if SUPSUP_X86
  __builtin_cpu_init();
  if (__builtin_cpu_is("intel")) return "intel";
  if (__builtin_cpu_is("amd")) return "amd";
#endif
  return "other";
}

int cpu_family() {
#if SUPSUP_X86
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return 0;
  const int base = static_cast<int>((eax >> 8) & 0xF);
  return base == 0xF ? base + static_cast<int>((eax >> 20) & 0xFF) : base;
#else
  return 0;
#endif
}

bool stream_prefetch() {
  static const bool on = [] {
    if (const char* env = std::getenv("SUPSUP_CPU_PREFETCH")) return std::strcmp(env, "0") != 0;
    if (std::strcmp(cpu_vendor(), "intel") == 0) return true;
    return std::strcmp(cpu_vendor(), "amd") == 0 && cpu_family() >= 0x1A;  // Zen 5 and later
  }();
  return on;
}

bool stream_prefetch_l2() {
  static const bool on = [] {
    if (const char* env = std::getenv("SUPSUP_CPU_PREFETCH_L2")) return std::strcmp(env, "0") != 0;
    return std::strcmp(cpu_vendor(), "intel") == 0;
  }();
  return on;
}

bool shift_indices() {
  static const bool on = [] {
    if (const char* env = std::getenv("SUPSUP_CPU_SHIFT_INDICES")) return std::strcmp(env, "0") != 0;
    return std::strcmp(cpu_vendor(), "intel") == 0;
  }();
  return on;
}

bool wide_gemm_tiles() {
  static const bool on = [] {
    if (const char* env = std::getenv("SUPSUP_CPU_WIDE_TILES")) return std::strcmp(env, "0") != 0;
    return std::strcmp(cpu_vendor(), "intel") == 0;
  }();
  return on;
}

bool short_gemm_chunks() {
  static const bool on = [] {
    if (const char* env = std::getenv("SUPSUP_CPU_SHORT_CHUNKS")) return std::strcmp(env, "0") != 0;
    return std::strcmp(cpu_vendor(), "intel") == 0;
  }();
  return on;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace supsup_cpu
