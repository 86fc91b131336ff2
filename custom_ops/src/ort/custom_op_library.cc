// ONNX Runtime custom-operator library: domain "onnxq", op "MatMulLowBit".
//
//   Y = A · dequant(B)ᵀ (+ bias),  w[n, k] = scales[n, k / group_size] · q[n, k] + zeros[n, k / group_size]
//
// Inputs: A (float or float16, [..., K]), B (uint8 [N, G, ceil(group_size·bits/8)]), scales and zeros ([N, G], A's
// type), optional bias ([N], A's type).  Attributes: K, N, bits (2, 3, 4 or 8), group_size.  Output: [..., N].
// Layout reference: docs/custom_ops.md.  Written against the plain C API (ORT_API_VERSION of the fetched headers),
// so no C++ exception ever crosses into ONNX Runtime.
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <new>
#include <atomic>
#include <string>
#include <vector>

#include "../common/lowbit_math.h"
#include "../cpu/cpu_kernels.h"
#include "onnxruntime_c_api.h"
#if defined(ONNXQ_WITH_CUDA)
#include "../cuda/cuda_launch.h"
#endif

#if defined(_WIN32)
#define ONNXQ_EXPORT __declspec(dllexport)
#else
#define ONNXQ_EXPORT __attribute__((visibility("default")))
#endif

