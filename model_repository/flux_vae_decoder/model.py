from serving.triton_onnx import TritonPythonModel  # noqa: F401  (logic lives in serving/)
