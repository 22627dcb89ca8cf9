"""Structured-config schemas (one dataclass per config group) and the start-up validation.

The YAML files under conf/ hold values; these dataclasses hold the keys, types, allowed values and
ranges. `validate(cfg)` checks the composed config against them, collects *every* problem and raises
one ConfigError naming each key and what is allowed, before any stage runs. It returns the typed
`RunConfig` the stages read (attribute access, defaults filled in). The rules that live with the layers
above (each task's, a tuned plan's) come in as `cross_checks`: call pipeline.validation.validate, which
passes them all (a finished run's config, reloaded by the predictor, needs only this module's checks).

The schemas are applied by this validator rather than registered in Hydra's ConfigStore on purpose:
Hydra's own type checks stop at the first error; users fixing a config want them all at once.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """Every problem found in a composed config, one line each."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        n = len(errors)
        super().__init__(f"invalid configuration ({n} error{'s' if n != 1 else ''}):\n" + "\n".join(f"  - {e}" for e in errors))


# Keys that were removed, each with what to write now (refused with this message on the command line and in
# YAML). The selection keys became quant.rules (one mechanism).
_RULES = "replaced by quant.rules; write "
REPLACED = {
    "export.exporter": "removed: the legacy TorchScript exporter is the only one (it maps fake-quant to Q/DQ); drop the key",
    "quant.include": _RULES + "a rule that disables the rest and one that enables yours (later rules win): "
    "'+quant.rules.rest={name: [\"*\"], enable: false}' '+quant.rules.mine={name: [\"<quantizer-name glob>\"], enable: true}'",
    "quant.exclude": _RULES + "'+quant.rules.<label>={name: [\"<module glob>.*\"], enable: false}' (globs over quantizer names, "
    "quant_map.json; conf/quant/gemm.yaml's `heads` rule keeps the task heads in float)",
    "quant.exclude_roles": _RULES + "'+quant.rules.<label>={roles: [<role>, ...], enable: false}'",
    "calibration.overrides": _RULES + "'+quant.rules.<label>={name: [<globs>], roles: [<roles>], method: <method>, percentile: <p>}'",
}


def _range(lo: float | None = None, hi: float | None = None) -> dict[str, float | None]:
    return {"min": lo, "max": hi}


