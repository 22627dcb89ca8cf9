"""sequence_classification: one label per sentence (or sentence pair); the default task.

Graph output `logits` (batch, num_labels); loss cross-entropy (KD from the FP32 model with
qat.distill); score accuracy; parity argmax agreement and the mean cosine of logit vectors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

from pipeline.data import DataSplits, Split, encode, load_splits
from pipeline.data.batching import Encoded
from pipeline.engines import PRECISION_NAMES
from pipeline.inference import expected_loss_softmax, kl_per_example, paired_drop_ci95
from pipeline.schema import DataConfig, ModelConfig
from pipeline.tasks.base import Models
from pipeline.training import classification_objective


def logits_parity(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Argmax agreement and mean cosine similarity of two logit arrays (N, C)."""
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
    return {"argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()), "cosine": float(cos.mean()), "n": int(len(a))}


def argmax_cosine_row(p: dict) -> str:
    if not p or p.get("argmax_agreement") is None:
        return "—"
    return f"argmax {100 * p['argmax_agreement']:.2f} %, cosine {p['cosine']:.5f}"


class SequenceClassification:
    name = "sequence_classification"
    output_name = "logits"
    output_axes = {0: "batch"}
    token_level = False
    score_name = "accuracy"
    distills = False
    objective = staticmethod(classification_objective)

    def load_splits(self, cfg: DataConfig) -> DataSplits:
        return load_splits(cfg)

    def load_model(self, cfg: ModelConfig, num_labels: int, device: torch.device):
        from pipeline.models import load_model

        return load_model(cfg, num_labels, device, AutoModelForSequenceClassification)

    def encode(self, tokenizer, split: Split, max_length: int) -> Encoded:
        return encode(tokenizer, split, max_length)

    def cache_parts(self) -> tuple:
        return ()  # no task key changes what a stage computes for classification: nothing to add to the keys

    def score(self, outputs: np.ndarray, data: Encoded) -> float | None:
        return float(self.correct(outputs, data).mean())

    def parity(self, quantized: np.ndarray, fake_quant: np.ndarray) -> dict[str, Any]:
        return logits_parity(quantized, fake_quant)

    def selection(self, models: Models, data: Encoded, batch_size: int, reference: dict) -> dict:
        """Accuracy and cross-entropy on the tuning split; KL to the FP32 model once there is one (QAT)."""
        logits = models.outputs(data, batch_size, token_level=False)
        labels = torch.as_tensor(data.labels[: len(logits)])
        r = {"accuracy": self.score(logits, data), "loss": float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), labels))}
        if models.fp32 is not None:
            if "fp32" not in reference:
                reference["fp32"] = models.outputs(data, batch_size, token_level=False, fp32=True)
            r["kl"] = float(self.divergence(reference["fp32"], logits).mean())
        return r

    def divergence(self, reference: np.ndarray, outputs: np.ndarray) -> np.ndarray:
        return kl_per_example(reference, outputs)

    def expected_loss(self, reference: np.ndarray, outputs: np.ndarray) -> np.ndarray:
        return expected_loss_softmax(reference, outputs)

    def fidelity_targets(self, reference: np.ndarray, outputs: np.ndarray) -> dict:
        return {}

    def correct(self, outputs: np.ndarray, data: Encoded) -> np.ndarray:
        return outputs.argmax(-1) == np.asarray(data.labels[: len(outputs)])

    def config_errors(self, cfg) -> list[str]:
        return []

    def task_metrics(self, outputs: dict, data: Encoded) -> dict:
        """Each quantized output against the baseline engine on the same examples: the accuracy drop, its
        paired 95 % interval (the eval split's own noise: is the drop real?) and the predictions that differ.
        {output label: {drop_pt, drop_ci95_pt, changed, n}}."""
        base = next((outputs[k] for k in ("engine_fp32", "engine_fp16") if k in outputs), None)
        if base is None:
            return {}
        labels = np.asarray(data.labels[: len(base)])
        ref = base.argmax(-1) == labels
        out = {}
        for label, logits in outputs.items():
            if label in ("fp32", "fake_quant", "engine_fp32", "engine_fp16", "trt_graph_fp16"):
                continue
            q = logits.argmax(-1) == labels
            out[label] = {
                "drop_pt": 100 * float(ref.mean() - q.mean()),
                "drop_ci95_pt": paired_drop_ci95(ref, q),
                "changed": int((logits.argmax(-1) != base.argmax(-1)).sum()),
                "n": int(len(q)),
            }
        return out

    def report_rows(self, d: dict) -> list[tuple[str, str]]:
        base = PRECISION_NAMES[(d.get("engine_precisions") or {}).get("baseline") or "fp32"]
        return [
            (f"drop {label} vs engine {base} (paired 95 % interval)",
             f"{v['drop_pt']:+.2f} ± {v['drop_ci95_pt']:.2f} pt; {v['changed']} of {v['n']} predictions differ")
            for label, v in (d.get(self.name) or {}).items()
        ]  # fmt: skip

    parity_text = staticmethod(argmax_cosine_row)