namespace {

const OrtApi* g_api = nullptr;

constexpr const char* kDomain = "onnxq";
constexpr const char* kOpName = "MatMulLowBit";
constexpr size_t kInputCount = 5;  // A, B, scales, zeros, bias (optional)
constexpr const char* kIsaEnv = "ONNXQ_CPU_ISA";

#define ONNXQ_RETURN_IF_ERROR(expr) \
  do {                              \
    OrtStatus* status_ = (expr);    \
    if (status_) return status_;    \
  } while (0)

OrtStatus* make_error(OrtErrorCode code, const std::string& message) {
  return g_api->CreateStatus(code, message.c_str());
}

struct Kernel {
  int64_t k = 0, n = 0, bits = 0, group_size = 0, groups = 0, bytes_per_group = 0;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  bool cuda = false;
  const onnxq::cpu::CpuKernelTable* cpu = nullptr;
  std::string where;  // "MatMulLowBit node 'name'" for error messages
};

struct OpDef : OrtCustomOp {
  ONNXTensorElementDataType type;
  const char* provider;  // nullptr: CPU
};

// ------------------------------------------------------------------------------------------------
// Tensor helpers
// ------------------------------------------------------------------------------------------------
struct TensorView {
  const OrtValue* value = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  const void* data = nullptr;
};

OrtStatus* view_tensor(const OrtValue* value, TensorView& out) {
  out.value = value;
  OrtTensorTypeAndShapeInfo* info = nullptr;
  ONNXQ_RETURN_IF_ERROR(g_api->GetTensorTypeAndShape(value, &info));
  size_t rank = 0;
  OrtStatus* status = g_api->GetTensorElementType(info, &out.type);
  if (!status) status = g_api->GetDimensionsCount(info, &rank);
  if (!status) {
    out.shape.resize(rank);
    status = g_api->GetDimensions(info, out.shape.data(), rank);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  if (status) return status;
  void* data = nullptr;
  ONNXQ_RETURN_IF_ERROR(g_api->GetTensorMutableData(const_cast<OrtValue*>(value), &data));
  out.data = data;
  return nullptr;
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

OrtStatus* expect_shape(const Kernel& kernel, const char* what, const TensorView& t,
                        const std::vector<int64_t>& expected) {
  if (t.shape == expected) return nullptr;
  return make_error(ORT_INVALID_ARGUMENT, kernel.where + ": input " + what + " has shape " + shape_string(t.shape) +
                                              ", expected " + shape_string(expected) +
                                              " (see docs/custom_ops.md for the layout)");
}

// ------------------------------------------------------------------------------------------------
// Kernel creation
// ------------------------------------------------------------------------------------------------
OrtStatus* read_int_attribute(const OrtKernelInfo* info, const char* name, const std::string& where, int64_t* out) {
  OrtStatus* status = g_api->KernelInfoGetAttribute_int64(info, name, out);
  if (!status) return nullptr;
  g_api->ReleaseStatus(status);
  return make_error(ORT_INVALID_GRAPH, where + ": missing int attribute '" + name + "'");
}

OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp* op, const OrtApi* /*api*/, const OrtKernelInfo* info,
                                      void** kernel_out) {
  const OpDef* def = static_cast<const OpDef*>(op);
  Kernel* kernel = new (std::nothrow) Kernel();
  if (!kernel) return make_error(ORT_FAIL, "MatMulLowBit: out of memory");
  size_t name_size = 0;
  std::string node_name;
  OrtStatus* status = g_api->KernelInfo_GetNodeName(info, nullptr, &name_size);
  if (status) {
    g_api->ReleaseStatus(status);
  } else if (name_size > 1) {
    std::vector<char> buffer(name_size);
    status = g_api->KernelInfo_GetNodeName(info, buffer.data(), &name_size);
    if (status) g_api->ReleaseStatus(status);
    else node_name.assign(buffer.data());
  }
  kernel->where = std::string(kOpName) + " node '" + node_name + "'";
  kernel->type = def->type;
  kernel->cuda = def->provider != nullptr;
  status = read_int_attribute(info, "K", kernel->where, &kernel->k);
  if (!status) status = read_int_attribute(info, "N", kernel->where, &kernel->n);
  if (!status) status = read_int_attribute(info, "bits", kernel->where, &kernel->bits);
  if (!status) status = read_int_attribute(info, "group_size", kernel->where, &kernel->group_size);
  if (!status && (kernel->k < 1 || kernel->n < 1 || kernel->group_size < 1 || kernel->k > INT32_MAX))
    status = make_error(ORT_INVALID_GRAPH, kernel->where + ": K, N and group_size must be >= 1 (and K < 2^31)");
  if (!status && kernel->bits != 2 && kernel->bits != 3 && kernel->bits != 4 && kernel->bits != 8)
    status = make_error(ORT_INVALID_GRAPH,
                        kernel->where + ": bits=" + std::to_string(kernel->bits) + " is not one of 2, 3, 4, 8");
  if (!status && !kernel->cuda) {
    const char* isa = getenv(kIsaEnv);
    kernel->cpu = onnxq::cpu::select_kernels(isa);
    if (!kernel->cpu)
      status = make_error(ORT_INVALID_ARGUMENT, std::string(kIsaEnv) + "=" + (isa ? isa : "") +
                                                    " is unknown or not supported by this CPU (choose auto, avx512, "
                                                    "avx2 or portable; best here: " + onnxq::cpu::best_isa() + ")");
  }
  if (status) {
    delete kernel;
    return status;
  }
  kernel->groups = onnxq::num_groups(kernel->k, kernel->group_size);
  kernel->bytes_per_group = onnxq::bytes_per_group(kernel->group_size, static_cast<int>(kernel->bits));
  *kernel_out = kernel;
  return nullptr;
}

void ORT_API_CALL destroy_kernel(void* kernel) { delete static_cast<Kernel*>(kernel); }

// ------------------------------------------------------------------------------------------------
// Compute
// ------------------------------------------------------------------------------------------------
struct Inputs {
  TensorView a, b, scales, zeros, bias;
  bool has_bias = false;
  int64_t m = 0;
};

OrtStatus* read_inputs(const Kernel& kernel, OrtKernelContext* context, Inputs& in) {
  size_t count = 0;
  ONNXQ_RETURN_IF_ERROR(g_api->KernelContext_GetInputCount(context, &count));
  if (count < 4) return make_error(ORT_INVALID_ARGUMENT, kernel.where + ": needs inputs A, B, scales, zeros");
  TensorView* views[] = {&in.a, &in.b, &in.scales, &in.zeros};
  for (size_t i = 0; i < 4; ++i) {
    const OrtValue* value = nullptr;
    ONNXQ_RETURN_IF_ERROR(g_api->KernelContext_GetInput(context, i, &value));
    if (!value) return make_error(ORT_INVALID_ARGUMENT, kernel.where + ": input " + std::to_string(i) + " is missing");
    ONNXQ_RETURN_IF_ERROR(view_tensor(value, *views[i]));
  }
  if (count > 4) {
    const OrtValue* value = nullptr;
    ONNXQ_RETURN_IF_ERROR(g_api->KernelContext_GetInput(context, 4, &value));
    if (value) {
      ONNXQ_RETURN_IF_ERROR(view_tensor(value, in.bias));
      in.has_bias = true;
    }
  }
  if (in.a.shape.empty() || in.a.shape.back() != kernel.k)
    return make_error(ORT_INVALID_ARGUMENT, kernel.where + ": input A has shape " + shape_string(in.a.shape) +
                                                ", its last dimension must equal the attribute K=" +
                                                std::to_string(kernel.k));
  ONNXQ_RETURN_IF_ERROR(expect_shape(kernel, "B", in.b, {kernel.n, kernel.groups, kernel.bytes_per_group}));
  ONNXQ_RETURN_IF_ERROR(expect_shape(kernel, "scales", in.scales, {kernel.n, kernel.groups}));
  ONNXQ_RETURN_IF_ERROR(expect_shape(kernel, "zeros", in.zeros, {kernel.n, kernel.groups}));
  if (in.has_bias) ONNXQ_RETURN_IF_ERROR(expect_shape(kernel, "bias", in.bias, {kernel.n}));
  in.m = 1;
  for (size_t i = 0; i + 1 < in.a.shape.size(); ++i) in.m *= in.a.shape[i];
  return nullptr;
}

void ort_parallel_for(void* context, size_t total, void (*fn)(void*, size_t), void* data) {
  if (total > 1 && context) {
    OrtStatus* status =
        g_api->KernelContext_ParallelFor(static_cast<const OrtKernelContext*>(context), fn, total, 0, data);
    if (!status) return;
    g_api->ReleaseStatus(status);  // no thread pool API in this build: run serially
  }
  for (size_t i = 0; i < total; ++i) fn(data, i);
}

// Per calling thread, reused across calls; the worker threads only see slices of it during one call.
thread_local std::vector<float> t_scratch;

OrtStatus* compute_cpu(const Kernel& kernel, OrtKernelContext* context, const Inputs& in, void* y_data) {
  const bool half = kernel.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  const int64_t m = in.m, n = kernel.n, k = kernel.k, groups = kernel.groups;
  const int64_t k_padded = groups * kernel.group_size;
  const bool copy_a = half || k_padded != k;
  const size_t a_floats = copy_a ? static_cast<size_t>(m * k_padded) : 0;
  const size_t param_floats = half ? static_cast<size_t>(2 * n * groups + (in.has_bias ? n : 0)) : 0;
  const size_t y_floats = half ? static_cast<size_t>(m * n) : 0;

  onnxq::cpu::MatMulArgs args{};
  args.lda = copy_a ? k_padded : k;
  args.b = static_cast<const uint8_t*>(in.b.data);
  args.ldy = n;
  args.m = m;
  args.n = n;
  args.groups = groups;
  args.group_size = kernel.group_size;
  args.bits = static_cast<int>(kernel.bits);
  const size_t kernel_floats = kernel.cpu->scratch_floats(args);
  const size_t total = a_floats + param_floats + y_floats + kernel_floats;
  try {
    if (t_scratch.size() < total) t_scratch.resize(total);
  } catch (const std::bad_alloc&) {
    return make_error(ORT_FAIL, kernel.where + ": out of memory for " + std::to_string(total * 4) + " bytes of scratch");
  }
  float* cursor = t_scratch.data();

  if (copy_a) {
    float* a32 = cursor;
    cursor += a_floats;
    for (int64_t r = 0; r < m; ++r) {
      float* dst = a32 + r * k_padded;
      if (half)
        kernel.cpu->half_to_float(static_cast<const uint16_t*>(in.a.data) + r * k, dst, static_cast<size_t>(k));
      else
        memcpy(dst, static_cast<const float*>(in.a.data) + r * k, static_cast<size_t>(k) * sizeof(float));
      memset(dst + k, 0, static_cast<size_t>(k_padded - k) * sizeof(float));
    }
    args.a = a32;
  } else {
    args.a = static_cast<const float*>(in.a.data);
  }
  if (half) {
    float* s32 = cursor;
    float* z32 = s32 + n * groups;
    cursor += param_floats;
    kernel.cpu->half_to_float(static_cast<const uint16_t*>(in.scales.data), s32, static_cast<size_t>(n * groups));
    kernel.cpu->half_to_float(static_cast<const uint16_t*>(in.zeros.data), z32, static_cast<size_t>(n * groups));
    args.scales = s32;
    args.zeros = z32;
    if (in.has_bias) {
      float* b32 = z32 + n * groups;
      kernel.cpu->half_to_float(static_cast<const uint16_t*>(in.bias.data), b32, static_cast<size_t>(n));
      args.bias = b32;
    }
    args.y = cursor;
    cursor += y_floats;
  } else {
    args.scales = static_cast<const float*>(in.scales.data);
    args.zeros = static_cast<const float*>(in.zeros.data);
    args.bias = in.has_bias ? static_cast<const float*>(in.bias.data) : nullptr;
    args.y = static_cast<float*>(y_data);
  }
  onnxq::cpu::Runner runner{ort_parallel_for, context};
  kernel.cpu->matmul(args, runner, cursor);
  if (half) kernel.cpu->float_to_half(args.y, static_cast<uint16_t*>(y_data), static_cast<size_t>(m * n));
  return nullptr;
}

#if defined(ONNXQ_WITH_CUDA)
OrtStatus* compute_cuda(const Kernel& kernel, OrtKernelContext* context, const Inputs& in, void* y_data) {
  void* stream = nullptr;
  ONNXQ_RETURN_IF_ERROR(g_api->KernelContext_GetGPUComputeStream(context, &stream));
  onnxq::cuda::LaunchArgs args{};
  args.a = in.a.data;
  args.b = static_cast<const uint8_t*>(in.b.data);
  args.scales = in.scales.data;
  args.zeros = in.zeros.data;
  args.bias = in.has_bias ? in.bias.data : nullptr;
  args.y = y_data;
  args.m = in.m;
  args.n = kernel.n;
  args.k = kernel.k;
  args.group_size = kernel.group_size;
  args.bits = static_cast<int>(kernel.bits);
  args.half = kernel.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  if (const char* error = onnxq::cuda::matmul_lowbit(args, stream))
    return make_error(ORT_RUNTIME_EXCEPTION, kernel.where + ": CUDA: " + error);
  return nullptr;
}
#endif

OrtStatus* ORT_API_CALL compute(void* kernel_ptr, OrtKernelContext* context) {
  const Kernel& kernel = *static_cast<const Kernel*>(kernel_ptr);
  Inputs in;
  ONNXQ_RETURN_IF_ERROR(read_inputs(kernel, context, in));
  std::vector<int64_t> out_shape(in.a.shape.begin(), in.a.shape.end() - 1);
  out_shape.push_back(kernel.n);
  OrtValue* output = nullptr;
  ONNXQ_RETURN_IF_ERROR(g_api->KernelContext_GetOutput(context, 0, out_shape.data(), out_shape.size(), &output));
  void* y_data = nullptr;
  ONNXQ_RETURN_IF_ERROR(g_api->GetTensorMutableData(output, &y_data));
  if (in.m == 0) return nullptr;
#if defined(ONNXQ_WITH_CUDA)
  if (kernel.cuda) return compute_cuda(kernel, context, in, y_data);
#endif
  return compute_cpu(kernel, context, in, y_data);
}

// ------------------------------------------------------------------------------------------------
// Shape inference: Y = A.shape[:-1] + [N]
// ------------------------------------------------------------------------------------------------
OrtStatus* ORT_API_CALL infer_shape(const OrtCustomOp* /*op*/, OrtShapeInferContext* context) {
  OrtTensorTypeAndShapeInfo* a_info = nullptr;
  ONNXQ_RETURN_IF_ERROR(g_api->ShapeInferContext_GetInputTypeShape(context, 0, &a_info));
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  size_t rank = 0;
  OrtStatus* status = g_api->GetTensorElementType(a_info, &type);
  if (!status) status = g_api->GetDimensionsCount(a_info, &rank);
  std::vector<int64_t> dims(rank);
  std::vector<const char*> symbols(rank, nullptr);
  if (!status && rank) status = g_api->GetDimensions(a_info, dims.data(), rank);
  if (!status && rank) status = g_api->GetSymbolicDimensions(a_info, symbols.data(), rank);
  // An unknown dim without a name must stay unknown: ORT reads (-1, "") on an output as the value -1 and folds
  // Shape(Y) into constants with -1 in them (a later Reshape then sees two -1s), so each gets a fresh symbol.
  static std::atomic<uint64_t> unknown_dims{0};
  std::vector<std::string> symbol_names;
  for (size_t i = 0; i < rank; ++i) {
    const char* s = symbols[i];
    if (s && *s) {
      symbol_names.emplace_back(s);
    } else if (dims[i] < 0) {
      symbol_names.emplace_back("onnxq_unknown_" + std::to_string(unknown_dims.fetch_add(1)));
    } else {
      symbol_names.emplace_back("");
    }
  }
  // a_info is owned by the inference context: not released here.
  if (status || rank == 0) return status;  // unknown rank: leave the output shape unknown

  const OrtOpAttr* attr = nullptr;
  ONNXQ_RETURN_IF_ERROR(g_api->ShapeInferContext_GetAttribute(context, "N", &attr));
  int64_t n = 0;
  size_t written = 0;
  ONNXQ_RETURN_IF_ERROR(g_api->ReadOpAttr(attr, ORT_OP_ATTR_INT, &n, sizeof(n), &written));

  dims.back() = n;
  symbol_names.back().clear();
  std::vector<const char*> out_symbols;
  for (const auto& s : symbol_names) out_symbols.push_back(s.c_str());
  OrtTensorTypeAndShapeInfo* y_info = nullptr;
  ONNXQ_RETURN_IF_ERROR(g_api->CreateTensorTypeAndShapeInfo(&y_info));
  status = g_api->SetTensorElementType(y_info, type);
  if (!status) status = g_api->SetDimensions(y_info, dims.data(), dims.size());
  if (!status) status = g_api->SetSymbolicDimensions(y_info, out_symbols.data(), out_symbols.size());
  if (!status) status = g_api->ShapeInferContext_SetOutputTypeShape(context, 0, y_info);
  g_api->ReleaseTensorTypeAndShapeInfo(y_info);
  return status;
}

// ------------------------------------------------------------------------------------------------
// OrtCustomOp tables
// ------------------------------------------------------------------------------------------------
const char* ORT_API_CALL op_name(const OrtCustomOp*) { return kOpName; }
const char* ORT_API_CALL op_provider(const OrtCustomOp* op) { return static_cast<const OpDef*>(op)->provider; }
ONNXTensorElementDataType ORT_API_CALL op_input_type(const OrtCustomOp* op, size_t index) {
  return index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : static_cast<const OpDef*>(op)->type;
}
size_t ORT_API_CALL op_input_count(const OrtCustomOp*) { return kInputCount; }
ONNXTensorElementDataType ORT_API_CALL op_output_type(const OrtCustomOp* op, size_t) {
  return static_cast<const OpDef*>(op)->type;
}
size_t ORT_API_CALL op_output_count(const OrtCustomOp*) { return 1; }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL op_input_characteristic(const OrtCustomOp*, size_t index) {
  return index == 4 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL op_output_characteristic(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}
OrtMemType ORT_API_CALL op_input_memory_type(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL op_variadic_min_arity(const OrtCustomOp*) { return 1; }
int ORT_API_CALL op_variadic_homogeneity(const OrtCustomOp*) { return 1; }
int ORT_API_CALL op_start_version(const OrtCustomOp*) { return 1; }
int ORT_API_CALL op_end_version(const OrtCustomOp*) { return INT_MAX; }
size_t ORT_API_CALL op_no_index_map(int** input_index, int** output_index) {
  *input_index = nullptr;
  *output_index = nullptr;
  return 0;
}
void ORT_API_CALL op_release_index_map(int*, int*) {}

OpDef make_op(ONNXTensorElementDataType type, const char* provider) {
  OpDef op;
  memset(static_cast<OrtCustomOp*>(&op), 0, sizeof(OrtCustomOp));
  op.version = ORT_API_VERSION;
  op.GetName = op_name;
  op.GetExecutionProviderType = op_provider;
  op.GetInputType = op_input_type;
  op.GetInputTypeCount = op_input_count;
  op.GetOutputType = op_output_type;
  op.GetOutputTypeCount = op_output_count;
  op.KernelDestroy = destroy_kernel;
  op.GetInputCharacteristic = op_input_characteristic;
  op.GetOutputCharacteristic = op_output_characteristic;
  op.GetInputMemoryType = op_input_memory_type;
  op.GetVariadicInputMinArity = op_variadic_min_arity;
  op.GetVariadicInputHomogeneity = op_variadic_homogeneity;
  op.GetVariadicOutputMinArity = op_variadic_min_arity;
  op.GetVariadicOutputHomogeneity = op_variadic_homogeneity;
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute;
  op.InferOutputShapeFn = infer_shape;
  op.GetStartVersion = op_start_version;
  op.GetEndVersion = op_end_version;
  op.GetMayInplace = op_no_index_map;
  op.ReleaseMayInplace = op_release_index_map;
  op.GetAliasMap = op_no_index_map;
  op.ReleaseAliasMap = op_release_index_map;
  op.type = type;
  op.provider = provider;
  return op;
}

OpDef g_ops[] = {
    make_op(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, nullptr),
    make_op(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, nullptr),
#if defined(ONNXQ_WITH_CUDA)
    make_op(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "CUDAExecutionProvider"),
    make_op(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, "CUDAExecutionProvider"),
#endif
};

}  // namespace

extern "C" {

// Entry point called by OrtApi::RegisterCustomOpsLibrary_V2 (Python: SessionOptions.register_custom_ops_library).
ONNXQ_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) {
    // An older runtime: report through the oldest API table, which every runtime still serves.
    const OrtApi* old_api = api_base->GetApi(1);
    const std::string message = std::string("the onnxq custom-op library needs ONNX Runtime C API version ") +
                                std::to_string(ORT_API_VERSION) + " (onnxruntime >= 1." +
                                std::to_string(ORT_API_VERSION) + "); this runtime is " +
                                api_base->GetVersionString() + ": upgrade onnxruntime";
    return old_api ? old_api->CreateStatus(ORT_FAIL, message.c_str()) : nullptr;
  }
  g_api = api;
  OrtCustomOpDomain* domain = nullptr;
  ONNXQ_RETURN_IF_ERROR(api->CreateCustomOpDomain(kDomain, &domain));
  for (OpDef& op : g_ops) {
    OrtStatus* status = api->CustomOpDomain_Add(domain, &op);
    if (status) {
      api->ReleaseCustomOpDomain(domain);
      return status;
    }
  }
  OrtStatus* status = api->AddCustomOpDomain(options, domain);
  if (status) {
    api->ReleaseCustomOpDomain(domain);
    return status;
  }
  // The domain must outlive every session created from `options`: keep it for the life of the process.
  static std::vector<OrtCustomOpDomain*>* domains = new std::vector<OrtCustomOpDomain*>();
  domains->push_back(domain);
  return nullptr;
}

// Introspection for tests and tools (ctypes).
ONNXQ_EXPORT const char* OnnxqBestCpuIsa() { return onnxq::cpu::best_isa(); }
ONNXQ_EXPORT int OnnxqCpuIsaSupported(const char* name) { return onnxq::cpu::isa_supported(name) ? 1 : 0; }
ONNXQ_EXPORT int OnnxqHasCuda() {
#if defined(ONNXQ_WITH_CUDA)
  return 1;
#else
  return 0;
#endif
}

}  // extern "C"
