// Runtime choice of the CPU kernels: AVX-512 > AVX2+FMA+F16C > portable.
#include <string.h>

#include "cpu_kernels.h"

namespace onnxq {
namespace cpu {
namespace {

bool has_avx2() {
#if defined(ONNXQ_X86_KERNELS) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool has_avx512() {
#if defined(ONNXQ_X86_KERNELS) && (defined(__GNUC__) || defined(__clang__))
  return has_avx2() && __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

}  // namespace

bool isa_supported(const char* name) {
  if (strcmp(name, "portable") == 0) return true;
  if (strcmp(name, "avx2") == 0) return has_avx2();
  if (strcmp(name, "avx512") == 0) return has_avx512();
  return false;
}

const char* best_isa() { return has_avx512() ? "avx512" : (has_avx2() ? "avx2" : "portable"); }

const CpuKernelTable* select_kernels(const char* name) {
  if (name == nullptr || *name == '\0' || strcmp(name, "auto") == 0) name = best_isa();
  if (!isa_supported(name)) return nullptr;
#if defined(ONNXQ_X86_KERNELS)
  if (strcmp(name, "avx512") == 0) return &avx512_kernels();
  if (strcmp(name, "avx2") == 0) return &avx2_kernels();
#endif
  return &portable_kernels();
}

}  // namespace cpu
}  // namespace onnxq
