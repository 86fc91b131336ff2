// CPU kernels of onnxq::MatMulLowBit: the interface between the ORT glue and the per-ISA kernels.
//
// Each instruction set (portable C++, AVX2+FMA+F16C, AVX-512) is compiled in its own translation unit from the
// same templates (kernels_impl.h) and exposes one CpuKernelTable.  The ISA translation units use no C++ standard
// library templates, so no code compiled for a wider ISA can leak into another one through shared inline symbols.
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace onnxq {
namespace cpu {

// Y[m, n] = sum_k A[m, k] * (scales[n, g] * q[n, k] + zeros[n, g]) + bias[n], all in fp32.
struct MatMulArgs {
  const float* a;         // [M, lda], zero padded to k_padded = groups * group_size columns
  int64_t lda;
  const uint8_t* b;       // [N, groups, bytes_per_group]
  const float* scales;    // [N, groups]
  const float* zeros;     // [N, groups]
  const float* bias;      // [N] or nullptr
  float* y;               // [M, ldy]
  int64_t ldy;
  int64_t m, n, groups, group_size;
  int bits;
};

// Runs fn(data, i) for i in [0, total), possibly in parallel (ORT's intra-op thread pool).
struct Runner {
  void (*parallel_for)(void* context, size_t total, void (*fn)(void*, size_t), void* data);
  void* context;
};

struct CpuKernelTable {
  const char* name;
  // Floats of scratch memory matmul() needs for these arguments.
  size_t (*scratch_floats)(const MatMulArgs& args);
  void (*matmul)(const MatMulArgs& args, const Runner& runner, float* scratch);
  void (*half_to_float)(const uint16_t* src, float* dst, size_t count);
  void (*float_to_half)(const float* src, uint16_t* dst, size_t count);  // round to nearest even
};

const CpuKernelTable& portable_kernels();
const CpuKernelTable& avx2_kernels();
const CpuKernelTable& avx512_kernels();

// Selection: "auto" (best supported), "avx512", "avx2" or "portable".  Returns nullptr if `name` is unknown or
// the CPU cannot run it.
const CpuKernelTable* select_kernels(const char* name);
bool isa_supported(const char* name);
const char* best_isa();

}  // namespace cpu
}  // namespace onnxq
