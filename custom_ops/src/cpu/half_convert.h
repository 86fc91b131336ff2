// Portable IEEE binary16 <-> binary32 conversion (round to nearest even), for CPUs without F16C.
#pragma once

#include <stdint.h>
#include <string.h>

namespace onnxq {
namespace cpu {

static inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  const uint32_t mantissa = h & 0x3FFu;
  uint32_t bits;
  if (exponent == 0) {
    // zero or subnormal: mantissa * 2^-24 is exact in fp32
    float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    memcpy(&bits, &magnitude, 4);
    bits |= sign;
  } else if (exponent == 31) {
    bits = sign | 0x7F800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  }
  float out;
  memcpy(&out, &bits, 4);
  return out;
}

static inline uint16_t float_to_half_bits(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7FFFFFFFu;
  if (x >= 0x7F800000u) return static_cast<uint16_t>(sign | (x > 0x7F800000u ? 0x7E00u : 0x7C00u));
  if (x >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to infinity
  if (x < 0x38800000u) {
    // result is subnormal or zero: adding 0.5 (ulp 2^-24) rounds to the half quantum, to nearest even
    float magnitude;
    memcpy(&magnitude, &x, 4);
    magnitude += 0.5f;
    uint32_t rounded;
    memcpy(&rounded, &magnitude, 4);
    return static_cast<uint16_t>(sign | (rounded - 0x3F000000u));
  }
  const uint32_t odd = (x >> 13) & 1u;
  x += 0xC8000FFFu + odd;  // rebias exponent (127 -> 15) and round to nearest even
  return static_cast<uint16_t>(sign | (x >> 13));
}

}  // namespace cpu
}  // namespace onnxq
