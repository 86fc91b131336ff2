// Kernels of onnxq::MatMulLowBit, written once over a 16-float vector backend V and compiled per ISA.
// Include inside an anonymous namespace, after defining V (see kernels_portable.cc, kernels_avx2.cc, ...).
//
// Backend V provides:
//   F16 (16 floats), Narrow (one register of partial sums), kMR (GEMM micro-kernel rows),
//   kMaxWideRows (GEMV row count up to which F16 accumulators are used), and
//   zero/load/store/set1/fma/add/hsum on F16, nzero/nfma/nadd/nhsum on Narrow,
//   Lut2 lut2(s, z) + F16 decode2(const uint8_t* 4 bytes, Lut2)   -> s * q + z for 16 2-bit codes,
//   Lut4 lut4(s, z) + F16 decode4(const uint8_t* 8 bytes, Lut4)   -> s * q + z for 16 4-bit codes,
//   transpose16(src, src_stride, dst): dst[c * 16 + r] = src[r * src_stride + c] for r, c < 16,
//   store_transposed8(const F16 w[8], dst): dst[i * 16 + r] = w[r][i] for r < 8, i < 16,
//   half_to_float / float_to_half over arrays.
//
// Algorithms
//   M <= 8 (GEMV): for each output column n, codes are decoded in registers 16 at a time straight to
//     w = s*q + z and multiplied into M accumulators; B is never written to memory in fp32.
//   M > 8 (GEMM): a task owns a range of 16-column panels of Y; for each block of kKB reduction steps it
//     dequantizes a [kKB x 16] fp32 panel of W (L1 sized) and runs a register-blocked kMR x 16 micro-kernel
//     over all rows of A (the A block stays in L2).

constexpr int64_t kNR = 16;   // GEMM panel width (one F16)
constexpr int64_t kKB = 512;  // GEMM reduction block
constexpr int64_t kGemmTasksTarget = 32;
constexpr int64_t kGemvTasksTarget = 64;

static inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <int BITS>
struct Codec;

template <>
struct Codec<2> {
  using Lut = V::Lut2;
  static constexpr int64_t kChunkBytes = 4;  // 16 codes
  static Lut lut(float s, float z) { return V::lut2(s, z); }
  static V::F16 decode(const uint8_t* p, const Lut& l) { return V::decode2(p, l); }
};

template <>
struct Codec<4> {
  using Lut = V::Lut4;
  static constexpr int64_t kChunkBytes = 8;
  static Lut lut(float s, float z) { return V::lut4(s, z); }
  static V::F16 decode(const uint8_t* p, const Lut& l) { return V::decode4(p, l); }
};

// Accumulator policy: F16 accumulators (two independent registers per chunk on AVX2) for few rows,
// one register per row (Narrow) when M rows would not fit in the register file otherwise.
template <bool kWide>
struct Acc;

template <>
struct Acc<true> {
  using T = V::F16;
  static T zero() { return V::zero(); }
  static T fma(V::F16 a, V::F16 w, T acc) { return V::fma(a, w, acc); }
  static T add(T x, T y) { return V::add(x, y); }
  static float hsum(T x) { return V::hsum(x); }
};

template <>
struct Acc<false> {
  using T = V::Narrow;
  static T zero() { return V::nzero(); }
  static T fma(V::F16 a, V::F16 w, T acc) { return V::nfma(a, w, acc); }
  static T add(T x, T y) { return V::nadd(x, y); }
  static float hsum(T x) { return V::nhsum(x); }
};

