// mask_dot and superpose over a task-major bank of packed masks (see kernels.cuh).
#include "kernels.cuh"

namespace supsup_cuda {
namespace {

constexpr int kChunkWords = 32;                 // words of v (1024 entries) per table
constexpr int kGroups = kChunkWords * 8;        // 4-entry groups per chunk
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;           // 32 tasks per warp
constexpr int kTasksPerBlock = kThreads;        // one task per thread per round
constexpr int kRounds = 4;                      // task rounds per block (table built once)

__global__ void mask_dot_kernel(const int32_t* __restrict__ bank, const float* __restrict__ v,
                                const int64_t* __restrict__ active, float* __restrict__ partial,
                                int64_t k, int64_t L) {
  __shared__ float table[kGroups * 16];                       // 16 KB
  __shared__ uint32_t words[kWarps][32][kChunkWords + 1];     // per warp: 32 tasks × 32 words (+1: no conflicts)
  const int64_t chunk = blockIdx.x;
  const int64_t w0 = chunk * kChunkWords;
  const int nw = static_cast<int>(L - w0 < kChunkWords ? L - w0 : kChunkWords);
  // 1. Nibble tables: table[g*16 + p] = sum over bits b of p of v[32*w0 + 4g + b].
  for (int e = threadIdx.x; e < kGroups * 16; e += kThreads) {
    const int g = e >> 4, p = e & 15;
    const int64_t base = w0 * 32 + 4 * static_cast<int64_t>(g);
    float s = 0.f;
    if (g < nw * 8) {
#pragma unroll
      for (int b = 0; b < 4; ++b) s += ((p >> b) & 1) ? v[base + b] : 0.f;
    }
    table[e] = s;
  }
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int round = 0; round < kRounds; ++round) {
    const int64_t first = (static_cast<int64_t>(blockIdx.y) * kRounds + round) * kTasksPerBlock + warp * 32;
    // 2. The warp stages its 32 tasks' words for this chunk, coalesced (lanes along the words).
    for (int t = 0; t < 32; ++t) {
      const int64_t i = first + t;
      uint32_t a = 0;
      if (i < k) {
        const int64_t row = active ? active[i] : i;
        const int32_t* src = bank + row * L + w0;
        if (lane < nw) a = static_cast<uint32_t>(src[lane]);
      }
      words[warp][t][lane] = a;
    }
    __syncwarp();
    // 3. Lane = task: all lanes read the same table row at each step.
    float acc = 0.f;
    for (int w = 0; w < nw; ++w) {
      const uint32_t word = words[warp][lane][w];
      const float* row = table + w * 8 * 16;
#pragma unroll
      for (int nib = 0; nib < 8; ++nib) acc += row[nib * 16 + ((word >> (4 * nib)) & 15u)];
    }
    const int64_t i = first + lane;
    if (i < k) partial[chunk * k + i] = acc;
    __syncwarp();
  }
}

__global__ void superpose_kernel(const int32_t* __restrict__ bank, const float* __restrict__ alpha,
                                 const int64_t* __restrict__ active, float* __restrict__ out, int64_t k, int64_t L) {
  // One thread per word column; 32 accumulators in registers; tasks walked in a fixed order.
  const int64_t l = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (l >= L) return;
  float acc[32];
#pragma unroll
  for (int b = 0; b < 32; ++b) acc[b] = 0.f;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t row = active ? active[i] : i;
    const uint32_t word = static_cast<uint32_t>(__ldg(bank + row * L + l));
    const float a = __ldg(alpha + i);
    if (word == 0u) continue;
#pragma unroll
    for (int b = 0; b < 32; ++b) acc[b] += ((word >> b) & 1u) ? a : 0.f;
  }
  float4* dst = reinterpret_cast<float4*>(out + l * 32);
#pragma unroll
  for (int q = 0; q < 8; ++q) dst[q] = make_float4(acc[4 * q], acc[4 * q + 1], acc[4 * q + 2], acc[4 * q + 3]);
}

}  // namespace

int64_t mask_dot_chunks(int64_t L) { return (L + kChunkWords - 1) / kChunkWords; }

cudaError_t launch_mask_dot(const int32_t* bank, const float* v, const int64_t* active, float* partial,
                            int64_t k, int64_t L, cudaStream_t stream) {
  if (k <= 0 || L <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(mask_dot_chunks(L)),
                  static_cast<unsigned>((k + kTasksPerBlock * kRounds - 1) / (kTasksPerBlock * kRounds)));
  mask_dot_kernel<<<grid, kThreads, 0, stream>>>(bank, v, active, partial, k, L);
  return cudaGetLastError();
}

cudaError_t launch_superpose(const int32_t* bank, const float* alpha, const int64_t* active, float* out,
                             int64_t k, int64_t L, cudaStream_t stream) {
  if (L <= 0) return cudaSuccess;
  constexpr int threads = 128;
  superpose_kernel<<<static_cast<unsigned>((L + threads - 1) / threads), threads, 0, stream>>>(bank, alpha, active, out, k, L);
  return cudaGetLastError();
}

}  // namespace supsup_cuda
