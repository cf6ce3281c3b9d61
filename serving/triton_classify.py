"""Triton python-backend model `classify`: tokenize, run the encoder, calibrated softmax.

Dynamic batching is on for this model, so one `execute` sees many requests: they are tokenized
together and encoded in one go. Where the encoder runs is the deployment's choice:
- GPU target: a BLS request to `classifier_onnx` (a TensorRT / ORT-TensorRT model), whose own
  batcher merges across the instances of this model.
- CPU target: in this process (the `inline_encoder` parameter names the graph in this version's
  folder), with the same ONNX Runtime runner and knobs as `classifier_onnx`, and with int8 an fp32
  second opinion for rows near the boundary (serving/classify_encoder.py). On 2 cores the BLS
  hop cost a Triton request, two shared-memory hand-offs and a second python process's wake-up per
  merged batch, with a core idle meanwhile (docs/decisions/classify-encoder-inline.md).
`classifier_onnx` stays deployed on both targets for callers who want the logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from contract.specs import CLASSIFIER_ONNX, CLASSIFY
from serving.classify_encoder import InlineEncoder
from serving.classify_pipeline import ClassifyPipeline, calibrated_softmax, validate_text
from serving.onnx_runner import config_parameters


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.pipeline = ClassifyPipeline(version_dir)
        self.logits_name = CLASSIFIER_ONNX.outputs[0].name
        self.max_batch = CLASSIFIER_ONNX.max_batch_size
        params = config_parameters(json.loads(args["model_config"]))
        self.inline = InlineEncoder.from_parameters(version_dir, params)
        self.input_name = CLASSIFY.inputs[0].name
        self.label_out, self.scores_out = (t.name for t in CLASSIFY.outputs)
        # Label tensors are built by indexing, not by encoding strings per response.
        self.label_bytes = np.array([s.encode() for s in self.pipeline.labels.labels], dtype=np.object_)

    def _logits(self, texts: list[str]) -> np.ndarray:
        if self.inline is not None:
            return self.inline.logits(self.pipeline.tokenize(texts))
        chunks = []
        for start in range(0, len(texts), self.max_batch):
            feeds = self.pipeline.tokenize(texts[start : start + self.max_batch])
            req = pb_utils.InferenceRequest(
                model_name=CLASSIFIER_ONNX.name,
                requested_output_names=[self.logits_name],
                inputs=[pb_utils.Tensor(k, v) for k, v in feeds.items()],
            )
            resp = req.exec()
            if resp.has_error():
                raise RuntimeError(resp.error().message())
            chunks.append(pb_utils.get_output_tensor_by_name(resp, self.logits_name).as_numpy())
        return np.concatenate(chunks, axis=0)

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        texts: list[str] = []
        owners: list[tuple[int, int]] = []  # (request index, number of texts)
        for i, request in enumerate(requests):
            raw = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy().reshape(-1).tolist()
            batch = [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else str(t) for t in raw]
            problems = [p for p in map(validate_text, batch) if p]
            if problems:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(problems[0], pb_utils.TritonError.INVALID_ARG)
                )
                continue
            owners.append((i, len(batch)))
            texts.extend(batch)
        if texts:
            try:
                probs = calibrated_softmax(self._logits(texts), self.pipeline.labels.temperature)
            except Exception as e:
                err = pb_utils.TritonError(f"classifier failed: {e}")
                for i, _ in owners:
                    responses[i] = pb_utils.InferenceResponse(error=err)
                return responses
            labels = self.label_bytes[probs.argmax(axis=1)].reshape(-1, 1)
            offset = 0
            for i, n in owners:
                responses[i] = pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor(self.label_out, labels[offset : offset + n]),
                        pb_utils.Tensor(self.scores_out, probs[offset : offset + n]),
                    ]
                )
                offset += n
        return responses
