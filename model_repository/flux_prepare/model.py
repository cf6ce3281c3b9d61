from serving.triton_flux_prepare import TritonPythonModel  # noqa: F401  (logic lives in serving/)
