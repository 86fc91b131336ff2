// Host test of common/lowbit_math.h: runs the CUDA kernels' per-thread functions (GEMV lanes, GEMM tile
// load / accumulate / store) on the CPU with the same block and thread decomposition, for float and float16
// data, and compares with a float64 reference built from an independent bit packer.  Exit code 0 = pass.
#include <math.h>
#include <stdint.h>
#include <stdio.h>

#include <random>
#include <vector>

#include "../src/common/lowbit_math.h"
#include "../src/cpu/half_convert.h"

namespace onnxq {
struct HostHalf {
  uint16_t bits;
};
static inline float to_float(HostHalf h) { return cpu::half_bits_to_float(h.bits); }
}  // namespace onnxq

namespace {

using onnxq::HostHalf;

template <class T>
T from_float(float v);
template <>
float from_float<float>(float v) { return v; }
template <>
HostHalf from_float<HostHalf>(float v) { return HostHalf{onnxq::cpu::float_to_half_bits(v)}; }

struct Case {
  int64_t m, n, k, group_size;
  int bits;
};

// Independent LSB-first packer: bit i of the stream of group g is bit (i % bits) of code i / bits.
std::vector<uint8_t> pack(const std::vector<uint32_t>& codes, int64_t n, int64_t k, int64_t group_size, int bits) {
  const int64_t groups = (k + group_size - 1) / group_size;
  const int64_t bpg = (group_size * bits + 7) / 8;
  std::vector<uint8_t> out(static_cast<size_t>(n * groups * bpg), 0);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < k; ++c) {
      const int64_t g = c / group_size, j = c % group_size;
      for (int b = 0; b < bits; ++b) {
        const int64_t bit = j * bits + b;
        if ((codes[r * k + c] >> b) & 1u) out[(r * groups + g) * bpg + bit / 8] |= static_cast<uint8_t>(1u << (bit % 8));
      }
    }
  return out;
}

struct Stores {
  std::vector<float>* y;
  void operator()(int64_t index, float value) const { (*y)[index] = value; }
};

template <class T, int M>
void emulate_gemv(const onnxq::LowBitProblem<T>& p, std::vector<float>& y) {
  for (int64_t n = 0; n < p.n; ++n) {
    float total[M] = {};
    for (int lane = 0; lane < 32; ++lane) {
      float acc[M];
      onnxq::gemv_lane_partial<T, M>(p, n, lane, 32, acc);
      for (int r = 0; r < M; ++r) total[r] += acc[r];
    }
    const float bias = p.bias ? onnxq::to_float(p.bias[n]) : 0.f;
    for (int r = 0; r < M; ++r) y[r * p.n + n] = total[r] + bias;
  }
}

template <class T>
void emulate_gemm(const onnxq::LowBitProblem<T>& p, std::vector<float>& y) {
  using namespace onnxq;
  std::vector<float> a_tile(kTileK * kTileM), w_tile(kTileK * kTileN);
  std::vector<float> acc(static_cast<size_t>(kGemmThreads) * kMicro * kMicro);
  for (int64_t m0 = 0; m0 < p.m; m0 += kTileM)
    for (int64_t n0 = 0; n0 < p.n; n0 += kTileN) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t k0 = 0; k0 < p.k; k0 += kTileK) {
        for (int tid = 0; tid < kGemmThreads; ++tid) gemm_load_a_tile(p, tid, m0, k0, a_tile.data());
        for (int tid = 0; tid < kGemmThreads; ++tid) gemm_load_w_tile(p, tid, n0, k0, w_tile.data());
        for (int tid = 0; tid < kGemmThreads; ++tid)
          gemm_accumulate_tile(tid, a_tile.data(), w_tile.data(),
                               reinterpret_cast<float(*)[kMicro]>(acc.data() + tid * kMicro * kMicro));
      }
      for (int tid = 0; tid < kGemmThreads; ++tid)
        gemm_store_tile(p, tid, m0, n0, reinterpret_cast<const float(*)[kMicro]>(acc.data() + tid * kMicro * kMicro),
                        Stores{&y});
    }
}

