// Single-task kernels: the 2-bit signed-constant GEMV/GEMM for small batches and the masked
// weight materialisation (for cuDNN convolutions).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels.cuh"

namespace supsup_cuda {
namespace {

constexpr int kGemvWarps = 8;       // output rows per block (one warp each)
constexpr int kXFloats = 8192;      // x staged in shared memory: 32 KB for all B rows together

// One warp per output row. Lanes walk the row's words; x is staged in shared memory for all
// batch rows. Per set mask bit: acc += sign ? x : -x (no weight is read: 2 bits per weight).
// A cleared bit is a zero weight, which adds nothing unless x is not finite there (0 · inf and
// 0 · NaN are NaN): a chunk of x holding an inf or NaN also walks the cleared bits of its rows.
template <int B>
__global__ void __launch_bounds__(kGemvWarps * 32) signed_gemv_kernel(const float* __restrict__ x, const int32_t* __restrict__ sign_words,
                                   const int32_t* __restrict__ mask_words, const float* __restrict__ bias,
                                   float* __restrict__ y, int64_t N, int64_t K, float scale) {
  constexpr int kXChunk = kXFloats / B / 32 * 32;  // whole words: chunks start on a word boundary
  __shared__ float xs[B][kXChunk];
  __shared__ int nonfinite[B];  // this chunk of batch row b holds an inf or NaN
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp;
  const int64_t W = (K + 31) / 32;
  float acc[B];
#pragma unroll
  for (int b = 0; b < B; ++b) acc[b] = 0.f;
  for (int64_t k0 = 0; k0 < K; k0 += kXChunk) {
    const int len = static_cast<int>(K - k0 < kXChunk ? K - k0 : kXChunk);
    __syncthreads();
    if (threadIdx.x < B) nonfinite[threadIdx.x] = 0;
    __syncthreads();
    for (int e = threadIdx.x; e < B * kXChunk; e += blockDim.x) {
      const int b = e / kXChunk, j = e % kXChunk;
      const float v = j < len ? x[b * K + k0 + j] : 0.f;
      xs[b][j] = v;
      if (!isfinite(v)) nonfinite[b] = 1;  // every writer writes 1: no race on the value
    }
    __syncthreads();
    uint32_t nonfinite_rows = 0;  // bit b: batch row b
#pragma unroll
    for (int b = 0; b < B; ++b) nonfinite_rows |= (nonfinite[b] != 0 ? 1u : 0u) << b;
    if (row < N) {
      for (int w = lane; w < (len + 31) / 32; w += 32) {
        const int64_t word_index = row * W + k0 / 32 + w;
        uint32_t m = static_cast<uint32_t>(mask_words[word_index]);
        const uint32_t s = static_cast<uint32_t>(sign_words[word_index]);
        while (m) {                       // only the set mask bits cost work
          const int bit = __ffs(m) - 1;
          m &= m - 1;
          const bool positive = (s >> bit) & 1u;
          const int j = w * 32 + bit;
#pragma unroll
          for (int b = 0; b < B; ++b) acc[b] += positive ? xs[b][j] : -xs[b][j];
        }
      }
      if (nonfinite_rows) {               // rare: the zero weights' 0 · x, in a second pass over the words
        for (int w = lane; w < (len + 31) / 32; w += 32) {
          uint32_t cleared = ~static_cast<uint32_t>(mask_words[row * W + k0 / 32 + w]);  // past len x is 0
          while (cleared) {
            const int bit = __ffs(cleared) - 1;
            cleared &= cleared - 1;
            const int j = w * 32 + bit;
#pragma unroll
            for (int b = 0; b < B; ++b)
              if ((nonfinite_rows >> b) & 1u) acc[b] += 0.f * xs[b][j];
          }
        }
      }
    }
  }
  if (row >= N) return;
#pragma unroll
  for (int b = 0; b < B; ++b) {
    float t = acc[b];
    for (int off = 16; off > 0; off >>= 1) t += __shfl_down_sync(0xffffffffu, t, off);  // fixed order
    if (lane == 0) y[b * N + row] = scale * t + (bias ? bias[row] : 0.f);
  }
}

template <typename T>
__device__ __forceinline__ T zero_of();
template <> __device__ __forceinline__ float zero_of<float>() { return 0.f; }
template <> __device__ __forceinline__ __half zero_of<__half>() { return __float2half(0.f); }
template <> __device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() { return __float2bfloat16(0.f); }

template <typename T>
__global__ void masked_weight_kernel(const T* __restrict__ w, const int32_t* __restrict__ words, T* __restrict__ out,
                                     int64_t rows, int64_t n, int64_t channels, int64_t khw, bool channels_last) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= rows * n) return;
  const int64_t W = (n + 31) / 32;
  const int64_t o = e / n;
  int64_t j = e % n;  // canonical position within the row
  if (channels_last) {  // e walks the output in (O, kh, kw, C) order
    const int64_t c = j % channels, hw = j / channels;
    j = c * khw + hw;
  }
  const uint32_t word = static_cast<uint32_t>(words[o * W + j / 32]);
  out[e] = ((word >> (j % 32)) & 1u) ? w[o * n + j] : zero_of<T>();
}

