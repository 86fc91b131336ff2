// Column sweeps of the weight solvers (onnxq/solvers/sweeps.py), compiled: the same float64 operations in the same
// order as the numpy twins there, so both give the same bits (built with -ffp-contract=off: no fused multiply-add).
//
// Layout: every [K, n] array is C-contiguous in processing order, row c holding column c of all n weight rows.
// Plain C ABI for ctypes; no ONNX Runtime dependency.
#include <cmath>
#include <cstdint>

namespace {

// One row (a column of the weight, all n of its rows) of a grid: q = s·(a − zp) + z; mask: 1 where a = zp is forced.
struct GridRow {
  const double* s;
  const double* zp;
  const double* z;
  const double* inv;  // 1/s, 0 where s = 0
  const uint8_t* m;   // or null

  GridRow(const double* scales, const double* zero_points, const double* float_zeros, const double* inverse_scales,
          const uint8_t* mask, int64_t offset)
      : s(scales + offset), zp(zero_points + offset), z(float_zeros + offset), inv(inverse_scales + offset),
        m(mask ? mask + offset : nullptr) {}

  // onnxq.solvers.grid.nearest_codes: clip(rint((x − z)·(1/s)) + zp, 0, L) with np.maximum/np.minimum (NaN passes,
  // ties keep the first operand), masked and NaN entries → zp
  double nearest(int64_t r, double x, double levels) const {
    double v = x - z[r];
    v *= inv[r];
    v = std::rint(v);
    v = v + zp[r];
    if (!std::isnan(v)) {
      v = v >= 0.0 ? v : 0.0;
      v = v <= levels ? v : levels;
    }
    if (m && m[r]) v = zp[r];
    if (std::isnan(v)) v = zp[r];
    return v;
  }

  // s·(a − zp) + z
  double value(int64_t r, double a) const { return s[r] * (a - zp[r]) + z[r]; }
};

}  // namespace

// One build for every x86-64 CPU: GCC/Clang compile each kernel for AVX-512, AVX2 and baseline SSE2 and pick one at
// load time.  The operations are the same elementwise IEEE ones in every version, so the bits are too.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(ONNXQ_NO_CLONES)
#define ONNXQ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ONNXQ_CLONES
#endif

extern "C" {

// GPTQ: columns [c0, c1) of a sub-block ending at j2 (c1 <= j2).  Per column c and row r:
//   a = GridRow::nearest(w) (onnxq.solvers.grid.nearest_codes);  code = a;  q = s·(a − zp) + z
//   e = (w − q)·(1/U[c,c]);  loss += e²;  w_j −= U[c,j]·e for c < j < j2
// work, scales, zero_points, float_zeros, inverse_scales: [K, n]; mask: [K, n] bytes or null; upper: [K, K];
// codes: [K, n] uint8; errors: rows of the current block, errors_row0 = the block's first position.
ONNXQ_CLONES void onnxq_gptq_columns(double* work, const double* upper, int64_t k, int64_t n, const double* scales,
                        const double* zero_points, const double* float_zeros, const double* inverse_scales,
                        const uint8_t* mask, uint8_t* codes, double* errors, int64_t errors_row0, double* loss,
                        double levels, int64_t c0, int64_t c1, int64_t j2) {
  for (int64_t c = c0; c < c1; ++c) {
    const double* w = work + c * n;
    const GridRow grid(scales, zero_points, float_zeros, inverse_scales, mask, c * n);
    uint8_t* code = codes + c * n;
    double* err = errors + (c - errors_row0) * n;
    const double inv_diag = 1.0 / upper[c * k + c];
    for (int64_t r = 0; r < n; ++r) {
      const double a = grid.nearest(r, w[r], levels);
      code[r] = static_cast<uint8_t>(a);
      double e = w[r] - grid.value(r, a);
      e *= inv_diag;
      err[r] = e;
      loss[r] += e * e;
    }
    for (int64_t j = c + 1; j < j2; ++j) {
      const double u = upper[c * k + j];
      double* wj = work + j * n;
      for (int64_t r = 0; r < n; ++r) wj[r] -= u * err[r];
    }
  }
}

// Coordinate descent over the columns [i1, i2) of one block.  Per column c and row r (g: the block's gradient rows,
// updated eagerly within the block):
//   x = q_c − g/H_cc;  a = nearest code of x;  q' = s·(a − zp) + z;  d = q' − q_c;  Δ = d·(2g + d·H_cc)
//   Δ ≥ 0 → no move (d = 0);  change += Δ;  q_c += d;  moves_c = d;  g_j += H[c,j]·d for c < j < i2
// gradient (the block's rows only), values, codes, scales, zero_points, float_zeros, inverse_scales, moves:
// [i2 − i1, n]; mask: [i2 − i1, n] bytes or null; hessian: [K, K]; diag: H_cc of the block's columns.
ONNXQ_CLONES void onnxq_cd_block(double* gradient, const double* hessian, int64_t k, int64_t n, int64_t i1, int64_t i2,
                    double* values, double* codes, const double* scales, const double* zero_points,
                    const double* float_zeros, const double* inverse_scales, const uint8_t* mask, const double* diag,
                    double* moves, double* change, double levels) {
  const int64_t rows = i2 - i1;
  for (int64_t b = 0; b < rows; ++b) {
    const int64_t c = i1 + b;
    double* g = gradient + b * n;
    double* q = values + b * n;
    double* a = codes + b * n;
    const GridRow grid(scales, zero_points, float_zeros, inverse_scales, mask, b * n);
    double* d_out = moves + b * n;
    const double h = diag[b];
    for (int64_t r = 0; r < n; ++r) {
      const double v = grid.nearest(r, q[r] - g[r] / h, levels);
      const double value = grid.value(r, v);
      double d = value - q[r];
      double t = 2.0 * g[r];
      t = t + d * h;
      double step = d * t;
      const bool keep = step >= 0.0;
      if (keep) d = 0.0;
      change[r] = change[r] + (keep ? 0.0 : step);
      if (!keep) a[r] = v;
      q[r] += d;
      d_out[r] = d;
    }
    bool moved = false;
    for (int64_t r = 0; r < n; ++r) moved |= d_out[r] != 0.0;
    if (!moved) continue;  // g_j + H·0 = g_j: nothing to add (the numpy twin skips the same columns)
    const double* hc = hessian + c * k;
    for (int64_t j = b + 1; j < rows; ++j) {
      const double hj = hc[i1 + j];
      double* gj = gradient + j * n;
      for (int64_t r = 0; r < n; ++r) gj[r] += hj * d_out[r];
    }
  }
}

}  // extern "C"
