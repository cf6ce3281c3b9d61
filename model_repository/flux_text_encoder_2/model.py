from serving.triton_flux_component import TritonPythonModel  # noqa: F401  (logic lives in serving/)
