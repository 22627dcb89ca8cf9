"""embedding: the checkpoint's own sentence embedding, pooled inside the exported graph.

The model is the encoder (AutoModel, no head) wrapped in `SentenceEmbedder`, whose forward pools the
token states as sentence-transformers does (mean over non-padding tokens, the first token, or the max
over non-padding tokens) and L2-normalizes when the checkpoint does: the ONNX graph's output
`sentence_embedding` (batch, hidden) is what a search index stores. The pooling is read from the
checkpoint folder's sentence-transformers files (modules.json, <Pooling path>/config.json) when they
exist; `task.pooling` / `task.normalize` set it otherwise (or override it).

No labels are needed: calibration reads text only; QAT distils the FP32 embeddings (1 - cosine, or MSE).
Metrics against the FP32 torch embeddings of the eval split, per precision: cosine (mean and 1st
percentile), recall@k agreement of nearest neighbours (cosine) over the eval split, and, since the
sources carry labels, leave-one-out k-NN accuracy (the headline `accuracy.<precision>`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel
from transformers.utils import ModelOutput

from pipeline.data import DataSplits, Split, encode, load_splits
from pipeline.data.batching import Encoded
from pipeline.schema import DataConfig, EmbeddingConfig, ModelConfig, TrainConfig
from pipeline.tasks.base import Models

log = logging.getLogger(__name__)


@dataclass
class Pooling:
    mode: str  # mean | cls | max
    normalize: bool
    source: str  # where the choice came from (metrics.json, report)


def read_sentence_transformers_pooling(folder: str | Path) -> Pooling | None:
    """The pooling of a sentence-transformers checkpoint folder, or None when it has no modules.json.

    modules.json lists the modules in order (Transformer, Pooling, optional Normalize); the Pooling
    module's config.json sets one `pooling_mode_*` flag. Several flags (concatenated poolings) and
    modes other than mean / CLS / max are refused: the graph would not be what the checkpoint means.
    """
    folder = Path(folder)
    if not (folder / "modules.json").is_file():
        return None
    modules = json.loads((folder / "modules.json").read_text())
    pool = next((m for m in modules if m.get("type", "").endswith(".Pooling")), None)
    normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
    if pool is None:
        return Pooling("mean", normalize, f"{folder}/modules.json (no Pooling module: sentence-transformers' default, mean)")
    conf = json.loads((folder / pool.get("path", "") / "config.json").read_text())
    flags = {
        "cls": conf.get("pooling_mode_cls_token", False),
        "mean": conf.get("pooling_mode_mean_tokens", False),
        "max": conf.get("pooling_mode_max_tokens", False),
    }
    other = [
        k
        for k, v in conf.items()
        if k.startswith("pooling_mode_") and v and k.removeprefix("pooling_mode_") not in ("cls_token", "mean_tokens", "max_tokens")
    ]
    chosen = [k for k, v in flags.items() if v]
    if other or len(chosen) != 1:
        raise ValueError(f"{folder}: pooling {chosen + other} is not supported (one of mean / cls / max); set task.pooling to choose one")
    return Pooling(chosen[0], normalize, f"{folder}/{pool.get('path', '')}/config.json + modules.json")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str, normalize: bool) -> torch.Tensor:
    """Token states (batch, seq, hidden) -> sentence embeddings (batch, hidden), as sentence-transformers'
    Pooling (+ Normalize) modules compute them."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    if mode == "mean":
        emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    elif mode == "cls":
        emb = hidden[:, 0]
    elif mode == "max":
        emb = hidden.masked_fill(mask == 0, -1e9).max(1).values
    else:
        raise ValueError(f"task.pooling: {mode!r}; valid values: mean, cls, max")
    return F.normalize(emb, p=2, dim=1) if normalize else emb


