// Portable C++ instantiation of the MatMulLowBit kernels: 16-float vectors as plain arrays (the compiler
// vectorizes them for the baseline ISA).  It runs everywhere and exercises the same 16-lane code paths
// as the AVX-512 build.
#include <stdint.h>
#include <string.h>

#include "../common/lowbit_math.h"
#include "cpu_kernels.h"
#include "half_convert.h"

namespace {

struct V {
  static constexpr const char* kName = "portable";
  static constexpr int kMR = 4;
  static constexpr int kMaxWideRows = 8;

  struct F16 {
    float v[16];
  };
  using Narrow = F16;

  static F16 zero() {
    F16 r;
    for (int i = 0; i < 16; ++i) r.v[i] = 0.f;
    return r;
  }
  static F16 load(const float* p) {
    F16 r;
    memcpy(r.v, p, sizeof(r.v));
    return r;
  }
  static void store(float* p, const F16& x) { memcpy(p, x.v, sizeof(x.v)); }
  static F16 set1(float x) {
    F16 r;
    for (int i = 0; i < 16; ++i) r.v[i] = x;
    return r;
  }
  static F16 fma(const F16& a, const F16& b, const F16& c) {
    F16 r;
    for (int i = 0; i < 16; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
    return r;
  }
  static F16 add(const F16& a, const F16& b) {
    F16 r;
    for (int i = 0; i < 16; ++i) r.v[i] = a.v[i] + b.v[i];
    return r;
  }
  static float hsum(const F16& x) {
    float s[8];
    for (int i = 0; i < 8; ++i) s[i] = x.v[i] + x.v[i + 8];
    for (int i = 0; i < 4; ++i) s[i] += s[i + 4];
    return (s[0] + s[2]) + (s[1] + s[3]);
  }
  static Narrow nzero() { return zero(); }
  static Narrow nfma(const F16& a, const F16& b, const Narrow& c) { return fma(a, b, c); }
  static Narrow nadd(const Narrow& a, const Narrow& b) { return add(a, b); }
  static float nhsum(const Narrow& x) { return hsum(x); }

  struct Lut2 {
    float table[4];
  };
  static Lut2 lut2(float s, float z) {
    Lut2 l;
    for (int q = 0; q < 4; ++q) l.table[q] = s * static_cast<float>(q) + z;
    return l;
  }
  static F16 decode2(const uint8_t* p, const Lut2& l) {
    const uint32_t word = onnxq::load_word_le(p);
    F16 r;
    for (int i = 0; i < 16; ++i) r.v[i] = l.table[(word >> (2 * i)) & 3u];
    return r;
  }
  struct Lut4 {
    float s, z;
  };
  static Lut4 lut4(float s, float z) { return Lut4{s, z}; }
  static F16 decode4(const uint8_t* p, const Lut4& l) {
    F16 r;
    for (int i = 0; i < 16; ++i) {
      const uint32_t q = (p[i >> 1] >> (4 * (i & 1))) & 15u;
      r.v[i] = l.s * static_cast<float>(q) + l.z;
    }
    return r;
  }

  static void transpose16(const float* src, int64_t src_stride, float* dst) {
    for (int c = 0; c < 16; ++c)
      for (int r = 0; r < 16; ++r) dst[c * 16 + r] = src[r * src_stride + c];
  }

  static void store_transposed8(const F16* w, float* dst) {
    for (int i = 0; i < 16; ++i)
      for (int r = 0; r < 8; ++r) dst[i * 16 + r] = w[r].v[i];
  }

  static void half_to_float(const uint16_t* src, float* dst, size_t count) {
    for (size_t i = 0; i < count; ++i) dst[i] = onnxq::cpu::half_bits_to_float(src[i]);
  }
  static void float_to_half(const float* src, uint16_t* dst, size_t count) {
    for (size_t i = 0; i < count; ++i) dst[i] = onnxq::cpu::float_to_half_bits(src[i]);
  }
};

#include "kernels_impl.h"

}  // namespace

const onnxq::cpu::CpuKernelTable& onnxq::cpu::portable_kernels() { return kTable; }
