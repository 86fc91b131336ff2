// onnxq MatMulLowBit: packing layout and dequantization math shared by the CPU kernels, the CUDA kernels
// and the host test (custom_ops/tests/host_math_test.cc), which runs the CUDA tile functions on the CPU.
//
// Layout (docs/custom_ops.md is the reference):
//   B      uint8 [N, G, bytes_per_group]   G = ceil(K / group_size), bytes_per_group = ceil(group_size * bits / 8)
//   scales T     [N, G]                    T = activation dtype (float or float16)
//   zeros  T     [N, G]
//   codes of row n, group g are an LSB-first bit stream: code j occupies bits [j*bits, (j+1)*bits) of
//   B[n, g, :] (the layout of com.microsoft::MatMulNBits); codes for k >= K are zero padding.
//   w[n, k] = scales[n, g] * q[n, k] + zeros[n, g],  g = k / group_size
//   Y[m, n] = sum_k A[m, k] * w[n, k] (+ bias[n])
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define ONNXQ_HD __host__ __device__ __forceinline__
#else
// static: every translation unit (each compiled for its own instruction set) keeps a private copy.
#define ONNXQ_HD static inline
#endif

namespace onnxq {

ONNXQ_HD float to_float(float v) { return v; }
#if defined(__CUDACC__)
ONNXQ_HD float to_float(__half v) { return __half2float(v); }
#endif

ONNXQ_HD int64_t num_groups(int64_t k, int64_t group_size) { return (k + group_size - 1) / group_size; }

ONNXQ_HD int64_t bytes_per_group(int64_t group_size, int bits) { return (group_size * bits + 7) / 8; }

// True when codes can be read as aligned 32-bit words that never straddle a group (the fast paths).
ONNXQ_HD bool word_aligned_layout(int64_t group_size, int bits) {
  return (bits == 2 || bits == 4) && group_size % 16 == 0;
}

// Code j (0-based, within one group) of an LSB-first bit stream of `bits`-bit codes.
ONNXQ_HD uint32_t code_in_group(const uint8_t* group_bytes, int64_t j, int bits) {
  const int64_t bit = j * bits;
  const int64_t byte = bit >> 3;
  const int shift = static_cast<int>(bit & 7);
  uint32_t v = group_bytes[byte];
  if (shift + bits > 8) v |= static_cast<uint32_t>(group_bytes[byte + 1]) << 8;
  return (v >> shift) & ((1u << bits) - 1u);
}

// Code i (0-based) of a little-endian 32-bit word holding 32 / bits codes (bits = 2 or 4).
ONNXQ_HD uint32_t code_in_word(uint32_t word, int i, int bits) { return (word >> (i * bits)) & ((1u << bits) - 1u); }

// 32-bit little-endian word; the fast paths only call it at 4-byte aligned offsets of 4-byte aligned rows.
ONNXQ_HD uint32_t load_word_le(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(reinterpret_cast<const unsigned int*>(p));
#else
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) | (static_cast<uint32_t>(p[2]) << 16) |
         (static_cast<uint32_t>(p[3]) << 24);
#endif
}

// a / b for 0 <= a, 0 < b < 2^32 (K < 2^31 is checked by the op): 32-bit division is far cheaper on GPUs.
ONNXQ_HD int64_t div_small(int64_t a, int64_t b) {
  return static_cast<int64_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(b));
}

// w = s * q + z (fused where the hardware fuses; a software fmaf would be slow)
ONNXQ_HD float dequant(float scale, float zero, uint32_t code) {
#if defined(__CUDA_ARCH__) || defined(__FMA__)
  return fmaf(scale, static_cast<float>(code), zero);
#else
  return scale * static_cast<float>(code) + zero;
#endif
}

// Dequantized weight w[n, k].
template <class T>
ONNXQ_HD float weight_at(const uint8_t* b, const T* scales, const T* zeros, int64_t n, int64_t k, int64_t groups,
                         int64_t group_size, int bits) {
  const int64_t g = div_small(k, group_size);
  const int64_t bpg = bytes_per_group(group_size, bits);
  const uint32_t q = code_in_group(b + (n * groups + g) * bpg, k - g * group_size, bits);
  return dequant(to_float(scales[n * groups + g]), to_float(zeros[n * groups + g]), q);
}

// Problem description passed to the tile functions below (pointers are device or host memory).
template <class T>
struct LowBitProblem {
  const T* a;          // [M, K] row-major, leading dimension K
  const uint8_t* b;    // [N, G, bytes_per_group]
  const T* scales;     // [N, G]
  const T* zeros;      // [N, G]
  const T* bias;       // [N] or nullptr
  T* y;                // [M, N]
  int64_t m, n, k, group_size;
  int bits;
};