// ------------------------------------------------------------------------------------------------
// GEMV: columns [n0, n1) of Y for M <= 8 rows; requires group_size % 16 == 0 and bits in {2, 4}.
// CH independent accumulator chains per row hide the FMA latency when M is small.
// ------------------------------------------------------------------------------------------------
template <int BITS, int M, int CH>
void gemv_columns(const onnxq::cpu::MatMulArgs& p, int64_t n0, int64_t n1) {
  using C = Codec<BITS>;
  using P = Acc<(M <= V::kMaxWideRows)>;
  const int64_t bpg = p.group_size * BITS / 8;
  const int64_t chunks_per_group = p.group_size / 16;
  for (int64_t n = n0; n < n1; ++n) {
    typename P::T acc[M][CH];
    for (int m = 0; m < M; ++m)
      for (int u = 0; u < CH; ++u) acc[m][u] = P::zero();
    const uint8_t* row = p.b + n * p.groups * bpg;
    const float* srow = p.scales + n * p.groups;
    const float* zrow = p.zeros + n * p.groups;
    for (int64_t g = 0; g < p.groups; ++g) {
      const typename C::Lut lut = C::lut(srow[g], zrow[g]);
      const uint8_t* group_bytes = row + g * bpg;
      const float* a_group = p.a + g * p.group_size;
      for (int64_t c = 0; c < chunks_per_group; c += CH) {
        for (int u = 0; u < CH; ++u) {
          const V::F16 w = C::decode(group_bytes + (c + u) * C::kChunkBytes, lut);
          const float* a_chunk = a_group + (c + u) * 16;
          for (int m = 0; m < M; ++m) acc[m][u] = P::fma(V::load(a_chunk + m * p.lda), w, acc[m][u]);
        }
      }
    }
    const float bias = p.bias ? p.bias[n] : 0.f;
    for (int m = 0; m < M; ++m) {
      typename P::T total = acc[m][0];
      for (int u = 1; u < CH; ++u) total = P::add(total, acc[m][u]);
      p.y[m * p.ldy + n] = P::hsum(total) + bias;
    }
  }
}

template <int BITS, int M>
void gemv_columns_any_chains(const onnxq::cpu::MatMulArgs& p, int64_t n0, int64_t n1) {
  const int64_t chunks_per_group = p.group_size / 16;
  if constexpr (M == 1) {
    if (chunks_per_group % 4 == 0) return gemv_columns<BITS, M, 4>(p, n0, n1);
  }
  if constexpr (M <= 2) {
    if (chunks_per_group % 2 == 0) return gemv_columns<BITS, M, 2>(p, n0, n1);
  }
  gemv_columns<BITS, M, 1>(p, n0, n1);
}

using GemvFn = void (*)(const onnxq::cpu::MatMulArgs&, int64_t, int64_t);

template <int BITS>
GemvFn gemv_for_rows(int64_t m) {
  switch (m) {
    case 1: return gemv_columns_any_chains<BITS, 1>;
    case 2: return gemv_columns_any_chains<BITS, 2>;
    case 3: return gemv_columns_any_chains<BITS, 3>;
    case 4: return gemv_columns_any_chains<BITS, 4>;
    case 5: return gemv_columns_any_chains<BITS, 5>;
    case 6: return gemv_columns_any_chains<BITS, 6>;
    case 7: return gemv_columns_any_chains<BITS, 7>;
    default: return gemv_columns_any_chains<BITS, 8>;
  }
}

struct GemvJob {
  const onnxq::cpu::MatMulArgs* args;
  GemvFn fn;
  int64_t columns_per_task;
};

void gemv_task(void* data, size_t task) {
  const GemvJob& job = *static_cast<const GemvJob*>(data);
  const int64_t n0 = static_cast<int64_t>(task) * job.columns_per_task;
  job.fn(*job.args, n0, min_i64(job.args->n, n0 + job.columns_per_task));
}

// ------------------------------------------------------------------------------------------------
// GEMM: dequantized panels + register-blocked micro-kernel.
// ------------------------------------------------------------------------------------------------

// c[r, 0:16] (+)= sum_{k < kb} a[r, k] * panel[k, 0:16] for r < R.
template <int R>
void micro_kernel(const float* a, int64_t lda, const float* panel, int64_t kb, float* c, int64_t ldc, bool accumulate) {
  V::F16 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = accumulate ? V::load(c + r * ldc) : V::zero();
  for (int64_t k = 0; k < kb; ++k) {
    const V::F16 b = V::load(panel + k * kNR);
    for (int r = 0; r < R; ++r) acc[r] = V::fma(V::set1(a[r * lda + k]), b, acc[r]);
  }
  for (int r = 0; r < R; ++r) V::store(c + r * ldc, acc[r]);
}

template <int R>
void micro_kernel_rows(int rows, const float* a, int64_t lda, const float* panel, int64_t kb, float* c, int64_t ldc,
                       bool accumulate) {
  if (rows == R) return micro_kernel<R>(a, lda, panel, kb, c, ldc, accumulate);
  if constexpr (R > 1) micro_kernel_rows<R - 1>(rows, a, lda, panel, kb, c, ldc, accumulate);
}

static inline void prefetch(const void* address) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(address, 0, 3);
#else
  (void)address;
