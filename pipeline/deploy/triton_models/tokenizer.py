"""Triton Python backend: TEXT (bytes, UTF-8) -> the graph's inputs, tokenized exactly as the run
measured (textproc.py beside this file, a copy of pipeline/deploy/textproc.py).

Each request is tokenized and padded on its own (to its longest text). Bad input gets an error response
for that request only (the server and the other requests go on): text that is not UTF-8, an empty text.
A text longer than the model's max_length tokens is truncated as the pipeline truncates it (the
`truncated` output says so).
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from textproc import TextProcessor  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.tp = TextProcessor.from_folder(folder)
        config = json.loads(args["model_config"])
        self.outputs = [o["name"] for o in config["output"]]
        self.words = "word_ids" in self.outputs

    def _texts(self, request):
        raw = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
        texts = []
        for i, t in enumerate(raw):
            if isinstance(t, bytes):
                try:
                    t = t.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(f"TEXT[{i}] is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            t = str(t)
            if not t.strip():
                raise ValueError(f"TEXT[{i}] is empty")
            texts.append(t)
        return texts

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                texts = self._texts(request)
                examples = self.tp.encode_words(texts) if self.words else self.tp.encode(texts)
                extra = {"word_ids": [e.word_ids[0] for e in examples]} if self.words else None
                arrays = self.tp.pad([e.windows[0] for e in examples], extra)
                arrays["truncated"] = np.array([[e.truncated] for e in examples], dtype=bool)
                tensors = [pb_utils.Tensor(name, arrays[name]) for name in self.outputs]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as exc:  # this request fails (400 for bad input); the model keeps serving the others
                code = getattr(pb_utils.TritonError, "INVALID_ARG" if isinstance(exc, ValueError) else "INTERNAL", None)
                error = pb_utils.TritonError(f"tokenizer: {exc}", code) if code is not None else pb_utils.TritonError(f"tokenizer: {exc}")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
        return responses