template <class T>
bool run_case(const Case& c, bool with_bias, std::mt19937& rng) {
  const int64_t groups = (c.k + c.group_size - 1) / c.group_size;
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  std::uniform_int_distribution<uint32_t> code_dist(0, (1u << c.bits) - 1u);
  // Values are rounded through T so the float64 reference sees exactly what the kernel sees.
  std::vector<T> a(c.m * c.k), scales(c.n * groups), zeros(c.n * groups), bias(c.n);
  std::vector<uint32_t> codes(c.n * c.k);
  for (auto& v : a) v = from_float<T>(uniform(rng));
  for (auto& v : scales) v = from_float<T>(0.05f + 0.1f * fabsf(uniform(rng)));
  for (auto& v : zeros) v = from_float<T>(0.2f * uniform(rng));
  for (auto& v : bias) v = from_float<T>(uniform(rng));
  for (auto& q : codes) q = code_dist(rng);
  const std::vector<uint8_t> packed = pack(codes, c.n, c.k, c.group_size, c.bits);

  // Independent decoder check over every code.
  const int64_t bpg = onnxq::bytes_per_group(c.group_size, c.bits);
  for (int64_t r = 0; r < c.n; ++r)
    for (int64_t col = 0; col < c.k; ++col) {
      const int64_t g = col / c.group_size;
      const uint32_t q = onnxq::code_in_group(packed.data() + (r * groups + g) * bpg, col % c.group_size, c.bits);
      if (q != codes[r * c.k + col]) {
        printf("FAIL code_in_group bits=%d group=%lld n=%lld k=%lld: %u != %u\n", c.bits, (long long)c.group_size,
               (long long)r, (long long)col, q, codes[r * c.k + col]);
        return false;
      }
    }

  std::vector<double> ref(c.m * c.n);
  double ref_max = 0.0;
  for (int64_t i = 0; i < c.m; ++i)
    for (int64_t r = 0; r < c.n; ++r) {
      double sum = with_bias ? onnxq::to_float(bias[r]) : 0.0;
      for (int64_t col = 0; col < c.k; ++col) {
        const int64_t g = col / c.group_size;
        const double w = static_cast<double>(onnxq::to_float(scales[r * groups + g])) * codes[r * c.k + col] +
                         onnxq::to_float(zeros[r * groups + g]);
        sum += static_cast<double>(onnxq::to_float(a[i * c.k + col])) * w;
      }
      ref[i * c.n + r] = sum;
      ref_max = fmax(ref_max, fabs(sum));
    }

  onnxq::LowBitProblem<T> p;
  p.a = a.data();
  p.b = packed.data();
  p.scales = scales.data();
  p.zeros = zeros.data();
  p.bias = with_bias ? bias.data() : nullptr;
  p.y = nullptr;
  p.m = c.m;
  p.n = c.n;
  p.k = c.k;
  p.group_size = c.group_size;
  p.bits = c.bits;
  std::vector<float> y(c.m * c.n, NAN);
  if (c.m <= 8) {
    switch (c.m) {
      case 1: emulate_gemv<T, 1>(p, y); break;
      case 3: emulate_gemv<T, 3>(p, y); break;
      default: emulate_gemv<T, 8>(p, y); break;
    }
  }
  std::vector<float> y_gemm(c.m * c.n, NAN);
  emulate_gemm(p, y_gemm);
  for (int pass = 0; pass < 2; ++pass) {
    const std::vector<float>& out = pass == 0 ? y_gemm : y;
    if (pass == 1 && c.m > 8) break;
    double err = 0.0;
    for (size_t i = 0; i < out.size(); ++i) err = fmax(err, fabs(out[i] - ref[i]));  // NaN-safe via !(err <= tol)
    bool any_nan = false;
    for (float v : out) any_nan |= isnan(v);
    if (any_nan || !(err <= 1e-5 * fmax(ref_max, 1e-30))) {
      printf("FAIL %s %s m=%lld n=%lld k=%lld group=%lld bits=%d bias=%d: max error %.3g (max |ref| %.3g)%s\n",
             pass == 0 ? "gemm" : "gemv", sizeof(T) == 4 ? "float" : "half", (long long)c.m, (long long)c.n,
             (long long)c.k, (long long)c.group_size, c.bits, with_bias, err, ref_max, any_nan ? " NaN" : "");
      return false;
    }
  }
  return true;
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  const Case cases[] = {
      {1, 33, 100, 16, 2},  {3, 7, 64, 64, 2},    {8, 5, 130, 32, 2},   {9, 33, 100, 16, 2},  {70, 67, 200, 64, 2},
      {1, 33, 100, 16, 4},  {3, 7, 130, 32, 4},   {8, 5, 64, 64, 4},    {33, 65, 100, 16, 4}, {1, 9, 100, 8, 3},
      {3, 9, 77, 24, 3},    {40, 3, 77, 24, 3},   {1, 5, 50, 16, 8},    {12, 5, 50, 16, 8},   {1, 11, 96, 12, 2},
      {20, 11, 96, 12, 2},  {1, 9, 37, 37, 4},    {65, 70, 129, 128, 2}};
  int passed = 0, total = 0;
  for (const Case& c : cases)
    for (int bias = 0; bias < 2; ++bias) {
      total += 2;
      passed += run_case<float>(c, bias != 0, rng);
      passed += run_case<HostHalf>(c, bias != 0, rng);
    }
  printf("host_math_test: %d/%d cases passed\n", passed, total);
  return passed == total ? 0 : 1;
}