// ---------------------------------------------------------------------------------------------
// GEMV (M <= 8): one warp per output column n; lane `lane` of `lanes` accumulates a strided slice of K.
// ---------------------------------------------------------------------------------------------
template <class T, int M>
ONNXQ_HD void gemv_lane_partial(const LowBitProblem<T>& p, int64_t n, int lane, int lanes, float acc[M]) {
  for (int r = 0; r < M; ++r) acc[r] = 0.f;
  const int64_t groups = num_groups(p.k, p.group_size);
  const int64_t bpg = bytes_per_group(p.group_size, p.bits);
  const uint8_t* row = p.b + n * groups * bpg;
  const T* srow = p.scales + n * groups;
  const T* zrow = p.zeros + n * groups;
  if (word_aligned_layout(p.group_size, p.bits)) {
    const int codes_per_word = 32 / p.bits;
    const int64_t words_per_group = p.group_size / codes_per_word;
    const int64_t words = groups * words_per_group;
    for (int64_t w = lane; w < words; w += lanes) {
      const int64_t g = div_small(w, words_per_group);
      const int64_t k0 = w * codes_per_word;
      if (k0 >= p.k) break;
      const uint32_t word = load_word_le(row + g * bpg + (w - g * words_per_group) * 4);
      const float s = to_float(srow[g]);
      const float z = to_float(zrow[g]);
      const int valid = p.k - k0 < codes_per_word ? static_cast<int>(p.k - k0) : codes_per_word;
      for (int i = 0; i < valid; ++i) {
        const float wv = dequant(s, z, code_in_word(word, i, p.bits));
        for (int r = 0; r < M; ++r) acc[r] = fmaf(to_float(p.a[r * p.k + k0 + i]), wv, acc[r]);
      }
    }
  } else {
    for (int64_t k = lane; k < p.k; k += lanes) {
      const int64_t g = div_small(k, p.group_size);
      const uint32_t q = code_in_group(row + g * bpg, k - g * p.group_size, p.bits);
      const float wv = dequant(to_float(srow[g]), to_float(zrow[g]), q);
      for (int r = 0; r < M; ++r) acc[r] = fmaf(to_float(p.a[r * p.k + k]), wv, acc[r]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tiled GEMM (M > 8): a block of kGemmThreads threads computes a kTileM x kTileN tile of Y; per K step it
// stages kTileK columns of A and a dequantized kTileK x kTileN tile of W in shared memory (as float).
// Thread t owns the 4x4 sub-tile (rows (t / 16) * 4 .., cols (t % 16) * 4 ..).
// ---------------------------------------------------------------------------------------------
constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 16;
constexpr int kGemmThreads = 256;
constexpr int kMicro = 4;

// a_tile[kk * kTileM + r] = A[m0 + r, k0 + kk] (0 outside A).
template <class T>
ONNXQ_HD void gemm_load_a_tile(const LowBitProblem<T>& p, int tid, int64_t m0, int64_t k0, float* a_tile) {
  for (int idx = tid; idx < kTileM * kTileK; idx += kGemmThreads) {
    const int r = idx / kTileK;
    const int kk = idx % kTileK;
    const int64_t m = m0 + r;
    const int64_t k = k0 + kk;
    a_tile[kk * kTileM + r] = (m < p.m && k < p.k) ? to_float(p.a[m * p.k + k]) : 0.f;
  }
}

// w_tile[kk * kTileN + c] = w[n0 + c, k0 + kk] (0 outside W).
template <class T>
ONNXQ_HD void gemm_load_w_tile(const LowBitProblem<T>& p, int tid, int64_t n0, int64_t k0, float* w_tile) {
  const int64_t groups = num_groups(p.k, p.group_size);
  for (int idx = tid; idx < kTileN * kTileK; idx += kGemmThreads) {
    const int c = idx / kTileK;
    const int kk = idx % kTileK;
    const int64_t n = n0 + c;
    const int64_t k = k0 + kk;
    w_tile[kk * kTileN + c] =
        (n < p.n && k < p.k) ? weight_at(p.b, p.scales, p.zeros, n, k, groups, p.group_size, p.bits) : 0.f;
  }
}

// acc[i][j] += sum_kk a_tile[kk, row_i] * w_tile[kk, col_j] for this thread's 4x4 sub-tile.
ONNXQ_HD void gemm_accumulate_tile(int tid, const float* a_tile, const float* w_tile, float acc[kMicro][kMicro]) {
  const int row0 = (tid / (kTileN / kMicro)) * kMicro;
  const int col0 = (tid % (kTileN / kMicro)) * kMicro;
  for (int kk = 0; kk < kTileK; ++kk) {
    float av[kMicro];
    float wv[kMicro];
    for (int i = 0; i < kMicro; ++i) av[i] = a_tile[kk * kTileM + row0 + i];
    for (int j = 0; j < kMicro; ++j) wv[j] = w_tile[kk * kTileN + col0 + j];
    for (int i = 0; i < kMicro; ++i)
      for (int j = 0; j < kMicro; ++j) acc[i][j] = fmaf(av[i], wv[j], acc[i][j]);
  }
}

// Writes acc (+ bias) of this thread's sub-tile; `store(index, value)` converts to T.
template <class T, class Store>
ONNXQ_HD void gemm_store_tile(const LowBitProblem<T>& p, int tid, int64_t m0, int64_t n0, const float acc[kMicro][kMicro],
                              Store store) {
  const int row0 = (tid / (kTileN / kMicro)) * kMicro;
  const int col0 = (tid % (kTileN / kMicro)) * kMicro;
  for (int i = 0; i < kMicro; ++i) {
    const int64_t m = m0 + row0 + i;
    if (m >= p.m) break;
    for (int j = 0; j < kMicro; ++j) {
      const int64_t n = n0 + col0 + j;
      if (n >= p.n) break;
      const float bias = p.bias ? to_float(p.bias[n]) : 0.f;
      store(m * p.n + n, acc[i][j] + bias);
    }
  }
}

}  // namespace onnxq
