// CUDA kernels of onnxq::MatMulLowBit (fp32 and fp16 activations, fp32 accumulation).
//
//   M <= 8 : GEMV (W2A16 / W2A32 / W4A*): one warp per output column n; each lane decodes 32-bit words of packed
//            codes straight to w = s*q + z in registers and accumulates M dot products; warp shuffle reduction.
//   M > 8  : tiled GEMM: per K step a 64x16 tile of A and a dequantized 16x64 tile of W are staged in shared
//            memory; each of 256 threads accumulates a 4x4 sub-tile of Y.
// All index and dequantization math is in common/lowbit_math.h (__host__ __device__), which the host test
// custom_ops/tests/host_math_test.cc runs on the CPU with the same thread decomposition.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/lowbit_math.h"
#include "cuda_launch.h"

namespace onnxq {
namespace cuda {
namespace {

constexpr int kGemvWarps = 4;

template <class T>
struct StoreAs;

template <>
struct StoreAs<float> {
  float* y;
  __host__ __device__ void operator()(int64_t index, float value) const { y[index] = value; }
};

template <>
struct StoreAs<__half> {
  __half* y;
  __host__ __device__ void operator()(int64_t index, float value) const { y[index] = __float2half_rn(value); }
};

template <class T, int M>
__global__ void __launch_bounds__(32 * kGemvWarps) gemv_kernel(LowBitProblem<T> p) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp;
  if (n >= p.n) return;  // uniform across the warp
  float acc[M];
  gemv_lane_partial<T, M>(p, n, lane, 32, acc);
#pragma unroll
  for (int r = 0; r < M; ++r) {
    float v = acc[r];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    acc[r] = v;
  }
  if (lane == 0) {
    const float bias = p.bias ? to_float(p.bias[n]) : 0.f;
    StoreAs<T> store{p.y};
#pragma unroll
    for (int r = 0; r < M; ++r) store(r * p.n + n, acc[r] + bias);
  }
}

template <class T>
__global__ void __launch_bounds__(kGemmThreads) gemm_kernel(LowBitProblem<T> p) {
  __shared__ float a_tile[kTileK * kTileM];
  __shared__ float w_tile[kTileK * kTileN];
  const int tid = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  float acc[kMicro][kMicro];
#pragma unroll
  for (int i = 0; i < kMicro; ++i)
#pragma unroll
    for (int j = 0; j < kMicro; ++j) acc[i][j] = 0.f;
  for (int64_t k0 = 0; k0 < p.k; k0 += kTileK) {
    gemm_load_a_tile(p, tid, m0, k0, a_tile);
    gemm_load_w_tile(p, tid, n0, k0, w_tile);
    __syncthreads();
    gemm_accumulate_tile(tid, a_tile, w_tile, acc);
    __syncthreads();
  }
  gemm_store_tile(p, tid, m0, n0, acc, StoreAs<T>{p.y});
}

template <class T, int M>
void launch_gemv(const LowBitProblem<T>& p, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((p.n + kGemvWarps - 1) / kGemvWarps);
  gemv_kernel<T, M><<<blocks, 32 * kGemvWarps, 0, stream>>>(p);
}

template <class T>
const char* launch(const LaunchArgs& args, cudaStream_t stream) {
  LowBitProblem<T> p;
  p.a = static_cast<const T*>(args.a);
  p.b = args.b;
  p.scales = static_cast<const T*>(args.scales);
  p.zeros = static_cast<const T*>(args.zeros);
  p.bias = static_cast<const T*>(args.bias);
  p.y = static_cast<T*>(args.y);
  p.m = args.m;
  p.n = args.n;
  p.k = args.k;
  p.group_size = args.group_size;
  p.bits = args.bits;
  if (p.m <= 8) {
    switch (p.m) {
      case 1: launch_gemv<T, 1>(p, stream); break;
      case 2: launch_gemv<T, 2>(p, stream); break;
      case 3: launch_gemv<T, 3>(p, stream); break;
      case 4: launch_gemv<T, 4>(p, stream); break;
      case 5: launch_gemv<T, 5>(p, stream); break;
      case 6: launch_gemv<T, 6>(p, stream); break;
      case 7: launch_gemv<T, 7>(p, stream); break;
      default: launch_gemv<T, 8>(p, stream); break;
    }
  } else {
    const int64_t grid_m = (p.m + kTileM - 1) / kTileM;
    if (grid_m > 65535) return "too many rows in A for one launch (M > 4194240)";
    const dim3 grid(static_cast<unsigned>((p.n + kTileN - 1) / kTileN), static_cast<unsigned>(grid_m));
    gemm_kernel<T><<<grid, kGemmThreads, 0, stream>>>(p);
  }
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace

const char* matmul_lowbit(const LaunchArgs& args, void* stream) {
  if (args.m <= 0 || args.n <= 0) return nullptr;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return args.half ? launch<__half>(args, s) : launch<float>(args, s);
}

}  // namespace cuda
}  // namespace onnxq
