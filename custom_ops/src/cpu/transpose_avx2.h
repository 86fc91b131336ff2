// 16x16 float transpose with AVX2 shuffles (four 8x8 blocks), for the AVX2 and AVX-512 kernel builds.
#pragma once

#include <immintrin.h>
#include <stdint.h>

namespace {

// dst[c * dst_stride + r] = lane c of row r, for r, c < 8 (rows in registers).
inline void store_transposed_8x8(__m256 r0, __m256 r1, __m256 r2, __m256 r3, __m256 r4, __m256 r5, __m256 r6,
                                 __m256 r7, float* dst, int64_t dst_stride) {
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + dst_stride, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * dst_stride, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * dst_stride, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * dst_stride, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * dst_stride, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * dst_stride, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * dst_stride, _mm256_permute2f128_ps(u3, u7, 0x31));
}

// dst[c * dst_stride + r] = src[r * src_stride + c] for r, c < 8.
inline void transpose_8x8(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
  store_transposed_8x8(_mm256_loadu_ps(src), _mm256_loadu_ps(src + src_stride), _mm256_loadu_ps(src + 2 * src_stride),
                       _mm256_loadu_ps(src + 3 * src_stride), _mm256_loadu_ps(src + 4 * src_stride),
                       _mm256_loadu_ps(src + 5 * src_stride), _mm256_loadu_ps(src + 6 * src_stride),
                       _mm256_loadu_ps(src + 7 * src_stride), dst, dst_stride);
}

// dst[c * 16 + r] = src[r * src_stride + c] for r, c < 16.
inline void transpose_16x16(const float* src, int64_t src_stride, float* dst) {
  transpose_8x8(src, src_stride, dst, 16);
  transpose_8x8(src + 8, src_stride, dst + 8 * 16, 16);
  transpose_8x8(src + 8 * src_stride, src_stride, dst + 8, 16);
  transpose_8x8(src + 8 * src_stride + 8, src_stride, dst + 8 * 16 + 8, 16);
}

}  // namespace