#endif
}

// Start loading what dequantize_panel will read for columns [n0, n0 + 16) at reduction offset k0.
void prefetch_panel(const onnxq::cpu::MatMulArgs& p, int64_t n0, int64_t k0) {
  const int64_t bpg = onnxq::bytes_per_group(p.group_size, p.bits);
  const int64_t g = k0 / p.group_size;
  const int64_t offset = g * bpg + (k0 - g * p.group_size) * p.bits / 8;
  for (int64_t n = n0; n < min_i64(p.n, n0 + kNR); ++n) {
    prefetch(p.b + n * p.groups * bpg + offset);
    prefetch(p.scales + n * p.groups + g);
    prefetch(p.zeros + n * p.groups + g);
  }
}

// panel[kk, r] = w[n0 + r, k0 + kk] for kk < kb, r < 16 (0 beyond N).
// BITS = 2 or 4 (16-aligned groups): 8 columns are decoded per 16-code step and transposed in registers.
// BITS = 0: any layout, scalar decode through rows_tmp.
template <int BITS>
void dequantize_panel(const onnxq::cpu::MatMulArgs& p, int64_t n0, int64_t k0, int64_t kb, float* rows_tmp,
                      float* panel) {
  const int64_t bpg = onnxq::bytes_per_group(p.group_size, p.bits);
  if constexpr (BITS == 2 || BITS == 4) {
    using C = Codec<BITS>;
    (void)rows_tmp;
    for (int64_t half = 0; half < kNR; half += 8) {
      const uint8_t* rows[8];
      const float* srows[8];
      const float* zrows[8];
      for (int r = 0; r < 8; ++r) {
        const int64_t n = min_i64(n0 + half + r, p.n - 1);  // rows beyond N: decoded, then zeroed
        rows[r] = p.b + n * p.groups * bpg;
        srows[r] = p.scales + n * p.groups;
        zrows[r] = p.zeros + n * p.groups;
      }
      const int valid = static_cast<int>(min_i64(8, max_i64(0, p.n - n0 - half)));
      int64_t g = k0 / p.group_size;  // one division per panel; steps advance j by 16 inside the group
      int64_t j = k0 - g * p.group_size;
      for (int64_t kk = 0; kk < kb; kk += 16) {
        if (j == p.group_size) {
          j = 0;
          ++g;
        }
        const int64_t offset = g * bpg + j * BITS / 8;
        V::F16 w[8];
        for (int r = 0; r < 8; ++r) w[r] = C::decode(rows[r] + offset, C::lut(srows[r][g], zrows[r][g]));
        for (int r = valid; r < 8; ++r) w[r] = V::zero();
        V::store_transposed8(w, panel + kk * kNR + half);
        j += 16;
      }
    }
  } else {
    for (int64_t r = 0; r < kNR; ++r) {
      float* dst = rows_tmp + r * kKB;
      const int64_t n = n0 + r;
      if (n >= p.n) {
        for (int64_t kk = 0; kk < kb; ++kk) dst[kk] = 0.f;
        continue;
      }
      const uint8_t* row = p.b + n * p.groups * bpg;
      const float* srow = p.scales + n * p.groups;
      const float* zrow = p.zeros + n * p.groups;
      for (int64_t kk = 0; kk < kb; ++kk) {
        const int64_t k = k0 + kk;
        const int64_t g = k / p.group_size;
        const uint32_t q = onnxq::code_in_group(row + g * bpg, k - g * p.group_size, p.bits);
        dst[kk] = onnxq::dequant(srow[g], zrow[g], q);
      }
    }
    int64_t kk = 0;
    for (; kk + 16 <= kb; kk += 16) V::transpose16(rows_tmp + kk, kKB, panel + kk * kNR);
    for (; kk < kb; ++kk)
      for (int64_t r = 0; r < kNR; ++r) panel[kk * kNR + r] = rows_tmp[r * kKB + kk];
  }
}

using PanelFn = void (*)(const onnxq::cpu::MatMulArgs&, int64_t, int64_t, int64_t, float*, float*);

struct GemmPlan {
  int64_t n_padded;
  int64_t panels;
  int64_t panels_per_task;
  int64_t tasks;
};