class SentenceEmbedder(torch.nn.Module):
    """Encoder + pooling as one module: `forward(**inputs).logits` is the sentence embedding (batch,
    hidden), the tensor the export traces (the pipeline's graph output slot), under `graph_output`'s name."""

    graph_output = ("sentence_embedding", {0: "batch"})

    def __init__(self, encoder: torch.nn.Module, pooling: Pooling):
        super().__init__()
        self.encoder = encoder
        self.pooling_mode, self.normalize = pooling.mode, pooling.normalize

    @property
    def config(self):
        return self.encoder.config

    def set_attn_implementation(self, impl: str) -> None:
        self.encoder.set_attn_implementation(impl)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> ModelOutput:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        pooled = pool(out.last_hidden_state, attention_mask, self.pooling_mode, self.normalize)
        if out.hidden_states is not None:  # output_hidden_states=True: QAT's hidden-state distillation
            return ModelOutput(logits=pooled, hidden_states=out.hidden_states)
        return ModelOutput(logits=pooled)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def neighbours(emb: np.ndarray, k: int) -> np.ndarray:
    """Indices (N, k) of each row's k nearest other rows by cosine similarity, nearest first."""
    x = emb / (np.linalg.norm(emb, axis=-1, keepdims=True) + 1e-12)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)  # a query is not its own neighbour
    k = min(k, len(emb) - 1)
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(sims, top, 1).argsort(1)[:, ::-1]
    return np.take_along_axis(top, order, 1)


def recall_per_query(reference: np.ndarray, other: np.ndarray, k: int) -> np.ndarray:
    """Per query, the fraction of its k nearest neighbours under `reference` that `other` also returns."""
    a, b = neighbours(reference, k), neighbours(other, k)
    return np.array([len(set(x) & set(y)) / a.shape[1] for x, y in zip(a, b)])


def recall_at_k(reference: np.ndarray, other: np.ndarray, k: int) -> float:
    """Mean fraction of each query's k nearest neighbours under `reference` that `other` also returns."""
    return float(recall_per_query(reference, other, k).mean())


def _target(values: np.ndarray, minimum: float) -> dict[str, float]:
    """A fidelity target on the tuning split: the mean, the half-width of its 95 % interval over the queries
    (the tuner counts a target met only when the whole interval clears the minimum), the minimum."""
    ci = 1.96 * float(values.std(ddof=1)) / np.sqrt(len(values)) if len(values) > 1 else 0.0
    return {"value": float(values.mean()), "ci95": ci, "minimum": minimum}


def knn_accuracy(emb: np.ndarray, labels: list[int], k: int) -> float:
    """Leave-one-out k-NN classification over the split: majority label of the k nearest other rows
    (cosine); a tie goes to the tied label with the larger summed similarity."""
    x = emb / (np.linalg.norm(emb, axis=-1, keepdims=True) + 1e-12)
    nn = neighbours(emb, k)
    y = np.asarray(labels[: len(emb)])
    sims = np.take_along_axis(x @ x.T, nn, 1)
    correct = 0
    for i in range(len(emb)):
        votes: dict[int, tuple[int, float]] = {}
        for j, s in zip(y[nn[i]], sims[i]):
            c, t = votes.get(int(j), (0, 0.0))
            votes[int(j)] = (c + 1, t + float(s))
        correct += max(votes, key=votes.get) == y[i]
    return correct / len(emb)