@dataclass
class ModelConfig:
    name: str
    name_or_path: str
    model_type: str = "bert"
    max_length: int = field(default=128, metadata=_range(8, 8192))
    random_init: bool = False
    trust_remote_code: bool = False
    # Accept a checkpoint whose backbone weights are missing or mis-shaped (re-initialized at random,
    # listed in manifest.json). Off: only a fresh task head is accepted; anything else stops the run.
    allow_partial_load: bool = False
    # Tiny random architecture for model.random_init (tests, dry runs, offline architecture checks).
    tiny: dict[str, Any] = field(
        default_factory=lambda: {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
    )


@dataclass
class DataConfig:
    name: str
    source: Literal["movie_snippets", "csv", "hub"]
    num_train: int | None = field(default=None, metadata=_range(1))
    num_calib: int = field(default=512, metadata=_range(1))
    num_eval: int | None = field(default=None, metadata=_range(1))
    # Held-out tuning split (accuracy-budget search, QAT best-state selection): disjoint from train,
    # calibration and eval, so no decision ever reads the eval split. null = auto: 400 examples, at most a
    # tenth of the training data; 0 = no tuning split.
    num_tune: int | None = field(default=None, metadata=_range(0))
    split_seed: int = 0
    train_path: str | None = None
    eval_path: str | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    # The classes in id order (strings or integers, matched by their text); see pipeline/data/labels.py.
    labels: list[Any] | None = None
    # Encoding of data.train_path / data.eval_path (utf-8 also reads a byte-order mark).
    encoding: str = "utf-8"


@dataclass
class TrainConfig:
    """One schema for both training stages (finetune = FP32, qat = quantizers active)."""

    enabled: bool = True
    epochs: int = field(default=1, metadata=_range(1))
    # Batches of similar lengths (Hugging Face Trainer's group_by_length, megabatches of 50 batches): less padding,
    # the same examples per epoch. Off = plain shuffled batches.
    group_by_length: bool = True
    max_steps: int | None = field(default=None, metadata=_range(1))
    lr: float = field(default=5e-5, metadata=_range(0.0, 1.0))
    batch_size: int = field(default=32, metadata=_range(1))
    warmup_ratio: float = field(default=0.06, metadata=_range(0.0, 1.0))
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: float = field(default=0.01, metadata=_range(0.0, 1.0))
    grad_clip: float | None = field(default=1.0, metadata=_range(0.0))
    eval_each_epoch: bool = False
    checkpoint_every: int = field(default=0, metadata=_range(0))
    # QAT only: distillation from the frozen FP32 model (loss = a*task + (1-a)*T^2*KL).
    distill: bool = False
    kd_alpha: float = field(default=0.5, metadata=_range(0.0, 1.0))
    kd_temperature: float = field(default=2.0, metadata=_range(0.01))
    # QAT only: amax fixed after calibration (default) or trained (LSQ-style gradient).
    learn_amax: bool = False
    # Train with the model's own dropout (true), or with every dropout at rate 0 (false). Distillation towards the
    # FP32 model's function (qat=kd_best, qat=auto) turns it off: the teacher runs without dropout, so with it the
    # student is pulled towards undoing its dropout noise rather than its quantization error.
    dropout: bool = True
    # Training seed (null = the run's seed).
    seed: int | None = None
    # Best-state selection on the tuning split (data.num_tune; never the eval split): evaluate at the start,
    # every `eval_every` optimizer steps (0 = only at epoch ends), at each epoch end when eval_each_epoch,
    # and at the end; keep_best restores the best state, so training cannot end below where it started.
    # null: every quarter of the run's steps (four evaluations after the start, whatever the data size).
    eval_every: int | None = field(default=0, metadata=_range(0))
    keep_best: bool = False
    # With keep_best: stop once this many evaluations in a row (every eval_every steps) found no better state
    # than the best so far (null = train to the end). The state kept is the same best either way, unless a
    # later one would have beaten it.
    patience: int | None = field(default=None, metadata=_range(1))
    # What keep_best compares: accuracy on the tuning split (ties: lower loss), or kl = mean KL(FP32 || model)
    # of the logits on it (qat only: the FP32 model is the reference). Accuracy on a few hundred examples
    # moves in 1-example steps, so its maximum over several states is partly luck; KL measures fidelity.
    # Tasks with their own selection measure use it either way (embedding: cosine to FP32; token
    # classification / QA: their F1 on the tuning split).
    select_by: Literal["accuracy", "kl"] = "accuracy"
    # QAT only, with distill: weight of a hidden-state term added to the logit distillation: the mean over
    # layers of the squared error between student and teacher layer outputs (non-padding tokens), divided by
    # the teacher's mean square (scale-free, so one weight fits every layer and model). 0 = logits only.
    kd_hidden: float = field(default=0.0, metadata=_range(0.0))
    # At least this many optimizer steps (epochs repeat until reached): one epoch of a small dataset is few
    # steps (1,500 examples at batch 32 = 47). null = `epochs` decides; max_steps overrides both.
    min_steps: int | None = field(default=None, metadata=_range(1))
    # At most this many optimizer steps from epochs / min_steps (null: no cap; max_steps, when set, wins):
    # one epoch of a small training set, a fixed amount of work on a large one.
    cap_steps: int | None = field(default=None, metadata=_range(1))


@dataclass
class CalibrationConfig:
    method: Literal["max", "percentile", "entropy", "mse", "none"]
    num_batches: int = field(default=16, metadata=_range(1))
    batch_size: int = field(default=32, metadata=_range(1))
    num_bins: int = field(default=2048, metadata=_range(16))
    skip_zeros: bool = False
    percentile: float = field(default=99.99, metadata=_range(0.0, 100.0))
    start_bin: int = field(default=128, metadata=_range(1))
    stride: int = field(default=1, metadata=_range(1))


@dataclass
class SmoothingConfig:
    """Outlier migration (SmoothQuant-style) on the inputs of selected Linears (pipeline/quantization/smoothing.py).

    Per input channel j: s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha) from the calibration split; the
    Linear computes (X * (1/s)) @ (W * s)^T: an explicit Mul on its input branch (exported Mul -> Q/DQ ->
    MatMul) and s folded into the weight. Exact in FP32; every GEMM stays INT8. method=split instead splits
    each outlier channel into copies (Gather -> Mul -> Q/DQ -> MatMul, weight columns copied).
    """

    enabled: bool = False
    # migrate: SmoothQuant's s (alpha); split: outlier channel splitting (split_ratio, max_extra).
    method: Literal["migrate", "split"] = "migrate"
    alpha: float = field(default=0.5, metadata=_range(0.0, 1.0))
    # split: no copy's max above split_ratio x the median channel's max ...
    split_ratio: float = field(default=2.0, metadata=_range(1.0))
    # ... adding at most this fraction of the Linear's input channels (the limit rises where it would add more).
    max_extra: float = field(default=0.0625, metadata=_range(0.0, 1.0))
    # fnmatch globs over Linear module names (quantized Linears only).
    modules: list[str] = field(default_factory=list)


# What a quantized tensor is (quant_map.json "role"): the one list, used by the quantizers and the rules.
Role = Literal["linear_input", "linear_weight", "attn_q", "attn_k", "attn_v", "attn_probs", "attn_rel", "residual"]


@dataclass
class QuantRule:
    """One quantizer-selection rule (quant.rules): which quantizers (name globs AND roles), and what to set
    on them. Fields left null change nothing, so a later rule can refine one field of an earlier one."""

    # fnmatch globs over quantizer names (quant_map.json "name", e.g. bert.encoder.layer.0.output.dense.input_quantizer);
    # [] = any name.
    name: list[str] = field(default_factory=list)
    # Roles the rule applies to ([] = any role).
    roles: list[Role] = field(default_factory=list)
    # Quantize (true) or leave in float (false).
    enable: bool | None = None
    # Activation calibration method for these quantizers (weights are always per-channel max; a rule with a
    # method never applies to linear_weight).
    method: Literal["max", "percentile", "entropy", "mse"] | None = None
    # Percentile for method percentile (null = calibration.percentile).
    percentile: float | None = field(default=None, metadata=_range(0.0, 100.0))


@dataclass
class QuantConfig:
    # int8 (default; every engine) or fp8 (E4M3, scale amax/448: Hopper and later under TensorRT;
    # ONNX Runtime CPU emulates FP8 Q/DQ in float, so it measures FP8 accuracy but not FP8 speed).
    format: Literal["int8", "fp8"] = "int8"
    # INT8 weight range. ONNX Runtime's x86 int8 GEMM without VNNI (AVX2 / SSE: vpmaddubsw) adds pairs
    # of u8 x s8 products into int16 and saturates once |weight| > 64: full-range int8 weights give
    # wrong results there. reduced = 7-bit weights (-64..63, scale amax/63), ONNX Runtime's own
    # `reduce_range` remedy; full = -128..127; auto = reduced exactly when the ONNX Runtime CPU engine
    # runs on an x86 CPU without VNNI (the manifest records what was chosen and why).
    weight_range: Literal["auto", "full", "reduced"] = "auto"
    # Linear inputs: symmetric int8 (zero point 0: what TensorRT and FP8 take) or asymmetric uint8 with a zero
    # point over the calibrated range's signed extremes (ONNX Runtime and OpenVINO on CPUs: u8 x s8 is also
    # their native int8 GEMM). Most Linear inputs are lopsided (the GELU output feeding each FFN's second
    # Linear is >= -0.17), so symmetric spends half its levels on values that never occur; on the embedded
    # model asymmetric halves the KL to FP32 (docs/results/adaptive-default.md). auto = asymmetric unless
    # the engine runs TensorRT, the format is fp8 or qat.learn_amax is on (the manifest records why).
    activations: Literal["auto", "symmetric", "asymmetric"] = "auto"
    linear: bool = True
    attention: bool = True
    residual: bool = False
    # Which quantizers are on and how each activation is calibrated: ordered rules, label -> rule, applied
    # in order with the later rule winning per field (pipeline/quantization/rules.py; ModelOpt's wildcard
    # quant_cfg works the same way). A module none of whose quantizers stays enabled is not quantized at all.
    #   +quant.rules.no_layer0={name: ["*.layer.0.*"], enable: false}
    rules: dict[str, QuantRule] = field(default_factory=dict)
    # Attention classes that compute their own GEMMs (no attention interface): quantized by
    # intercepting torch.matmul / torch.bmm inside their forward (pipeline/quantization/matmul_mode.py).
    matmul_attention_classes: list[str] = field(default_factory=lambda: ["DisentangledSelfAttention", "MPNetSelfAttention"])


@dataclass
class ExportConfig:
    enabled: bool = True
    opset: int = field(default=17, metadata=_range(13, 21))
    fold_weights: bool = True
    # Also write the graphs TensorRT builds (model_fp16.onnx, model_int8_trt.onnx / model_fp8.onnx),
    # checked against TensorRT's rules; always on with engine=tensorrt.
    tensorrt_graphs: bool = True


@dataclass
class EngineConfig:
    """What every engine's config has: its name, which picks the schema of the rest (engine=<name>, conf/engine/).
    Each engine reads only its own keys; a key of another engine is refused by name (ENGINE_CONFIGS)."""

    # auto: the CPU engine measured fastest for CPUs like this one (pipeline/engines auto_engine), chosen
    # before any stage and recorded in metrics.json engine_choice.
    name: Literal["auto", "onnxruntime", "openvino", "tensorrt", "none"] = "none"


@dataclass
class _CpuThreads:
    intra_op_threads: int = field(default=0, metadata=_range(0))


@dataclass
class _TensorRTBuild:
    """TensorRT's builder settings: engine=tensorrt, and ONNX Runtime's TensorrtExecutionProvider (same profile)."""

    # No precision keys: networks are strongly typed (TensorRT 11 has no other mode), so each plan's precision is
    # its graph's (model_fp16.onnx, model_int8_trt.onnx, model_fp8.onnx).
    device_id: int = field(default=0, metadata=_range(0))
    workspace_gb: float = field(default=4.0, metadata=_range(0.0625))
    optimization_level: int = field(default=3, metadata=_range(0, 5))
    timing_cache: str | None = "outputs/.cache/tensorrt/timing.cache"
    min_batch: int = field(default=1, metadata=_range(1))
    opt_batch: int = field(default=8, metadata=_range(1))
    max_batch: int = field(default=64, metadata=_range(1))
    min_seq: int = field(default=1, metadata=_range(1))
    opt_seq: int = field(default=128, metadata=_range(1))
    max_seq: int = field(default=512, metadata=_range(1))


@dataclass
class _OnnxRuntime:
    providers: list[Literal["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]] = field(
        default_factory=lambda: ["CPUExecutionProvider"]
    )
    allow_spinning: bool = False
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    save_optimized: bool = True
    # Apply ONNX Runtime's transformer fusions (SkipLayerNormalization, BiasGelu, LayerNormalization) to the
    # INT8 graph before the session is made (<graph>.fused.onnx in the run folder). Off: on the AVX2 CPU
    # measured, ORT's CPU SkipLayerNormalization took longer than the Add + LayerNormalization it replaces
    # (benchmarks/ort_int8_speed.py --profile); measure on your CPU before turning it on.
    transformer_fusions: bool = False
    # Per-provider options, e.g. {TensorrtExecutionProvider: {trt_builder_optimization_level: 5}} (the TensorRT
    # provider's profile and caches come from the TensorRT keys).
    provider_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class _OpenVino:
    # Precision of the layers a quantized engine leaves float (INFERENCE_PRECISION_HINT). auto = the rule
    # measured per CPU (pipeline/engines/openvino.py float_layer_precision: the plugin's bf16 on AMX, f32
    # elsewhere); default = the plugin's own choice (bf16 on CPUs with AMX / AVX512_BF16, else f32); bf16 / f16
    # only where the CPU has them (engine.check refuses them otherwise). Float engines run in their own label.
    inference_precision: Literal["auto", "default", "f32", "bf16", "f16"] = "auto"


@dataclass
class NoEngineConfig(EngineConfig):
    name: Literal["none"] = "none"


@dataclass
class OnnxRuntimeEngineConfig(_TensorRTBuild, _OnnxRuntime, _CpuThreads, EngineConfig):
    name: Literal["onnxruntime"] = "onnxruntime"


@dataclass
class OpenVinoEngineConfig(_OpenVino, _CpuThreads, EngineConfig):
    name: Literal["openvino"] = "openvino"


@dataclass
class TensorRTEngineConfig(_TensorRTBuild, EngineConfig):
    name: Literal["tensorrt"] = "tensorrt"


@dataclass
class AutoEngineConfig(_OpenVino, _OnnxRuntime, _CpuThreads, EngineConfig):
    """engine=auto resolves to ONNX Runtime or OpenVINO on the CPU: it takes the keys of both."""

    name: Literal["auto"] = "auto"


ENGINE_CONFIGS: dict[str, type[EngineConfig]] = {
    "auto": AutoEngineConfig,
    "onnxruntime": OnnxRuntimeEngineConfig,
    "openvino": OpenVinoEngineConfig,
    "tensorrt": TensorRTEngineConfig,
    "none": NoEngineConfig,
}


def engine_config(name: str, like: EngineConfig | None = None, **fields: Any) -> EngineConfig:
    """Engine `name`'s typed config: the keys it shares with `like` (another engine's config: engine=auto's
    resolution, a peer or the CPU fallback built from the run's), then `fields`, each one this engine reads."""
    cls = ENGINE_CONFIGS[name]
    own = {f.name for f in dataclasses.fields(cls)} - {"name"}
    kept = {k: getattr(like, k) for k in own if like is not None and hasattr(like, k)}
    unknown = set(fields) - own
    if unknown:
        raise TypeError(f"engine={name} has no key {', '.join(sorted(unknown))}; its keys: {', '.join(sorted(own))}")
    return cls(**copy.deepcopy(kept) | fields)


PeerName = Literal[
    "ort_fp32_fused",
    "ort_dynamic",
    "ort_dynamic_fused",
    "ort_static",
    "nncf_ptq",
    "int8_onnxruntime",
    "int8_openvino",
    "ov_fp32",
    "ov_bf16",
    "ov_fp16",
]


@dataclass
class BenchmarkConfig:
    enabled: bool = True
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    seq_lens: list[int] = field(default_factory=lambda: [32, 128])
    headline_batch: int = field(default=8, metadata=_range(1))
    headline_seq: int = field(default=128, metadata=_range(1))
    # Untimed rounds per cell; with cell_seconds, warm-up stops after a quarter of it once every call ran once
    # (batch 32 x seq 128 with every peer: a round takes ~3 s on 2 cores).
    warmup: int = field(default=5, metadata=_range(0))
    iters: int = field(default=30, metadata=_range(1))
    # A grid cell stops taking turns after this many seconds once every call has min_iters timings (slow
    # cells: batch 32 x seq 128 with every peer took 88 s for 30 rounds); null = always `iters`.
    cell_seconds: float | None = field(default=20.0, metadata=_range(0.0))
    min_iters: int = field(default=10, metadata=_range(1))
    # Also time the FP32 and fake-quant torch models (reference rows, same interleaving).
    include_torch: bool = False
    # Other quantizers (ONNX Runtime's, NNCF's) and float engines built from model_fp32.onnx
    # (pipeline/engines/peers.py PEERS), evaluated on the eval split and timed interleaved with our
    # engines. CPU engines (onnxruntime, openvino) only; [] = off.
    peers: list[PeerName] = field(default_factory=lambda: list(typing.get_args(PeerName)))
    # The serving-shaped row: the eval split's real lengths, length-sorted batches of headline_batch
    # padded to each batch's longest example; `real_length_passes` timed passes over at most
    # `real_length_examples` examples (0 = off).
    real_length_examples: int = field(default=512, metadata=_range(0))
    real_length_passes: int = field(default=3, metadata=_range(1))


@dataclass
class EvaluateConfig:
    enabled: bool = True
    batch_size: int = field(default=64, metadata=_range(1))
    max_examples: int | None = field(default=None, metadata=_range(1))
    parity_batches: int = field(default=8, metadata=_range(1))


@dataclass
class CacheConfig:
    enabled: bool = True
    dir: str = "outputs/.cache"
    # Every code or library change keys new entries and leaves the old ones unreachable, so an uncapped
    # cache only grows (a base-size model's fine-tune or export entry is ~0.4 GB). After each store the
    # least recently used entries are removed until the folder holds at most this much; null: no limit.
    max_gb: float | None = field(default=20.0, metadata=_range(0.0))


@dataclass
class TaskConfig:
    """What the model is for (conf/task/, pipeline/tasks/): its name picks the schema of the task's own keys."""

    name: Literal["sequence_classification", "embedding", "token_classification", "question_answering"] = "sequence_classification"


@dataclass
class SequenceClassificationConfig(TaskConfig):
    name: Literal["sequence_classification"] = "sequence_classification"


@dataclass
class EmbeddingConfig(TaskConfig):
    name: Literal["embedding"] = "embedding"
    # Pooling inside the exported graph. auto = the checkpoint's sentence-transformers config (modules.json +
    # 1_Pooling/config.json), else mean; normalize null = the checkpoint's Normalize module, else off.
    pooling: Literal["auto", "mean", "cls", "max"] = "auto"
    normalize: bool | None = None
    # QAT loss against the FP32 embeddings (no labels).
    distill_loss: Literal["cosine", "mse"] = "cosine"
    recall_k: int = field(default=10, metadata=_range(1))
    knn_k: int = field(default=10, metadata=_range(1))
    # What the accuracy budget (tune) also requires of the quantized embeddings against FP32's on the tuning
    # split: mean cosine and recall@recall_k of the nearest neighbours.
    min_cosine: float = field(default=0.99, metadata=_range(0.0, 1.0))
    min_recall: float = field(default=0.90, metadata=_range(0.0, 1.0))


@dataclass
class TokenClassificationConfig(TaskConfig):
    name: Literal["token_classification"] = "token_classification"
    # The columns holding each row's word list and tag list (CSV cells / JSON lists / hub).
    tokens_column: str = "tokens"
    tags_column: str = "ner_tags"


@dataclass
class QuestionAnsweringConfig(TaskConfig):
    name: Literal["question_answering"] = "question_answering"
    # Overlap of consecutive context windows (tokens), longest answer (tokens), top starts / ends searched per
    # window, and the columns (SQuAD format: answers = {text: [...], answer_start: [...]}).
    doc_stride: int = field(default=128, metadata=_range(0))
    max_answer_length: int = field(default=30, metadata=_range(1))
    n_best: int = field(default=20, metadata=_range(1))
    # With data=movie_snippets: synthetic questions per training context, one per entity type (1-3; eval and
    # calibration contexts: one each).
    synthetic_train_questions: int = field(default=1, metadata=_range(1, 3))
    question_column: str = "question"
    context_column: str = "context"
    answers_column: str = "answers"


TASK_CONFIGS: dict[str, type[TaskConfig]] = {
    "sequence_classification": SequenceClassificationConfig,
    "embedding": EmbeddingConfig,
    "token_classification": TokenClassificationConfig,
    "question_answering": QuestionAnsweringConfig,
}


@dataclass
class ObjectiveConfig:
    """What a run returns to a sweeper such as Optuna (pipeline/objective.py; conf/sweep/optuna*.yaml).

    metric=accuracy: the quantized engine's accuracy (maximize). metric=latency: its p50 latency at the
    headline shape (minimize), subject to quantized accuracy >= min_accuracy: a constraint, not a weighted
    sum; a run under the floor returns a value worse than every run above it.
    """

    metric: Literal["accuracy", "latency"] = "accuracy"
    # Accuracy floor (fraction, e.g. 0.84) for metric=latency; null = no floor.
    min_accuracy: float | None = field(default=None, metadata=_range(0.0, 1.0))


# Calibrators the accuracy-budget search can choose from (pipeline/tune/calibrators.py): every
# histogram method computed from the one calibration pass's histograms.
TuneCalibrator = Literal["max", "percentile_99_9", "percentile_99_99", "percentile_99_999", "entropy", "mse"]


@dataclass
class TuneConfig:
    """Accuracy budget (config group `tune`; stage `tune` between calibrate and qat; pipeline/tune/).

    Every decision is made on the tuning split (data.num_tune); the eval split only reports.
    """

    # auto = the adaptive recipe (pipeline/tune/auto.py): calibrator, then QAT, then fallback, each only while
    # the budget is not met; accuracy = calibrator + fallback search; none = the run's settings as they are.
    method: Literal["none", "accuracy", "auto"] = "none"
    # Allowed accuracy drop of fake-quant vs FP32 on the tuning split: percentage points (absolute) or
    # percent of the FP32 accuracy (relative).
    max_drop: float = field(default=0.5, metadata=_range(0.0, 100.0))
    drop_type: Literal["absolute", "relative"] = "absolute"
    # Calibrators scored on the tuning split (activation amax from the one collection pass); [] = keep
    # the run's calibration.
    calibrators: list[TuneCalibrator] = field(
        default_factory=lambda: ["max", "percentile_99_9", "percentile_99_99", "percentile_99_999", "entropy", "mse"]
    )
    # What decides between candidates (calibrators, fallback steps), both on the whole tuning split:
    # kl = the mean KL(FP32 || quantized) of the outputs (every example's whole distribution: far less
    # noisy than the accuracy of a few hundred examples); accuracy = the tuning accuracy. The budget
    # (max_drop) is always checked on the accuracy.
    criterion: Literal["kl", "accuracy"] = "kl"
    # Then the best calibrator per group of activation quantizers, one evaluation per group and other
    # candidate, keeping what improves (one pass of coordinate descent): role = every quantizer of one role
    # (linear_input, attn_q, ...); slot = one position in every layer (the Q/K/V Linears' input, the FFN
    # second Linear's input, ...). The result is written as quant.rules (tuned_quant.yaml `rules`).
    calibrator_per: Literal["none", "role", "slot"] = "none"
    # tune=auto: where the budget is not met after the calibrator, split the outlier channels of every quantized
    # Linear's input (smoothing.method=split with smoothing.split_ratio / max_extra; pipeline/quantization/smoothing.py),
    # re-calibrate those inputs and choose the calibrator again; kept where the KL falls. Skipped when the run
    # configures smoothing itself.
    split_outliers: bool = True
    # tune=auto: the per-role/slot search (about 40 evaluations) compares candidates by KL on the first this
    # many tuning examples (null = all); the budget is always checked on the whole tuning split.
    search_examples: int | None = field(default=None, metadata=_range(16))
    # Return the most sensitive fusion groups to float until the budget is met (false = calibrator choice only).
    fallback: bool = True
    # How the search steps through the ranked groups: single = one group per trial; doubling = a block of the next
    # ranked groups per trial, doubled after each rejected trial (1, 2, 4, ...): on a base-size model one group's
    # effect on the tuning KL is under its noise (all-mpnet-base-v2: 28 of 30 single-group trials rejected).
    fallback_steps: Literal["single", "doubling"] = "single"
    # Once the budget is met, try re-quantizing each group returned to float (fewer float groups = faster).
    refine: bool = True
    # Full evaluations of the tuning split the fallback search may spend, and its wall-clock limit.
    max_trials: int = field(default=30, metadata=_range(0))
    timeout_s: float = field(default=1800.0, metadata=_range(1.0))
    # Sensitivity proxy: KL(FP32 || quantized) on this many hardest tuning examples per group.
    proxy_examples: int = field(default=128, metadata=_range(1))
    # After each accepted step: re-export, rebuild the run's engine, time INT8 vs baseline interleaved
    # at the benchmark's headline shape.
    latency: bool = True
    latency_warmup: int = field(default=2, metadata=_range(0))
    latency_iters: int = field(default=10, metadata=_range(1))
    # Plans meeting the budget whose re-timed latency is within this fraction of the fastest are timing ties:
    # the one with the fewest float groups is kept. The same two plans re-timed in two runs differed by ~1 %
    # (all-mpnet-base-v2 embeddings: 7 vs 8 float groups, each run calling the other faster).
    latency_tolerance: float = field(default=0.02, metadata=_range(0.0, 1.0))
    # tune=auto: once the budget is met in fake quant, check it on the run's engine built from that state (the
    # tuning split through it); an evident miss there resumes the fallback once. false = fake quant decides.
    engine_check: bool = True
    # A tuned_quant.yaml from an earlier run: apply its calibrator and float groups, no search.
    plan: str | None = None

    @property
    def enabled(self) -> bool:
        return self.method != "none" or self.plan is not None


@dataclass
class RunConfig:
    model: ModelConfig
    data: DataConfig
    finetune: TrainConfig
    calibration: CalibrationConfig
    quant: QuantConfig
    qat: TrainConfig
    export: ExportConfig
    # One schema per engine / task, chosen by its `name` (a discriminated union): ENGINE_CONFIGS, TASK_CONFIGS.
    engine: EngineConfig = field(metadata={"kinds": ENGINE_CONFIGS})
    benchmark: BenchmarkConfig
    evaluate: EvaluateConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    run_name: str = "run"
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = field(default=0, metadata=_range(0))
    resume: str | None = None
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    task: TaskConfig = field(default_factory=SequenceClassificationConfig, metadata={"kinds": TASK_CONFIGS})
    smoothing: SmoothingConfig = field(default_factory=SmoothingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    # Triton model repository (stage deploy; pipeline/deploy/): deploy=triton (default) | none.
    deploy: DeployConfig = field(default_factory=lambda: DeployConfig())


@dataclass
class DynamicBatchingConfig:
    """Triton's dynamic batcher for the served model: requests wait up to this long to form a batch."""

    max_queue_delay_microseconds: int = field(default=2000, metadata=_range(0))
    preferred_batch_size: list[int] = field(default_factory=lambda: [8, 16, 32])


@dataclass
class InstanceGroupConfig:
    """Copies of the served model Triton runs at once. `kind` applies to the model of the NVIDIA variant
    (triton/nvidia); the bundled-server variant (triton/cpu) and the tokenizer / postprocess run on CPU."""

    count: int = field(default=1, metadata=_range(1))
    kind: Literal["KIND_GPU", "KIND_CPU", "KIND_AUTO"] = "KIND_GPU"


@dataclass
class DeployConfig:
    """Stage deploy (config group `deploy`): the Triton model repository written into the run folder."""

    name: Literal["triton", "none"] = "triton"
    max_batch_size: int = field(default=32, metadata=_range(1))
    dynamic_batching: DynamicBatchingConfig = field(default_factory=DynamicBatchingConfig)
    instance_group: InstanceGroupConfig = field(default_factory=InstanceGroupConfig)

    @property
    def enabled(self) -> bool:
        return self.name != "none"


# ---------------------------------------------------------------------------------------------
# Validation


def symmetric_only(c: RunConfig) -> str | None:
    """Why this run's Linear inputs must be symmetric (zero point 0), or None where asymmetric uint8 can run:
    quant.activations=auto resolves to symmetric exactly when this says why."""
    if c.quant.format != "int8":
        return f"quant.format={c.quant.format}: E4M3 has no zero point"
    if c.engine.name == "tensorrt" or (c.engine.name == "onnxruntime" and c.engine.providers[0] == "TensorrtExecutionProvider"):
        return "TensorRT quantizes symmetrically: signed INT8 Q/DQ with zero point 0 only"
    if c.qat.enabled and c.qat.learn_amax:
        return "qat.learn_amax: learnable amax is symmetric"
    return None


def validate(cfg: DictConfig, cross_checks: tuple[Callable[[RunConfig], list[str]], ...] = ()) -> RunConfig:
    """Check the composed config; return it typed, or raise ConfigError listing every problem.

    `cross_checks` are the rules that live with the layers above (each task's, a tuned plan's): they run
    on the typed config when its fields are valid. pipeline.validation.validate passes all of them;
    call that one."""
    errors: list[str] = []
    try:
        # hydra.* is Hydra's own (and holds job-time interpolations that cannot resolve before the job).
        data = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in cfg if k != "hydra"}
    except Exception as exc:  # an interpolation that cannot resolve (e.g. a missing embedded package)
        raise ConfigError([f"cannot resolve config: {exc}"]) from exc
    typed = _build(RunConfig, data, "", errors)
    if not errors:
        _check_combinations(typed, errors)
        for check in cross_checks:
            errors += check(typed)
    if errors:
        raise ConfigError(errors)
    return typed


def _build(cls: type, data: Any, prefix: str, errors: list[str]) -> Any:
    if not isinstance(data, dict):
        errors.append(f"{prefix.rstrip('.') or '<root>'}: expected a mapping, got {data!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if prefix + key in REPLACED:
            errors.append(f"{prefix}{key}: {REPLACED[prefix + key]}")
        elif key not in fields:
            errors.append(f"{prefix}{key}: unknown key; valid keys: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                errors.append(f"{key}: missing (required)")
            continue
        value = data[name]
        if value == "???":
            errors.append(f"{key}: missing (required; set it on the command line, e.g. {key}=...)")
            continue
        if "kinds" in f.metadata:
            kwargs[name] = _build_kind(f.metadata["kinds"], value, key, errors)
            continue
        kwargs[name] = _check(hints[name], value, key, errors)
        bounds = f.metadata
        if bounds and isinstance(kwargs[name], (int, float)) and not isinstance(kwargs[name], bool):
            lo, hi = bounds.get("min"), bounds.get("max")
            if (lo is not None and kwargs[name] < lo) or (hi is not None and kwargs[name] > hi):
                rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
                errors.append(f"{key}: {kwargs[name]!r} out of range; must be {rng}")
    try:
        return cls(**kwargs)
    except TypeError:
        return None  # a required field was missing: already reported


def _build_kind(kinds: dict[str, type], data: Any, key: str, errors: list[str]) -> Any:
    """A discriminated union (engine, task): the mapping's `name` picks the schema; a key that only other kinds
    read is refused with the kinds that read it."""
    if not isinstance(data, dict):
        errors.append(f"{key}: expected a mapping, got {data!r}")
        return None
    kind = data.get("name")
    if kind not in kinds:
        errors.append(f"{key}.name: {kind!r} is not valid; valid values: {', '.join(kinds)}")
        return None
    keys = {n: {f.name for f in dataclasses.fields(c)} for n, c in kinds.items()}
    foreign = {k: [n for n in kinds if k in keys[n]] for k in data if k not in keys[kind]}
    for k, readers in foreign.items():
        if readers:
            errors.append(
                f"{key}.{k}: not a key of {key}={kind} (read by {key}={', '.join(readers)}); "
                f"{key}={kind} keys: {', '.join(sorted(keys[kind]))}"
            )
    return _build(kinds[kind], {k: v for k, v in data.items() if not foreign.get(k)}, key + ".", errors)


def _check(tp: Any, value: Any, key: str, errors: list[str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", errors)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check(inner[0], value, key, errors)
    if origin is Literal:
        if value not in args:
            errors.append(f"{key}: {value!r} is not valid; valid values: {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{key}: expected a list, got {value!r} ({type(value).__name__})")
            return value
        return [_check(args[0], v, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping, got {value!r}")
            return value
        if args and dataclasses.is_dataclass(args[1]):
            return {k: _check(args[1], v, f"{key}.{k}", errors) for k, v in value.items()}
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        errors.append(f"{key}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _check_combinations(c: RunConfig, errors: list[str]) -> None:
    """Rules that involve more than one key."""
    for label, r in c.quant.rules.items():
        if r.enable is None and r.method is None and r.percentile is None:
            errors.append(
                f"quant.rules.{label}: sets nothing; give enable (true/false), method (max, percentile, entropy, mse) or percentile"
            )
        if (r.method is not None or r.percentile is not None) and r.roles == ["linear_weight"]:
            errors.append(
                f"quant.rules.{label}: method/percentile apply to activations; weights are always per-channel max (roles: any but linear_weight)"
            )
    if c.data.source == "csv":
        for k in ("train_path", "eval_path"):
            if not getattr(c.data, k):
                errors.append(f"data.{k}: required when data.source=csv")
    if c.data.source == "hub" and not c.data.hub_id:
        errors.append("data.hub_id: required when data.source=hub")
    quantized = c.calibration.method != "none"
    if c.qat.enabled and not quantized:
        errors.append(
            "qat: QAT needs calibrated quantizers; calibration=none cannot be combined with qat enabled (choose qat=none or a calibration method)"
        )
    if c.engine.name != "none" and not c.export.enabled:
        errors.append(f"engine={c.engine.name} needs the ONNX files: export=none cannot be combined with an engine (choose engine=none)")
    if c.benchmark.enabled and c.engine.name == "none":
        errors.append("benchmark: needs an engine; engine=none cannot be combined with benchmark enabled (choose benchmark=none)")
    if c.benchmark.enabled:
        for s in c.benchmark.seq_lens:
            if s > c.model.max_length:
                errors.append(f"benchmark.seq_lens: {s} exceeds model.max_length={c.model.max_length}")
        if c.benchmark.headline_batch not in c.benchmark.batch_sizes or c.benchmark.headline_seq not in c.benchmark.seq_lens:
            errors.append(
                f"benchmark.headline_batch/headline_seq: ({c.benchmark.headline_batch}, {c.benchmark.headline_seq}) must be in the grid "
                f"batch_sizes={c.benchmark.batch_sizes} x seq_lens={c.benchmark.seq_lens}"
            )
    if c.objective.metric == "latency" and not c.benchmark.enabled:
        errors.append(
            "objective.metric=latency: needs the benchmark; benchmark=none cannot be combined with it (choose objective.metric=accuracy)"
        )
    if c.resume is not None and not (Path(c.resume).expanduser() / "manifest.json").exists():
        errors.append(f"resume: {c.resume} is not a run folder (no manifest.json)")
    if c.engine.name == "tensorrt":
        e = c.engine
        if not (e.min_batch <= e.opt_batch <= e.max_batch) or not (e.min_seq <= e.opt_seq <= e.max_seq):
            errors.append(
                f"engine: profile must satisfy min <= opt <= max (batch {e.min_batch}/{e.opt_batch}/{e.max_batch}, seq {e.min_seq}/{e.opt_seq}/{e.max_seq})"
            )
        shapes = [
            ("evaluate.batch_size", c.evaluate.batch_size, e.max_batch, "engine.max_batch"),
            ("model.max_length", c.model.max_length, e.max_seq, "engine.max_seq"),
        ]
        if c.benchmark.enabled:
            shapes += [
                ("benchmark.batch_sizes", max(c.benchmark.batch_sizes), e.max_batch, "engine.max_batch"),
                ("benchmark.seq_lens", max(c.benchmark.seq_lens), e.max_seq, "engine.max_seq"),
            ]
            if min(c.benchmark.batch_sizes) < e.min_batch or min(c.benchmark.seq_lens) < e.min_seq:
                errors.append(
                    f"benchmark: shapes below the TensorRT profile minimum (engine.min_batch={e.min_batch}, engine.min_seq={e.min_seq})"
                )
        for key, value, limit, limit_key in shapes:
            if value > limit:
                errors.append(f"{key}: {value} is outside the TensorRT optimization profile ({limit_key}={limit})")
    blocker = symmetric_only(c)
    if c.quant.activations == "asymmetric" and blocker:
        errors.append(f"quant.activations: asymmetric is not possible here ({blocker}); valid values: auto, symmetric")
    if c.quant.format == "fp8" and c.qat.enabled and c.qat.learn_amax:
        errors.append("qat.learn_amax: learnable amax is implemented for int8 only; quant.format=fp8 needs qat.learn_amax=false")
    if c.qat.distill and not c.qat.enabled:
        errors.append("qat.distill: needs qat enabled")
    if c.finetune.kd_hidden > 0 or c.finetune.distill:
        errors.append("finetune.distill / finetune.kd_hidden: the FP32 fine-tune has no teacher; distillation is a qat option (qat=kd)")
    if c.finetune.select_by == "kl":
        errors.append("finetune.select_by: 'kl' compares to the FP32 model, which exists only for qat; valid values: accuracy")
    if c.smoothing.enabled and not quantized:
        errors.append("smoothing: needs calibrated quantizers; calibration=none cannot be combined with it (choose smoothing=none)")
    if c.smoothing.enabled and not c.smoothing.modules:
        errors.append("smoothing.modules: empty; list the Linear module globs to smooth (e.g. ['*.layer.*.output.dense'])")
    for stage in ("finetune", "qat"):
        t = getattr(c, stage)
        if t.enabled and t.patience is not None and not t.keep_best:
            errors.append(f"{stage}.patience: stops when no better state is found, which needs {stage}.keep_best=true")
        if t.enabled and t.keep_best and c.data.num_tune == 0:
            errors.append(
                f"{stage}.keep_best: selects the best state on the tuning split; data.num_tune=0 cannot be combined with it "
                f"(set data.num_tune > 0 or {stage}.keep_best=false)"
            )
    _check_tune(c, errors)


def _check_tune(c: RunConfig, errors: list[str]) -> None:
    t = c.tune
    if not t.enabled:
        return
    which = f"tune={t.method}" if t.plan is None else "tune.plan"
    if t.method == "auto" and c.calibration.method in ("none", "max"):
        # The adaptive default adapts: nothing to tune without quantizers (the stage is off), and with
        # calibration=max (no histograms) its calibrator step has the one candidate.
        if c.calibration.method == "none":
            return
    elif c.calibration.method == "none":
        errors.append(
            f"{which}: needs calibrated quantizers; calibration=none cannot be combined with it (choose tune=none or a calibration method)"
        )
        return
    num_tune = getattr(c.data, "num_tune", None)
    if num_tune is not None and num_tune == 0:
        errors.append(
            f"{which}: decides on the tuning split; data.num_tune=0 cannot be combined with it (set data.num_tune >= 1, or tune=none)"
        )
    histogram = [m for m in t.calibrators if m != "max"]
    if c.calibration.method == "max" and t.method == "accuracy" and histogram:
        errors.append(
            f"tune.calibrators: {histogram} need activation histograms; calibration=max collects none "
            "(valid with calibration=max: [max]; or choose calibration=percentile|entropy|mse)"
        )
    if t.method != "none" and t.calibrator_per != "none" and len(t.calibrators) < 2:
        errors.append(
            f"tune.calibrator_per={t.calibrator_per}: chooses among tune.calibrators per {t.calibrator_per}; give at least two "
            "(e.g. tune.calibrators=[percentile_99_99,mse]) or tune.calibrator_per=none"
        )
    if t.method != "none" and not t.calibrators and not t.fallback:
        errors.append("tune: nothing to tune: tune.calibrators is [] and tune.fallback=false (choose tune=none, or give either)")
