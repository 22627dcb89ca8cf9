"""Tasks (config group `task/`): what the model is for, asked by every stage.

A task is one module here with one class implementing `Task`: how the model is built (its head),
how data is read and tokenized, the training loss, the headline score and task metrics, and the
parity measure of the quantized engine against fake-quant torch. Stages call these; none of them
branches on the task's name.

The graph output: the model the task builds returns it as `model(**inputs).logits`, the one tensor
the exporter traces, the engines return and evaluation collects. A model that outputs something other
than classification logits declares `graph_output = (name, dynamic axes)` (pipeline.onnx_export).

    sequence_classification  logits (batch, num_labels)         accuracy
    embedding                sentence_embedding (batch, hidden)  cosine / recall@k vs FP32, k-NN accuracy
    token_classification     logits (batch, sequence, num_tags)  entity P/R/F1 (seqeval), token accuracy
    question_answering       span_logits (batch, sequence, 2)    SQuAD exact match / F1 (start, end stacked)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from pipeline.data import DataSplits, Split
    from pipeline.data.batching import Encoded
    from pipeline.models import Loaded
    from pipeline.schema import DataConfig, ModelConfig, RunConfig, TrainConfig

# One output of a whole eval split: stacked (N, ...) for sentence-level outputs; for token-level ones
# a list of (length_i, ...) arrays, each trimmed to its example's tokens.
Outputs = np.ndarray | list[np.ndarray]


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

    def selection(self, ctx, data: Encoded, batch_size: int, reference: dict) -> dict | None:
        """Training-time evaluation on the tuning split (QAT best state): {"accuracy": higher is better,
        "loss": lower is better}; None = classification accuracy and cross-entropy (stages/_common.py)."""
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


def _sequence_classification(cfg: RunConfig) -> Task:
    from pipeline.tasks.sequence_classification import SequenceClassification

    return SequenceClassification()


def _embedding(cfg: RunConfig) -> Task:
    from pipeline.tasks.embedding import Embedding

    return Embedding(cfg.task, cfg.model)


def _token_classification(cfg: RunConfig) -> Task:
    from pipeline.tasks.token_classification import TokenClassification

    return TokenClassification(cfg.task)


def _question_answering(cfg: RunConfig) -> Task:
    from pipeline.tasks.question_answering import QuestionAnswering

    return QuestionAnswering(cfg.task)


TASKS: dict[str, Callable[[RunConfig], Task]] = {
    "sequence_classification": _sequence_classification,
    "embedding": _embedding,
    "token_classification": _token_classification,
    "question_answering": _question_answering,
}


def make_task(cfg: RunConfig) -> Task:
    return TASKS[cfg.task.name](cfg)


def combination_errors(cfg: RunConfig) -> list[str]:
    """Task rules that involve other groups (called by schema validation)."""
    errors = []
    if cfg.task.name == "embedding" and cfg.finetune.enabled:
        errors.append(
            "finetune: task=embedding uses the checkpoint's own embedding and has no labelled training objective; "
            "finetune=default cannot be combined with it (choose finetune=none, the task's default)"
        )
    if cfg.task.name != "sequence_classification" and cfg.tune.enabled:
        # The accuracy budget (pipeline/tune/) scores classification accuracy on the tuning split.
        errors.append(
            f"tune: the accuracy budget scores classification accuracy; task={cfg.task.name} cannot be combined with "
            f"tune={cfg.tune.method} (choose tune=none)"
        )
    if cfg.task.name not in TASKS:
        errors.append(f"task.name: {cfg.task.name!r} is not built yet; valid values: {', '.join(TASKS)}")
    elif cfg.qat.kd_hidden > 0 and not cfg.qat.distill and not make_task(cfg).distills:
        # The hidden-state term needs the FP32 teacher, which QAT runs when qat.distill is set or the task
        # always distills (embedding) — the same rule as stages/qat.py.
        errors.append(f"qat.kd_hidden: {cfg.qat.kd_hidden} needs qat.distill=true (qat=kd); set qat.kd_hidden=0 or choose qat=kd")
    return errors


def collect(forward: Callable, batches, data: Encoded, token_level: bool) -> Outputs:
    """forward(batch) -> (batch, ...) array over possibly length-sorted batches, returned in split order.

    Token-level outputs are padded to each batch's longest example: each row is cut to its own length.
    """
    out: dict[int, np.ndarray] = {}
    for b in batches:
        res = forward(b)
        for j, i in enumerate(b.index):
            out[i] = res[j][: len(data.features[i]["input_ids"])] if token_level else res[j]
    rows = [out[i] for i in sorted(out)]
    return rows if token_level else np.stack(rows)


def token_level_selection(task: Task, ctx, data: Encoded, batch_size: int) -> dict:
    """Training-time evaluation on the tuning split for a token-level task (QAT best state): the task's
    own score of the fake-quant model's outputs; no loss term."""
    from pipeline.stages._common import torch_logits

    outputs = torch_logits(ctx.model, ctx.tokenizer, data, batch_size, ctx.device, token_level=True)
    return {"accuracy": task.score(outputs, data), "loss": 0.0}
