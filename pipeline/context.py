"""RunContext: the typed state that flows from stage to stage."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from pipeline.cache import StageCache, cached, link_or_copy, stage_key

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from pipeline.data import DataSplits
    from pipeline.data.batching import Encoded
    from pipeline.engines import Engine
    from pipeline.models import LoadReport
    from pipeline.quantization.tensor_quantizer import TensorQuantizer
    from pipeline.tasks import Task

StageStatus = Literal["done", "skipped", "cached", "failed"]


@dataclass
class StageRecord:
    status: StageStatus
    seconds: float


@dataclass
class Artifacts:
    """Files a run writes (paths inside the run folder), filled as stages produce them."""

    finetuned: Path | None = None
    quantizers: Path | None = None
    onnx: dict[str, Path] = field(default_factory=dict)  # every exported graph by file name
    engine_files: dict[str, Path] = field(default_factory=dict)
    plots: dict[str, Path] = field(default_factory=dict)


@dataclass
class QuantizationMetrics:
    """metrics.json → quantization: what was quantized, how, and what the engines run. Each field has its
    writer; a field no stage wrote is left out of metrics.json (as_dict)."""

    weight_range: dict[str, str] | None = None  # run: quant.weight_range=auto resolved, {asked, resolved, why}
    activations: dict[str, str] | None = None  # run: quant.activations=auto resolved, {asked, resolved, why}
    method: str | None = None  # calibrate: calibration.method
    quantizers: int | None = None  # calibrate: quantizers inserted
    enabled_by_role: dict[str, int] | None = None  # calibrate, tune: quantizers on, by role
    quantized_gemms: dict[str, int] | None = None  # calibrate, tune: GEMMs with both inputs quantized, by kind
    calibrated: int | None = None  # calibrate: quantizers that got a range
    unreached: int | None = None  # calibrate: activation quantizers no calibration batch reached (left float)
    calibration_by_rule: dict[str, str] | None = None  # calibrate: {quantizer: method} where a quant.rules rule set it
    smoothing: dict[str, Any] | None = None  # calibrate: the smoothing summary (smoothing enabled)
    onnx_int8: dict[str, Any] | None = None  # export: model_int8.onnx node counts and passes
    onnx_tensorrt: dict[str, Any] | None = None  # export: TensorRT's graphs, by file
    engine_kernels: dict[str, dict[str, int]] | None = None  # build_engine: kernels each engine runs, by precision
    engine_inference_precision: dict[str, str] | None = None  # build_engine (OpenVINO): float-layer precision, by engine
    engine_inference_precision_why: str | None = None  # build_engine (OpenVINO): the rule behind the quantized engine's

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def count_enabled(self, quantizers: dict) -> None:
        """enabled_by_role / quantized_gemms, recounted by every stage that switches quantizers on or off."""
        from pipeline.quantization.state import enabled_counts

        counts = enabled_counts(quantizers)
        self.enabled_by_role, self.quantized_gemms = counts["enabled_by_role"], counts["quantized_gemms"]


@dataclass
class Metrics:
    """What metrics.json holds (see design.md "Outputs of a run")."""

    accuracy: dict[str, float | None] = field(default_factory=lambda: {"fp32": None, "fake_quant": None, "engine_fp32": None, "int8": None})
    parity: dict[str, float | None] = field(default_factory=lambda: {"argmax_agreement": None, "cosine": None})
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    speedup: float | None = None
    # engine=auto's resolution: {asked, chosen, why} (run.py _resolve_engine).
    engine_choice: dict[str, str] = field(default_factory=dict)
    # The quantized engine vs the fastest float engine timed on this machine (headline shape):
    # {baseline, p50, ratio, candidates} (stages/benchmark.py best_float).
    speedup_vs_best_float: dict[str, Any] | None = None
    benchmark: dict[str, Any] = field(default_factory=lambda: {"grid": []})
    quantization: QuantizationMetrics = field(default_factory=QuantizationMetrics)
    training: dict[str, Any] = field(default_factory=dict)  # per training stage: steps, loss, seconds
    # Which engine is the baseline (fp32 on ONNX Runtime, fp16 on TensorRT) and which the quantized one.
    engine_precisions: dict[str, str | None] = field(default_factory=lambda: {"baseline": None, "quantized": None})
    # TensorRT's graphs run through ONNX Runtime: parity of the INT8 graph, ops ORT CPU ran in FP32.
    tensorrt_graphs: dict[str, Any] = field(default_factory=dict)
    # ONNX Runtime's own quantizers as comparison rows: {name, description, precision, file, accuracy,
    # error, grid: [{batch, seq, p50}], real_length} (pipeline/engines/peers.py).
    peers: list[dict[str, Any]] = field(default_factory=list)
    # The task's own metrics (metrics.json under the task's name, e.g. "embedding"; the default task: each
    # quantized output's drop vs the baseline engine with its paired 95 % interval).
    task: dict[str, Any] = field(default_factory=dict)
    # Accuracy budget (stage tune): {met, max_drop, calibrator, groups_in_float, evaluations, seconds, ...}.
    tune: dict[str, Any] | None = None


@dataclass(frozen=True)
class Produces:
    """What a cached stage leaves behind: saved into its cache entry after it computes, put back on a hit
    (RunContext.cached). A stage declares this; the save / restore is the same for every stage."""

    files: tuple[str, ...] = ()  # files / folders of the run folder it writes (hard-linked both ways; absent ones skipped)
    metrics: tuple[str, ...] = ()  # the metrics.json sections it fills: a Metrics field, or field.key within one
    model_state: bool = False  # the working model's weights and quantizer ranges (the training stages)


def _section(metrics: Metrics, path: str) -> Any:
    name, _, key = path.partition(".")
    value = getattr(metrics, name)
    return (value.get(key) if isinstance(value, dict) else getattr(value, key)) if key else value


def _set_section(metrics: Metrics, path: str, value: Any) -> None:
    name, _, key = path.partition(".")
    if not key:
        setattr(metrics, name, value)
    elif isinstance(section := getattr(metrics, name), dict):
        section[key] = value
    else:
        setattr(section, key, value)


@dataclass
class RunContext:
    run_dir: Path
    device: torch.device
    seed: int
    config_hash: str
    model: PreTrainedModel | None = None  # the working model: FP32, then quantized in place
    fp32_model: PreTrainedModel | None = None  # frozen FP32 copy kept when quantizing (eval, KD)
    tokenizer: PreTrainedTokenizerBase | None = None
    splits: DataSplits | None = None
    quantizers: dict[str, TensorQuantizer] = field(default_factory=dict)
    engines: dict[str, Engine] = field(default_factory=dict)  # by precision: baseline ("fp32"/"fp16") first, then "int8"/"fp8"
    # ONNX Runtime sessions over TensorRT's graphs ("trt_graph_fp16", "trt_graph_int8"): accuracy only.
    check_engines: dict[str, Engine] = field(default_factory=dict)
    # Peers (benchmark.peers): ONNX Runtime's quantizers on model_fp32.onnx, by peer name.
    peers: dict[str, Engine] = field(default_factory=dict)
    artifacts: Artifacts = field(default_factory=Artifacts)
    metrics: Metrics = field(default_factory=Metrics)
    stages: dict[str, StageRecord] = field(default_factory=dict)
    encoded: dict[str, Encoded] = field(default_factory=dict)  # tokenized splits: train / calib / eval
    head_trained: bool = True  # False: the task head was freshly initialized at load
    model_load: LoadReport | None = None  # what the checkpoint did not provide (manifest.json "model_load")
    resume_from: Path | None = None
    cache: StageCache | None = None
    task: Task | None = None  # what the model is for (pipeline/tasks/): stages ask it, never its name
    # Cache keys: `key` is the running chain (each stage that changes the model extends it).
    key: str = ""
    keys: dict[str, str] = field(default_factory=dict)

    def chain_key(self, stage: str, *parts: Any) -> str:
        """Key of `stage`: its config parts + the key of everything upstream."""
        self.key = stage_key(stage, self.key, *parts)
        self.keys[stage] = self.key
        return self.key

    def cached(
        self,
        stage: str,
        key: str,
        produces: Produces,
        compute: Callable[[], None],
        *,
        save_extra: Callable[[Path], None] | None = None,
        restore_extra: Callable[[Path], None] | None = None,
    ) -> bool:
        """Run `compute` and store what the stage `produces` under `key`, or put it back from the cache.
        The extras save / restore what is not a run file, a metrics section or the model state (calibrate's
        smoothing scales). Returns True on a cache hit."""
        from safetensors.torch import load_file, save_file

        from pipeline.training import state_for_safetensors

        def save(tmp: Path) -> None:
            for f in produces.files:
                if self.path(f).exists():
                    link_or_copy(self.path(f), tmp / f)
            (tmp / "metrics.json").write_text(json.dumps({p: _section(self.metrics, p) for p in produces.metrics}))
            if produces.model_state:
                save_file(state_for_safetensors(self.model), str(tmp / "state.safetensors"))
            if save_extra is not None:
                save_extra(tmp)

        def restore(hit: Path) -> None:
            if produces.model_state:
                self.model.load_state_dict(load_file(str(hit / "state.safetensors")))
                self.model.eval()
            for f in produces.files:
                if (hit / f).exists():
                    link_or_copy(hit / f, self.path(f))
            for p, value in json.loads((hit / "metrics.json").read_text()).items():
                if value is not None:
                    _set_section(self.metrics, p, value)
            if restore_extra is not None:
                restore_extra(hit)

        return cached(self.cache, stage, key, compute=compute, save=save, restore=restore)

    @property
    def quantized(self) -> bool:
        return bool(self.quantizers)

    def path(self, name: str) -> Path:
        return self.run_dir / name
