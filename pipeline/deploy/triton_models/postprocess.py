"""Triton Python backend: the engine's output -> the task's answer (postprocess.py beside this file, a
copy of pipeline/deploy/postprocess.py: the predictor's own functions), e.g. label + softmax scores for
sequence classification, the L2-normalized vector for embeddings, entities (JSON) for token
classification."""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from postprocess import POSTPROCESS  # noqa: E402
from textproc import Example, split_words  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.meta = json.loads(open(os.path.join(folder, "meta.json")).read())
        self.task = self.meta["task"]
        self.fn = POSTPROCESS[self.task]

    def _one(self, request):
        out = pb_utils.get_input_tensor_by_name(request, "MODEL_OUTPUT").as_numpy()
        if self.task == "sequence_classification":
            rows = [self.fn(o, None, self.meta) for o in out]
            label = np.array([[r["label"].encode("utf-8")] for r in rows], dtype=np.object_)
            scores = np.array([r["scores"] for r in rows], dtype=np.float32)
            return [pb_utils.Tensor("label", label), pb_utils.Tensor("scores", scores)]
        if self.task == "embedding":
            emb = np.array([self.fn(o, None, self.meta)["embedding"] for o in out], dtype=np.float32)
            return [pb_utils.Tensor("sentence_embedding", emb)]
        if self.task == "token_classification":
            texts = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
            word_ids = pb_utils.get_input_tensor_by_name(request, "WORD_IDS").as_numpy()
            rows = []
            for o, t, w in zip(out, texts, word_ids):
                text = t.decode("utf-8") if isinstance(t, bytes) else str(t)
                ex = Example([], text=text, word_ids=[w.tolist()], word_spans=split_words(text)[1])
                rows.append([json.dumps(self.fn(o, ex, self.meta)["entities"]).encode("utf-8")])
            return [pb_utils.Tensor("entities", np.array(rows, dtype=np.object_))]
        raise ValueError(f"task {self.task} has no Triton postprocess")

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=self._one(request)))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"postprocess: {exc}")))
        return responses
