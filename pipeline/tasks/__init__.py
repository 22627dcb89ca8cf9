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
from typing import TYPE_CHECKING

from pipeline.tasks.base import Models, Task

if TYPE_CHECKING:
    from pipeline.schema import RunConfig

__all__ = ["TASKS", "Models", "Task", "combination_errors", "make_task"]


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
    """Task rules that involve other groups (called by validation): the task's own, then the shared ones."""
    if cfg.task.name not in TASKS:
        return [f"task.name: {cfg.task.name!r} is not built yet; valid values: {', '.join(TASKS)}"]
    task = make_task(cfg)
    errors = task.config_errors(cfg)
    if cfg.qat.kd_hidden > 0 and not cfg.qat.distill and not task.distills:
        # The hidden-state term needs the FP32 teacher, which QAT runs when qat.distill is set or the task
        # always distills (embedding) — the same rule as stages/qat.py.
        errors.append(f"qat.kd_hidden: {cfg.qat.kd_hidden} needs qat.distill=true (qat=kd); set qat.kd_hidden=0 or choose qat=kd")
    return errors
