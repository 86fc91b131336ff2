"""The ONNX side of onnxq: model I/O, output paths, graph index and cleanup, metadata, target discovery."""
