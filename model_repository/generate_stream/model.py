from serving.triton_generate_stream import TritonPythonModel  # noqa: F401  (logic lives in serving/)