GemmPlan plan_gemm(const onnxq::cpu::MatMulArgs& p) {
  GemmPlan plan;
  plan.panels = ceil_div(p.n, kNR);
  plan.n_padded = plan.panels * kNR;
  plan.panels_per_task = max_i64(1, ceil_div(plan.panels, kGemmTasksTarget));
  plan.tasks = ceil_div(plan.panels, plan.panels_per_task);
  return plan;
}

constexpr int64_t kTaskScratchFloats = 2 * kNR * kKB;

struct GemmJob {
  const onnxq::cpu::MatMulArgs* args;
  GemmPlan plan;
  PanelFn dequantize;
  float* c;        // [M, n_padded]
  float* scratch;  // tasks * kTaskScratchFloats
};

void gemm_task(void* data, size_t task) {
  const GemmJob& job = *static_cast<const GemmJob*>(data);
  const onnxq::cpu::MatMulArgs& p = *job.args;
  float* rows_tmp = job.scratch + static_cast<int64_t>(task) * kTaskScratchFloats;
  float* panel = rows_tmp + kNR * kKB;
  const int64_t first_panel = static_cast<int64_t>(task) * job.plan.panels_per_task;
  const int64_t last_panel = min_i64(job.plan.panels, first_panel + job.plan.panels_per_task);
  const int64_t k_padded = p.groups * p.group_size;
  const int64_t ldc = job.plan.n_padded;
  for (int64_t k0 = 0; k0 < k_padded; k0 += kKB) {
    const int64_t kb = min_i64(kKB, k_padded - k0);
    for (int64_t pi = first_panel; pi < last_panel; ++pi) {
      const int64_t n0 = pi * kNR;
      if (pi + 1 < last_panel) prefetch_panel(p, n0 + kNR, k0);
      job.dequantize(p, n0, k0, kb, rows_tmp, panel);
      for (int64_t m0 = 0; m0 < p.m; m0 += V::kMR) {
        const int rows = static_cast<int>(min_i64(V::kMR, p.m - m0));
        micro_kernel_rows<V::kMR>(rows, p.a + m0 * p.lda + k0, p.lda, panel, kb, job.c + m0 * ldc + n0, ldc, k0 > 0);
      }
    }
  }
  const int64_t n_begin = first_panel * kNR;
  const int64_t n_end = min_i64(p.n, last_panel * kNR);
  for (int64_t m = 0; m < p.m; ++m) {
    const float* c_row = job.c + m * ldc;
    float* y_row = p.y + m * p.ldy;
    for (int64_t n = n_begin; n < n_end; ++n) y_row[n] = c_row[n] + (p.bias ? p.bias[n] : 0.f);
  }
}

// ------------------------------------------------------------------------------------------------
// Entry points
// ------------------------------------------------------------------------------------------------
bool use_gemv(const onnxq::cpu::MatMulArgs& p) {
  return p.m <= 8 && onnxq::word_aligned_layout(p.group_size, p.bits);
}

size_t scratch_floats(const onnxq::cpu::MatMulArgs& p) {
  if (use_gemv(p)) return 0;
  const GemmPlan plan = plan_gemm(p);
  return static_cast<size_t>(p.m * plan.n_padded + plan.tasks * kTaskScratchFloats);
}

void matmul(const onnxq::cpu::MatMulArgs& p, const onnxq::cpu::Runner& runner, float* scratch) {
  if (p.m <= 0 || p.n <= 0) return;
  if (use_gemv(p)) {
    GemvJob job;
    job.args = &p;
    job.fn = p.bits == 2 ? gemv_for_rows<2>(p.m) : gemv_for_rows<4>(p.m);
    job.columns_per_task = max_i64(16, ceil_div(ceil_div(p.n, kGemvTasksTarget), 16) * 16);
    runner.parallel_for(runner.context, static_cast<size_t>(ceil_div(p.n, job.columns_per_task)), gemv_task, &job);
    return;
  }
  GemmJob job;
  job.args = &p;
  job.plan = plan_gemm(p);
  const bool aligned = onnxq::word_aligned_layout(p.group_size, p.bits);
  job.dequantize = !aligned ? dequantize_panel<0> : (p.bits == 2 ? dequantize_panel<2> : dequantize_panel<4>);
  job.c = scratch;
  job.scratch = scratch + p.m * job.plan.n_padded;
  runner.parallel_for(runner.context, static_cast<size_t>(job.plan.tasks), gemm_task, &job);
}

const onnxq::cpu::CpuKernelTable kTable = {V::kName, scratch_floats, matmul, V::half_to_float, V::float_to_half};
