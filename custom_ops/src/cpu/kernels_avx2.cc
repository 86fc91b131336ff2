// AVX2 + FMA + F16C instantiation of the MatMulLowBit kernels (compiled with -mavx2 -mfma -mf16c).
// A 16-float vector is two ymm registers.  2-bit codes become weights with one variable shift and one
// in-lane table permute (vpermilps selects table[q] = s*q + z from the two low bits of each lane).
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "../common/lowbit_math.h"
#include "cpu_kernels.h"
#include "transpose_avx2.h"

namespace {

struct V {
  static constexpr const char* kName = "avx2";
  static constexpr int kMR = 6;
  static constexpr int kMaxWideRows = 4;

  struct F16 {
    __m256 lo, hi;
  };
  using Narrow = __m256;

  static F16 zero() { return F16{_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static F16 load(const float* p) { return F16{_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static void store(float* p, const F16& x) {
    _mm256_storeu_ps(p, x.lo);
    _mm256_storeu_ps(p + 8, x.hi);
  }
  static F16 set1(float x) {
    const __m256 b = _mm256_set1_ps(x);
    return F16{b, b};
  }
  static F16 fma(const F16& a, const F16& b, const F16& c) {
    return F16{_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
  }
  static F16 add(const F16& a, const F16& b) { return F16{_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
  static float hsum8(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
    return _mm_cvtss_f32(x);
  }
  static float hsum(const F16& x) { return hsum8(_mm256_add_ps(x.lo, x.hi)); }
  static Narrow nzero() { return _mm256_setzero_ps(); }
  static Narrow nfma(const F16& a, const F16& b, Narrow c) {
    return _mm256_fmadd_ps(a.hi, b.hi, _mm256_fmadd_ps(a.lo, b.lo, c));
  }
  static Narrow nadd(Narrow a, Narrow b) { return _mm256_add_ps(a, b); }
  static float nhsum(Narrow x) { return hsum8(x); }

  struct Lut2 {
    __m256 table;  // s*q + z for q = 0..3, in both 128-bit lanes
  };
  static Lut2 lut2(float s, float z) {
    return Lut2{_mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_setr_ps(0, 1, 2, 3, 0, 1, 2, 3), _mm256_set1_ps(z))};
  }
  static F16 decode2(const uint8_t* p, const Lut2& l) {
    uint32_t word;
    memcpy(&word, p, 4);
    const __m256i v = _mm256_set1_epi32(static_cast<int>(word));
    const __m256i lo = _mm256_srlv_epi32(v, _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14));
    const __m256i hi = _mm256_srlv_epi32(v, _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30));
    return F16{_mm256_permutevar_ps(l.table, lo), _mm256_permutevar_ps(l.table, hi)};
  }
  struct Lut4 {
    __m256 s, z;
  };
  static Lut4 lut4(float s, float z) { return Lut4{_mm256_set1_ps(s), _mm256_set1_ps(z)}; }
  static __m256 decode4_word(uint32_t word, const Lut4& l) {
    const __m256i shifted = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)),
                                              _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
    const __m256 q = _mm256_cvtepi32_ps(_mm256_and_si256(shifted, _mm256_set1_epi32(15)));
    return _mm256_fmadd_ps(q, l.s, l.z);
  }
  static F16 decode4(const uint8_t* p, const Lut4& l) {
    uint32_t w0, w1;
    memcpy(&w0, p, 4);
    memcpy(&w1, p + 4, 4);
    return F16{decode4_word(w0, l), decode4_word(w1, l)};
  }

  static void transpose16(const float* src, int64_t src_stride, float* dst) { transpose_16x16(src, src_stride, dst); }
  // dst[i * 16 + r] = element i of w[r], for r < 8, i < 16
  static void store_transposed8(const F16* w, float* dst) {
    store_transposed_8x8(w[0].lo, w[1].lo, w[2].lo, w[3].lo, w[4].lo, w[5].lo, w[6].lo, w[7].lo, dst, 16);
    store_transposed_8x8(w[0].hi, w[1].hi, w[2].hi, w[3].hi, w[4].hi, w[5].hi, w[6].hi, w[7].hi, dst + 8 * 16, 16);
  }

  static void half_to_float(const uint16_t* src, float* dst, size_t count) {
    size_t i = 0;
    for (; i + 8 <= count; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
    for (; i < count; ++i) dst[i] = _cvtsh_ss(src[i]);
  }
  static void float_to_half(const float* src, uint16_t* dst, size_t count) {
    size_t i = 0;
    for (; i + 8 <= count; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < count; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
  }
};

#include "kernels_impl.h"

}  // namespace

const onnxq::cpu::CpuKernelTable& onnxq::cpu::avx2_kernels() { return kTable; }
