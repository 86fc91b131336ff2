// Minimal C++ ONNX Runtime app using the onnxq custom-op library:
//   run_model <libonnxq_ops.so> <model.onnx> <K>   -> runs one row of ones through the model, prints the first outputs
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "onnxruntime_cxx_api.h"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s LIBRARY MODEL K\n", argv[0]);
    return 2;
  }
  try {
    Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "onnxq-example");
    Ort::SessionOptions options;
    options.SetIntraOpNumThreads(2);
    options.RegisterCustomOpsLibrary(argv[1]);  // registers domain "onnxq"
    Ort::Session session(env, argv[2], options);

    const int64_t k = std::atoll(argv[3]);
    std::vector<float> a(static_cast<size_t>(k), 1.0f);
    const int64_t shape[] = {1, k};
    Ort::MemoryInfo memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    Ort::Value input = Ort::Value::CreateTensor<float>(memory, a.data(), a.size(), shape, 2);
    Ort::AllocatorWithDefaultOptions allocator;
    auto input_name = session.GetInputNameAllocated(0, allocator);
    auto output_name = session.GetOutputNameAllocated(0, allocator);
    const char* input_names[] = {input_name.get()};
    const char* output_names[] = {output_name.get()};
    auto outputs = session.Run(Ort::RunOptions{nullptr}, input_names, &input, 1, output_names, 1);
    const float* y = outputs[0].GetTensorData<float>();
    const size_t n = outputs[0].GetTensorTypeAndShapeInfo().GetElementCount();
    for (size_t i = 0; i < n && i < 4; ++i) std::printf("%.6f\n", y[i]);
  } catch (const Ort::Exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
