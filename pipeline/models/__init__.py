"""Model + tokenizer loading: HF hub id, local folder, the embedded default, or tiny random weights.

Every weight the checkpoint does not provide is accounted for: a fresh task head is expected (the
default checkpoint is a sentence-embedding model), anything else (missing, mis-shaped or unused
backbone weights: the wrong checkpoint for the architecture) stops the run with the list, unless
model.allow_partial_load=true. What was re-initialized goes to manifest.json ("model_load").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel
from transformers import logging as hf_logging

from pipeline import _embedded_model_path
from pipeline.data.splits import first_of
from pipeline.schema import ConfigError, ModelConfig

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What `from_pretrained` could not take from the checkpoint (manifest.json "model_load")."""

    source: str
    random_init: bool = False  # model.random_init: every weight is random by request
    reinitialized: list[str] = field(default_factory=list)  # missing or mis-shaped: random init
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint (a, b) vs model (c, d)" (also in reinitialized)
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, unused by the model
    head: list[str] = field(default_factory=list)  # the expected part: task head / pooler keys among the above
    partial: list[str] = field(default_factory=list)  # the rest, accepted only with model.allow_partial_load


class CheckpointError(ConfigError):
    """The checkpoint does not fit the architecture: a summary, then one line per missing /
    mis-shaped / unused key (first 20 and a count). A ConfigError: the CLI prints it and exits 2."""

    def __init__(self, summary: str, problems: list[str]):
        self.problems = problems
        super().__init__(first_of(problems))
        self.args = (summary + "\n" + "\n".join(f"  - {e}" for e in self.errors),)


@dataclass
class Loaded:
    model: PreTrainedModel
    tokenizer: object
    head_trained: bool  # False when the task head was freshly initialized (needs finetune)
    report: LoadReport


def load_model(cfg: ModelConfig, num_labels: int, device: torch.device, auto_class=AutoModelForSequenceClassification) -> Loaded:
    """Load `cfg.name_or_path` (hub id or folder) as `auto_class` (the task's head) with num_labels.

    model.random_init=true builds the architecture of `cfg.model_type` with tiny dimensions
    (`cfg.tiny`) and random weights, using the embedded BERT tokenizer: no download, for tests and
    dry runs of any architecture.
    """
    if cfg.random_init:
        tokenizer = AutoTokenizer.from_pretrained(_embedded_model_path())
        config = AutoConfig.for_model(cfg.model_type, num_labels=num_labels, vocab_size=len(tokenizer), **cfg.tiny)
        # Special-token ids must exist in the (BERT) vocabulary we pair the architecture with.
        ids = {
            "pad": tokenizer.pad_token_id,
            "bos": tokenizer.cls_token_id,
            "eos": tokenizer.sep_token_id,
            "cls": tokenizer.cls_token_id,
            "sep": tokenizer.sep_token_id,
        }
        for name, value in ids.items():
            if getattr(config, f"{name}_token_id", None) is not None:
                setattr(config, f"{name}_token_id", value)
        model = auto_class.from_config(config)
        return Loaded(model.to(device).eval(), tokenizer, head_trained=False, report=LoadReport(cfg.model_type, random_init=True))
    source = cfg.name_or_path
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if Path(source).expanduser().exists():
        source = str(Path(source).expanduser())
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' load table: we account for every key ourselves below
    try:
        # ignore_mismatched_sizes: mis-shaped weights are reported in `info` (judged below) instead of
        # raising transformers' own error, which only covers shapes, not missing keys.
        model, info = auto_class.from_pretrained(
            source, num_labels=num_labels, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    report = _judge(model, info, source)
    if report.partial and not cfg.allow_partial_load:
        raise CheckpointError(
            f"model.name_or_path: {cfg.name_or_path} does not fit {type(model).__name__}: {len(report.partial)} backbone weights "
            "are missing, mis-shaped or unused (model.allow_partial_load=true re-initializes them at random):",
            report.partial,
        )
    if report.partial:
        log.warning(
            "load: model.allow_partial_load: %d backbone weights re-initialized or unused: %s",
            len(report.partial),
            ", ".join(report.partial),
        )
    if report.head:
        log.info("load: task head initialized fresh (not in the checkpoint): %s", ", ".join(report.head))
    head_fresh = any(k in report.reinitialized for k in report.head)
    return Loaded(model.to(device).eval(), tokenizer, head_trained=not head_fresh, report=report)


def _judge(model: PreTrainedModel, info: dict, source: str) -> LoadReport:
    """Sort every missing / mis-shaped / unused key into the expected task head and the rest.

    Expected: keys outside the base model (the task head, e.g. `classifier.*`; a checkpoint's own
    pretraining head such as `cls.predictions.*`, unused) and the base model's pooler (sentence-
    embedding and MLM checkpoints often lack it; only the classification head reads it). Everything
    else is backbone: embeddings, encoder layers.
    """
    prefix = model.base_model_prefix
    backbone_roots = {name.split(".")[0] for name, _ in model.base_model.named_parameters()} - {"pooler"}

    def is_head(key: str) -> bool:
        parts = key.split(".")
        if parts[0] == prefix:  # "bert.encoder.layer.0..." -> "encoder"; a base-model checkpoint has no prefix
            parts = parts[1:]
        return not parts or parts[0] not in backbone_roots

    mismatched = sorted(info.get("mismatched_keys", []), key=lambda m: m[0])
    report = LoadReport(
        source,
        reinitialized=sorted(set(info.get("missing_keys", [])) | {m[0] for m in mismatched}),
        mismatched=[f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in mismatched],
        unexpected=sorted(info.get("unexpected_keys", [])),
    )
    shapes = dict(zip((m[0] for m in mismatched), report.mismatched, strict=True))
    for key in report.reinitialized:
        (report.head if is_head(key) else report.partial).append(key)
    for key in report.unexpected:
        (report.head if is_head(key) else report.partial).append(key)
    # One line per problem for the error: what happened to each backbone key.
    report.partial = [
        f"mismatched: {shapes[k]}" if k in shapes else (f"missing: {k}" if k in report.reinitialized else f"unexpected: {k}")
        for k in report.partial
    ]
    return report
