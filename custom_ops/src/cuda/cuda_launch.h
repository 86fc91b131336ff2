// Host-side entry of the CUDA kernels of onnxq::MatMulLowBit (implemented in matmul_lowbit.cu).
// Kept free of ORT and CUDA headers so the ORT glue compiles with the host compiler alone.
#pragma once

#include <stdint.h>

namespace onnxq {
namespace cuda {

struct LaunchArgs {
  const void* a;        // [M, K] float or half (device)
  const uint8_t* b;     // [N, G, bytes_per_group] (device)
  const void* scales;   // [N, G]
  const void* zeros;    // [N, G]
  const void* bias;     // [N] or nullptr
  void* y;              // [M, N]
  int64_t m, n, k, group_size;
  int bits;
  bool half;            // true: a, scales, zeros, bias, y are float16; false: float32
};

// Enqueues Y = A * dequant(B)^T (+ bias) on `stream` (a cudaStream_t). Returns nullptr or an error message.
const char* matmul_lowbit(const LaunchArgs& args, void* stream);

}  // namespace cuda
}  // namespace onnxq
