"""Model + tokenizer loading: HF hub id, local folder, the embedded default, or tiny random weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel
from transformers import logging as hf_logging

from pipeline import _embedded_model_path
from pipeline.schema import ModelConfig

log = logging.getLogger(__name__)

# Head modules created fresh by from_pretrained when the checkpoint has no classification head.
_HEAD_HINTS = ("classifier", "score", "pre_classifier", "pooler", "head", "sequence_summary")


@dataclass
class Loaded:
    model: PreTrainedModel
    tokenizer: object
    head_trained: bool  # False when the task head was freshly initialized (needs finetune)


def load_model(cfg: ModelConfig, num_labels: int, device: torch.device) -> Loaded:
    """Load `cfg.name_or_path` (hub id or folder) for sequence classification with num_labels.

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
        model = AutoModelForSequenceClassification.from_config(config)
        return Loaded(model.to(device).eval(), tokenizer, head_trained=False)
    source = cfg.name_or_path
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if Path(source).expanduser().exists():
        source = str(Path(source).expanduser())
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the missing-head table is expected; we log one line instead
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=num_labels, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = list(info.get("missing_keys", [])) + [m[0] for m in info.get("mismatched_keys", [])]
    fresh = [k for k in missing if any(h in k for h in _HEAD_HINTS)]
    if fresh:
        log.info("load: task head initialized fresh (not in the checkpoint): %s", ", ".join(sorted(fresh)))
    return Loaded(model.to(device).eval(), tokenizer, head_trained=not fresh)