class Embedding:
    name = "embedding"
    output_name = "sentence_embedding"
    output_axes = {0: "batch"}
    token_level = False
    score_name = "k-NN accuracy"
    distills = True  # QAT learns from the FP32 embeddings, never from labels

    def __init__(self, cfg: EmbeddingConfig, model: ModelConfig):
        self.cfg = cfg
        self.model_cfg = model
        self.pooling: Pooling | None = None  # resolved at load
        self.eval_pool: int | None = None  # eval split size, learnt in load_splits: the density recall is judged at

    def resolve_pooling(self) -> Pooling:
        """task.pooling / task.normalize, with `auto` / null taken from the checkpoint folder's
        sentence-transformers config, else sentence-transformers' own default for a plain checkpoint
        (mean, no normalization)."""
        found = None
        if not self.model_cfg.random_init:
            found = read_sentence_transformers_pooling(_checkpoint_folder(self.model_cfg))
        mode = self.cfg.pooling if self.cfg.pooling != "auto" else (found.mode if found else "mean")
        normalize = self.cfg.normalize if self.cfg.normalize is not None else (found.normalize if found else False)
        source = found.source if found else "no sentence-transformers config: mean pooling, no normalization"
        if self.cfg.pooling != "auto" or self.cfg.normalize is not None:
            source += f"; task.pooling={self.cfg.pooling}, task.normalize={self.cfg.normalize}"
        return Pooling(mode, normalize, source)

    def load_splits(self, cfg: DataConfig) -> DataSplits:
        splits = load_splits(cfg)  # texts (+ labels, used only for k-NN accuracy)
        self.eval_pool = len(splits.eval)  # its size only: what the tuning split's recall must stand for
        return splits

    def density_k(self, n: int) -> int:
        """The k whose recall among `n` tuning examples stands for recall@recall_k among the eval split's:
        the same fraction of the pool (k * (n - 1) / (eval - 1), at least 1). Recall falls as the pool grows
        (more close neighbours to confuse): measured on all-mpnet-base-v2, recall@10 0.9083 among 400 tuning
        examples and 0.9025 among 1,000 eval ones; on a synthetic pool, recall@10 of 400-example subsets
        0.948 against the whole 1,000's 0.912, and recall@4 of the subsets 0.905."""
        k = self.cfg.recall_k
        if not self.eval_pool or self.eval_pool < 2 or n < 2:
            return k
        return max(1, min(n - 1, round(k * (n - 1) / (self.eval_pool - 1))))

    def load_model(self, cfg: ModelConfig, num_labels: int, device: torch.device):
        from pipeline.models import load_model

        self.pooling = self.resolve_pooling()
        log.info("embedding: %s pooling, normalize=%s (%s)", self.pooling.mode, self.pooling.normalize, self.pooling.source)
        loaded = load_model(cfg, num_labels, device, AutoModel)
        loaded.model = SentenceEmbedder(loaded.model, self.pooling).to(device).eval()
        loaded.head_trained = True  # no task head: pooling has no weights
        return loaded

    def encode(self, tokenizer, split: Split, max_length: int) -> Encoded:
        return encode(tokenizer, split, max_length)

    def cache_parts(self) -> tuple:
        return (self.name, self.cfg.pooling, self.cfg.normalize, self.cfg.distill_loss)

    def objective(self, net, inputs: dict, labels: torch.Tensor, teacher: torch.nn.Module | None, tcfg: TrainConfig) -> torch.Tensor:
        """Distillation to the frozen FP32 embeddings (labels unused)."""
        if teacher is None:
            raise ValueError("task=embedding trains only by distillation from the FP32 model (no teacher given)")
        out = net(**inputs).logits
        with torch.no_grad():
            target = teacher(**inputs).logits
        if self.cfg.distill_loss == "mse":
            return F.mse_loss(out, target)
        return (1 - F.cosine_similarity(out, target, dim=-1)).mean()

    def selection(self, models: Models, data: Encoded, batch_size: int, reference: dict) -> dict:
        """Best state on the tuning split: fidelity to the FP32 embeddings (mean cosine; loss 1 - cosine)."""
        if models.fp32 is None:
            raise ValueError("embedding: best-state selection compares to the FP32 model, which exists only once quantized (qat)")
        if "fp32" not in reference:
            reference["fp32"] = models.outputs(data, batch_size, token_level=False, fp32=True)
        out = models.outputs(data, batch_size, token_level=False)
        d = self.divergence(reference["fp32"], out)
        return {"accuracy": 1.0 - float(d.mean()), "loss": float(d.mean()), "measure": "mean cosine to FP32"}

    def divergence(self, reference: np.ndarray, outputs: np.ndarray) -> np.ndarray:
        """1 - cosine to the FP32 embedding, per example."""
        return 1.0 - cosine_rows(outputs, reference)

    def expected_loss(self, reference: np.ndarray, outputs: np.ndarray) -> None:
        return None  # vectors, not class probabilities

    def fidelity_targets(self, reference: np.ndarray, outputs: np.ndarray) -> dict:
        """Mean cosine and recall@k of the nearest neighbours against FP32's (task.min_cosine, task.min_recall),
        each with its 95 % interval over the tuning queries (the tuner asks the interval to clear the minimum).
        recall@recall_k is reported for the eval split, so it is judged at the eval pool's density
        (`density_k`: recall@4 among 400 tuning examples for recall@10 among 1,000 eval ones); the entry
        keeps the k and pool it was measured with."""
        k = self.cfg.recall_k
        out = {"cosine_mean": _target(cosine_rows(outputs, reference), self.cfg.min_cosine)}
        kk = self.density_k(len(outputs))
        if len(outputs) > kk:
            out[f"recall_at_{k}"] = _target(recall_per_query(reference, outputs, kk), self.cfg.min_recall) | {"k": kk, "pool": len(outputs)}
        return out

    def correct(self, outputs: np.ndarray, data: Encoded) -> None:
        return None  # k-NN accuracy depends on the other examples: no per-example paired interval

    def config_errors(self, cfg) -> list[str]:
        errors = []
        if cfg.finetune.enabled:
            errors.append(
                "finetune: task=embedding uses the checkpoint's own embedding and has no labelled training objective; "
                "finetune=default cannot be combined with it (choose finetune=none, the task's default)"
            )
        num_tune = getattr(cfg.data, "num_tune", None)
        if cfg.tune.enabled and num_tune is not None and 0 < num_tune <= self.cfg.knn_k:
            errors.append(
                f"data.num_tune: {num_tune} examples cannot score task=embedding's k-NN accuracy (task.knn_k={self.cfg.knn_k}) "
                f"for tune={cfg.tune.method}; set data.num_tune > {self.cfg.knn_k}"
            )
        return errors

    def score(self, outputs: np.ndarray, data: Encoded) -> float | None:
        return knn_accuracy(outputs, data.labels, self.cfg.knn_k) if len(outputs) > self.cfg.knn_k else None

    def parity(self, quantized: np.ndarray, fake_quant: np.ndarray) -> dict[str, Any]:
        cos = cosine_rows(quantized, fake_quant)
        return {
            "argmax_agreement": None,  # no classes: agreement is measured on neighbours
            "cosine": float(cos.mean()),
            "cosine_p1": float(np.percentile(cos, 1)),
            f"recall_at_{self.cfg.recall_k}": recall_at_k(fake_quant, quantized, self.cfg.recall_k) if len(cos) > 1 else None,
            "n": int(len(cos)),
        }

    def task_metrics(self, outputs: dict[str, np.ndarray], data: Encoded) -> dict[str, Any]:
        """embedding.<precision>.{cosine_mean, cosine_p1, recall_at_10, knn_accuracy} against FP32 torch."""
        ref = outputs.get("fp32")
        if ref is None:
            return {}
        k = self.cfg.recall_k
        out: dict[str, Any] = {"pooling": {"mode": self.pooling.mode, "normalize": self.pooling.normalize, "source": self.pooling.source}}
        out["fp32"] = {"knn_accuracy": self.score(ref, data)}
        for label, emb in outputs.items():
            if label == "fp32":
                continue
            cos = cosine_rows(emb, ref)
            out[label] = {
                "cosine_mean": float(cos.mean()),
                "cosine_p1": float(np.percentile(cos, 1)),
                f"recall_at_{k}": recall_at_k(ref, emb, k),
                "knn_accuracy": self.score(emb, data),
            }
        return out

    def report_rows(self, d: dict) -> list[tuple[str, str]]:
        m = d.get(self.name) or {}
        k = self.cfg.recall_k
        rows = []
        if "pooling" in m:
            rows.append(("embedding pooling", f"{m['pooling']['mode']}, normalize={m['pooling']['normalize']}"))
        for label, v in m.items():
            if label in ("pooling", "fp32"):  # FP32's k-NN accuracy is the table's first row
                continue
            rows.append(
                (
                    f"embedding {label} vs FP32",
                    f"cosine mean {v['cosine_mean']:.5f}, p1 {v['cosine_p1']:.5f}, recall@{k} {v[f'recall_at_{k}']:.4f}, "
                    f"k-NN {_pct(v['knn_accuracy'])}",
                )
            )
        return rows

    def parity_text(self, p: dict) -> str:
        if not p or p.get("cosine") is None:
            return "—"
        k = self.cfg.recall_k
        r = p.get(f"recall_at_{k}")
        return f"cosine mean {p['cosine']:.5f}, p1 {p['cosine_p1']:.5f}" + (f", recall@{k} {r:.4f}" if r is not None else "")


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f} %"


def _checkpoint_folder(cfg: ModelConfig) -> Path:
    """The local folder of the checkpoint (the embedded default, a path) or the hub snapshot holding
    its modules.json (downloaded or from the cache); a folder without one when neither exists."""
    p = Path(cfg.name_or_path).expanduser()
    if p.is_dir():
        return p
    try:
        from transformers.utils import cached_file

        found = cached_file(cfg.name_or_path, "modules.json", _raise_exceptions_for_missing_entries=False)
        if found:
            folder = Path(found).parent
            pool = next((m for m in json.loads(Path(found).read_text()) if m.get("type", "").endswith(".Pooling")), None)
            if pool is not None:
                cached_file(cfg.name_or_path, f"{pool['path']}/config.json")
            return folder
    except Exception as exc:  # offline, no such repo: the configured / default pooling applies
        log.info("embedding: no sentence-transformers config for %s (%s)", cfg.name_or_path, exc)
    return p
