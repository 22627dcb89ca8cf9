"""The latency step of the search: the run's own engine, rebuilt from the model as it is now.

The baseline engine (FP32 on ONNX Runtime, FP16 on TensorRT: engines.GRAPHS) is built once; each
call re-exports the quantized graph with the export stage's functions, builds it with the run's
engine kind (the same build as build_engine), and times both interleaved at the benchmark's headline
shape with the benchmark stage's helpers: a same-run INT8 / baseline p50 ratio per accepted step.
Each step's graph is kept (by the trace step it belongs to) so that `retime` can time the candidate
plans once more *together*, taking turns with each other and the baseline: ratios measured minutes
apart on a shared machine differ by more than the plans do (measured: README "Accuracy budget").
Where the engine cannot be built or timed here (engine=none, TensorRT absent, FP8 emulated on ORT
CPU) the search still runs and the trace says why latency is missing (`note`).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import distributed, graphs
from pipeline.data import batches
from pipeline.data.batching import Encoded
from pipeline.engines import ENGINES, graphs_for
from pipeline.inference import Outputs, engine_logits
from pipeline.schema import RunConfig
from pipeline.tasks import Models
from pipeline.timing import interleaved, synthetic_inputs

log = logging.getLogger(__name__)


class LatencyProbe:
    def __init__(self, cfg: RunConfig, models: Models, tokenizer, tune: Encoded, seed: int, workdir: Path):
        self.cfg, self.models, self.workdir = cfg, models, workdir
        self.note: str | None = None
        self.calls = 0
        self.seconds = 0.0
        self._baseline = None
        self.graphs: dict[int, Path] = {}  # trace step -> its exported quantized graph
        if not cfg.tune.latency:
            self.note = "latency not measured (tune.latency=false)"
            return
        if distributed.is_distributed():
            self.note = "latency not measured under torchrun: every rank must choose the same plan (fewest float groups)"
            return
        if cfg.engine.name == "none":
            self.note = "latency not measured: engine=none"
            return
        if not cfg.export.enabled:
            self.note = "latency not measured: export=none"
            return
        (self.base_label, base_name), (self.quant_label, self.quant_name) = list(graphs_for(cfg.engine, cfg.quant.format).items())
        workdir.mkdir(parents=True, exist_ok=True)
        # Graph example from the tuning split (shapes and a real padding mask; no data decision).
        self.example = next(batches(tokenizer, tune, 2)).inputs
        b = cfg.benchmark
        self.inputs = synthetic_inputs(np.random.default_rng(seed), len(tokenizer), b.headline_batch, b.headline_seq)
        self.shape = f"batch {b.headline_batch} x seq {b.headline_seq}"
        try:
            self.kind = ENGINES[cfg.engine.name]()
            fp32 = models.fp32 if models.fp32 is not None else models.model
            path = graphs.baseline_graph(fp32, self.example, base_name, workdir, cfg.export.opset, models.device)
            self._baseline = self.kind.build(path, self.base_label, cfg.engine, workdir)
        except Exception as exc:  # e.g. TensorRT not installed on this machine
            self.note = f"latency not measured: engine={cfg.engine.name} could not build here ({type(exc).__name__}: {exc})"
            log.warning("tune: %s", self.note)
            return
        if getattr(self._baseline, "emulated", False):
            self.note = f"latency not measured: {cfg.engine.name} emulates {self.base_label} here (no kernels to time)"
            self._baseline = None

    def __call__(self, key: int = 0) -> float | None:
        """quantized p50 / baseline p50 for the model as it is now (None where not measured); `key` (the
        trace step) names the kept graph for `retime`."""
        if self._baseline is None:
            return None
        t0 = time.perf_counter()
        step = self.workdir / f"step{self.calls}"
        step.mkdir()
        self.calls += 1
        try:
            dest, engine = build_quantized(self.cfg, self.kind, self.models, self.example, step)
            if getattr(engine, "emulated", False):
                self.note = f"latency not measured: {self.cfg.engine.name} emulates {self.quant_label} here (no kernels to time)"
                self._baseline = None
                return None
            self.graphs[key] = dest
            times = self._time({"quant": engine}, self.cfg.tune.latency_iters)
            del engine
            return times["quant"]
        finally:
            self.seconds += time.perf_counter() - t0

    def retime(self, keys: list[int]) -> dict[int, float]:
        """The kept graphs of these trace steps (the start and the candidate plans) rebuilt and timed
        together against the baseline, in turns, with twice tune.latency_iters: {step: quantized /
        baseline p50}."""
        keys = [k for k in keys if k in self.graphs]
        if self._baseline is None or len(keys) < 2:
            return {}
        t0 = time.perf_counter()
        try:
            engines = {k: self.kind.build(self.graphs[k], self.quant_label, self.cfg.engine, self.graphs[k].parent) for k in keys}
            return self._time(engines, 2 * self.cfg.tune.latency_iters)
        finally:
            self.seconds += time.perf_counter() - t0

    def _time(self, engines: dict, iters: int) -> dict:
        """{label: its p50 / the baseline's p50}, all taking turns with the baseline."""
        # As in the benchmark stage: torch idle at one thread while the engines' pools are timed.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            calls = {"base": self._baseline.bind(self.inputs), **{k: e.bind(self.inputs) for k, e in engines.items()}}
            times = interleaved(calls, self.cfg.tune.latency_warmup, iters)
        finally:
            torch.set_num_threads(threads)
        base = np.median(times.pop("base"))
        return {k: float(np.median(v) / base) for k, v in times.items()}

    def close(self) -> None:
        self._baseline = None
        shutil.rmtree(self.workdir, ignore_errors=True)


def engine_outputs(
    cfg: RunConfig, models: Models, tokenizer, data: Encoded, workdir: Path, token_level: bool
) -> tuple[Outputs | None, str]:
    """The tuning split through the run's quantized engine built from the model as it is now (the export
    and build of the build_engine stage): tune=auto's last check, since the engine ships, not fake quant
    (all-mpnet-base-v2 embeddings: recall@10 0.9025 in fake quant, 0.8978 on OpenVINO). Returns
    (outputs, what ran) or (None, why not) where the engine cannot run here."""
    if cfg.engine.name == "none" or not cfg.export.enabled:
        return None, f"no engine to check ({'engine=none' if cfg.engine.name == 'none' else 'export=none'})"
    if distributed.is_distributed():
        return None, "not under torchrun (one engine per rank would be built)"
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        _, engine = build_quantized(cfg, ENGINES[cfg.engine.name](), models, next(batches(tokenizer, data, 2)).inputs, workdir)
        out = engine_logits(engine, tokenizer, data, cfg.evaluate.batch_size, token_level=token_level)
        return out, f"{cfg.engine.name} {_quantized(cfg)[0]} engine of this state"
    except Exception as exc:  # e.g. TensorRT not installed on this machine
        return None, f"engine={cfg.engine.name} could not build here ({type(exc).__name__}: {exc})"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _quantized(cfg: RunConfig) -> tuple[str, str]:
    """(label, file name) of the run's quantized graph (engines.GRAPHS: int8 -> model_int8.onnx, ...)."""
    return list(graphs_for(cfg.engine, cfg.quant.format).items())[1]


def build_quantized(cfg: RunConfig, kind, models: Models, example: dict, workdir: Path):
    """The run's quantized graph exported from the model as it is now (the export stage's functions) into
    `workdir` and built with the run's engine kind: (graph path, engine)."""
    label, name = _quantized(cfg)
    dest, e = workdir / name, cfg.export
    graphs.quantized_graph(models.model, example, name, dest, e.opset, e.fold_weights, models.device)
    return dest, kind.build(dest, label, cfg.engine, workdir)
