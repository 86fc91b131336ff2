// AVX-512F instantiation of the MatMulLowBit kernels (compiled with -mavx512f -mavx2 -mfma -mf16c).
// A 16-float vector is one zmm register; 2-bit codes are decoded with one variable shift and one in-lane
// table permute, 4-bit codes by nibble unpacking and widening.
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "../common/lowbit_math.h"
#include "cpu_kernels.h"
#include "transpose_avx2.h"

namespace {

struct V {
  static constexpr const char* kName = "avx512";
  static constexpr int kMR = 14;
  static constexpr int kMaxWideRows = 8;

  using F16 = __m512;
  using Narrow = __m512;

  static F16 zero() { return _mm512_setzero_ps(); }
  static F16 load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F16 x) { _mm512_storeu_ps(p, x); }
  static F16 set1(float x) { return _mm512_set1_ps(x); }
  static F16 fma(F16 a, F16 b, F16 c) { return _mm512_fmadd_ps(a, b, c); }
  static F16 add(F16 a, F16 b) { return _mm512_add_ps(a, b); }
  static float hsum(F16 x) {
    const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(x),
                                      _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
    return _mm_cvtss_f32(q);
  }
  static Narrow nzero() { return zero(); }
  static Narrow nfma(F16 a, F16 b, Narrow c) { return fma(a, b, c); }
  static Narrow nadd(Narrow a, Narrow b) { return add(a, b); }
  static float nhsum(Narrow x) { return hsum(x); }

  struct Lut2 {
    __m512 table;  // s*q + z for q = 0..3, in every 128-bit lane
  };
  static Lut2 lut2(float s, float z) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
    return Lut2{_mm512_fmadd_ps(_mm512_set1_ps(s), iota, _mm512_set1_ps(z))};
  }
  static F16 decode2(const uint8_t* p, const Lut2& l) {
    uint32_t word;
    memcpy(&word, p, 4);
    const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i idx = _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(word)), shifts);
    return _mm512_permutevar_ps(l.table, idx);
  }
  struct Lut4 {
    __m512 s, z;
  };
  static Lut4 lut4(float s, float z) { return Lut4{_mm512_set1_ps(s), _mm512_set1_ps(z)}; }
  static F16 decode4(const uint8_t* p, const Lut4& l) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i low = _mm_and_si128(bytes, mask);
    const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    const __m128i codes = _mm_unpacklo_epi8(low, high);  // code i in byte i
    const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes));
    return _mm512_fmadd_ps(q, l.s, l.z);
  }

  static void transpose16(const float* src, int64_t src_stride, float* dst) { transpose_16x16(src, src_stride, dst); }
  static __m256 low8(F16 x) { return _mm512_castps512_ps256(x); }
  static __m256 high8(F16 x) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)); }
  // dst[i * 16 + r] = element i of w[r], for r < 8, i < 16
  static void store_transposed8(const F16* w, float* dst) {
    store_transposed_8x8(low8(w[0]), low8(w[1]), low8(w[2]), low8(w[3]), low8(w[4]), low8(w[5]), low8(w[6]),
                         low8(w[7]), dst, 16);
    store_transposed_8x8(high8(w[0]), high8(w[1]), high8(w[2]), high8(w[3]), high8(w[4]), high8(w[5]), high8(w[6]),
                         high8(w[7]), dst + 8 * 16, 16);
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

const onnxq::cpu::CpuKernelTable& onnxq::cpu::avx512_kernels() { return kTable; }
