from serving.triton_classify import TritonPythonModel  # noqa: F401  (logic lives in serving/)
