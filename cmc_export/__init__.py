"""CMC export: ONNX / OpenVINO / TensorRT graphs with parity gates and a Triton model repository."""
