from serving.triton_generate import TritonPythonModel  # noqa: F401  (logic lives in serving/)
