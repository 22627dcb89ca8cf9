"""The Task protocol and what tasks share (pipeline/tasks/__init__.py lists the tasks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from pipeline.inference import Outputs, kl_per_example, torch_logits

if TYPE_CHECKING:
    from pipeline.data import DataSplits, Split
    from pipeline.data.batching import Encoded
    from pipeline.models import Loaded
    from pipeline.schema import DataConfig, ModelConfig, RunConfig, TrainConfig


@dataclass(frozen=True)
class Models:
    """What a task judges during training and tuning: the working model (fake quant once quantized), the
    frozen FP32 copy (None before quantization), the tokenizer and the device they run on."""

    model: torch.nn.Module
    fp32: torch.nn.Module | None
    tokenizer: Any
    device: torch.device

    def outputs(self, data: Encoded, batch_size: int, token_level: bool, fp32: bool = False) -> Outputs:
        return torch_logits(self.fp32 if fp32 else self.model, self.tokenizer, data, batch_size, self.device, token_level=token_level)


class Task(Protocol):
    name: str
    output_name: str  # the ONNX graph's output
    output_axes: dict[int, str]  # its dynamic axes
    token_level: bool  # outputs per token (trimmed to each example's length when collected)
    score_name: str  # what accuracy.<precision> holds for this task (report wording)
    # True: QAT always learns from the frozen FP32 model (no labels), whatever qat.distill says.
    distills: bool

    def load_splits(self, cfg: DataConfig) -> DataSplits: ...

    def load_model(self, cfg: ModelConfig, num_labels: int, device: torch.device) -> Loaded: ...

    def encode(self, tokenizer, split: Split, max_length: int) -> Encoded: ...

    def objective(
        self, net, inputs: dict[str, torch.Tensor], labels: torch.Tensor, teacher: torch.nn.Module | None, tcfg: TrainConfig
    ) -> torch.Tensor:
        """Loss of one training batch (pipeline.training.train's `objective`)."""
        ...

    def cache_parts(self) -> tuple:
        """What of the task changes the model or data (part of the load stage's cache key)."""
        ...

    def score(self, outputs: Outputs, data: Encoded) -> float | None:
        """The headline number for `metrics.accuracy.<precision>` (None when it cannot be measured)."""
        ...

    def parity(self, quantized: Outputs, fake_quant: Outputs) -> dict[str, Any]:
        """The quantized engine against fake-quant torch, in the task's own terms."""
        ...

    def selection(self, models: Models, data: Encoded, batch_size: int, reference: dict) -> dict:
        """Training-time evaluation on the tuning split (best-state selection): {"accuracy": higher is
        better, "loss": lower is better, optionally "kl" (lower is better; qat.select_by=kl uses it where
        present, else the task's own score)}; `reference` caches the FP32 outputs between calls."""
        ...

    def divergence(self, reference: Outputs, outputs: Outputs) -> np.ndarray:
        """Per example, how far `outputs` are from the FP32 `reference` (lower = closer; the tuner's KL
        criterion and its hardest-examples proxy)."""
        ...

    def expected_loss(self, reference: Outputs, outputs: Outputs) -> np.ndarray | None:
        """Per example, the accuracy the FP32 model's own probabilities expect the quantized answer to
        lose (0 where the answers agree; tune=auto's label-free budget check), or None where the outputs
        are not class probabilities of the scored answer."""
        ...

    def fidelity_targets(self, reference: Outputs, outputs: Outputs) -> dict[str, dict[str, float]]:
        """The task's own minimums the quantized outputs must reach against FP32 for the accuracy budget
        ({name: {"value", "minimum"[, "ci95"]}}: ci95, the half-width of the value's 95 % interval over the
        tuning examples, must clear the minimum too; {} for none)."""
        ...

    def correct(self, outputs: Outputs, data: Encoded) -> np.ndarray | None:
        """Per-example correctness (bool (N,)) when the score is its mean, for the paired interval of a
        drop; None where the score is not a per-example mean (F1, k-NN accuracy)."""
        ...

    def config_errors(self, cfg: RunConfig) -> list[str]:
        """The task's rules on the other groups (validation; [] for none)."""
        ...

    def task_metrics(self, outputs: dict[str, Outputs], data: Encoded) -> dict[str, Any]:
        """Extra metrics by precision label (metrics.json under the task's name; {} for none)."""
        ...

    def report_rows(self, metrics: dict) -> list[tuple[str, str]]:
        """Rows for report.md's summary table (the task's own metrics)."""
        ...

    def parity_text(self, parity: dict) -> str:
        """One report cell for a parity dict of this task."""
        ...


def token_divergence(reference: list[np.ndarray], outputs: list[np.ndarray]) -> np.ndarray:
    """Per example: the mean over its tokens of KL(softmax(FP32) || softmax(quantized)) of the last axis."""
    return np.array([float(kl_per_example(r, o).mean()) for r, o in zip(reference, outputs)])


def token_level_selection(task: Task, models: Models, data: Encoded, batch_size: int, reference: dict) -> dict:
    """Training-time evaluation on the tuning split for a token-level task (best state): the task's own
    score of the working model's outputs; no loss term, and no "kl": qat.select_by=kl compares the
    task's score (pipeline.training._score)."""
    outputs = models.outputs(data, batch_size, token_level=True)
    return {"accuracy": task.score(outputs, data), "loss": 0.0}