template <int B>
cudaError_t gemv(const float* x, const int32_t* sw, const int32_t* mw, const float* bias, float* y,
                 int64_t N, int64_t K, float scale, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((N + kGemvWarps - 1) / kGemvWarps);
  signed_gemv_kernel<B><<<blocks, kGemvWarps * 32, 0, stream>>>(x, sw, mw, bias, y, N, K, scale);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_signed_gemv(const float* x, const int32_t* sign_words, const int32_t* mask_words,
                               const float* bias, float* y, int64_t B, int64_t N, int64_t K, float scale,
                               cudaStream_t stream) {
  if (N <= 0 || B <= 0) return cudaSuccess;
  // One pass over the bits for the whole batch: every row's accumulators stay in registers.
  switch (B) {
#define SUPSUP_GEMV_CASE(b) case b: return gemv<b>(x, sign_words, mask_words, bias, y, N, K, scale, stream);
    SUPSUP_GEMV_CASE(1) SUPSUP_GEMV_CASE(2) SUPSUP_GEMV_CASE(3) SUPSUP_GEMV_CASE(4) SUPSUP_GEMV_CASE(5)
    SUPSUP_GEMV_CASE(6) SUPSUP_GEMV_CASE(7) SUPSUP_GEMV_CASE(8) SUPSUP_GEMV_CASE(9) SUPSUP_GEMV_CASE(10)
    SUPSUP_GEMV_CASE(11) SUPSUP_GEMV_CASE(12) SUPSUP_GEMV_CASE(13) SUPSUP_GEMV_CASE(14) SUPSUP_GEMV_CASE(15)
    SUPSUP_GEMV_CASE(16)
#undef SUPSUP_GEMV_CASE
    default: return cudaErrorInvalidValue;  // the binding checks B <= 16
  }
}

cudaError_t launch_masked_weight(const void* weight, const int32_t* words, void* out, DType dtype, int64_t rows,
                                 int64_t n, int64_t channels, int64_t khw, bool channels_last, cudaStream_t stream) {
  const int64_t total = rows * n;
  if (total <= 0) return cudaSuccess;
  constexpr int threads = 256;
  const unsigned blocks = static_cast<unsigned>((total + threads - 1) / threads);
  switch (dtype) {
    case DType::F32:
      masked_weight_kernel<float><<<blocks, threads, 0, stream>>>(static_cast<const float*>(weight), words,
                                                                  static_cast<float*>(out), rows, n, channels, khw, channels_last);
      break;
    case DType::F16:
      masked_weight_kernel<__half><<<blocks, threads, 0, stream>>>(static_cast<const __half*>(weight), words,
                                                                   static_cast<__half*>(out), rows, n, channels, khw, channels_last);
      break;
    case DType::BF16:
      masked_weight_kernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(weight), words, static_cast<__nv_bfloat16*>(out), rows, n, channels, khw,
          channels_last);
      break;
  }
  return cudaGetLastError();
}

}  // namespace supsup_cuda
