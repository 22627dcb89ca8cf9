"""build_engine: one engine per precision from the graphs the engine asks for (engines.graphs_for);
records which kernels run in INT8. Beside a CPU engine it builds the peers (benchmark.peers) and opens
TensorRT's graphs (when exported) on ONNX Runtime's CPU provider, so that evaluate can measure, on any
machine, the numerics of exactly what TensorRT would build."""

from __future__ import annotations

import logging

import numpy as np
import onnx

from pipeline.context import RunContext
from pipeline.data import batches
from pipeline.engines import ENGINES, TRT_GRAPHS, graphs_for
from pipeline.engines.peers import PEERS, Peer, PeerInputs, build_peers
from pipeline.schema import RunConfig, engine_config

log = logging.getLogger(__name__)
# Engines that run on this machine's CPU: peers and TensorRT's graph checks run beside them.
CPU_ENGINES = ("onnxruntime", "openvino")


def run(cfg: RunConfig, ctx: RunContext) -> None:
    kind = ENGINES[cfg.engine.name]()
    labels = list(graphs_for(cfg.engine, cfg.quant.format).items())
    ctx.metrics.engine_precisions = {"baseline": labels[0][0], "quantized": labels[1][0] if ctx.quantized else None}
    for precision, name in labels:
        onnx_path = ctx.artifacts.onnx.get(name)
        if onnx_path is None:
            continue
        engine = kind.build(onnx_path, precision, cfg.engine, ctx.run_dir)
        ctx.engines[precision] = engine
        ctx.artifacts.engine_files.update({f"{precision}_{k}": v for k, v in engine.files.items()})
        qm = ctx.metrics.quantization
        qm.engine_kernels = {**(qm.engine_kernels or {}), precision: engine.kernels}
        if getattr(engine, "inference_precision", None):  # OpenVINO: what its float layers compute in
            qm.engine_inference_precision = {**(qm.engine_inference_precision or {}), precision: engine.inference_precision}
            if precision == labels[-1][0]:  # the quantized engine's float layers: engine.inference_precision's rule
                qm.engine_inference_precision_why = engine.precision_rule[1]
        log.info("build_engine: %s %s kernels %s", cfg.engine.name, precision, engine.kernels)
    if cfg.engine.name not in CPU_ENGINES:
        if cfg.benchmark.enabled and cfg.benchmark.peers:
            log.info("build_engine: benchmark.peers run on this CPU; not compared against engine=%s", cfg.engine.name)
        return
    on_cpu = cfg.engine.name != "onnxruntime" or cfg.engine.providers[0] == "CPUExecutionProvider"
    if on_cpu and cfg.benchmark.enabled and cfg.benchmark.peers and "model_fp32.onnx" in ctx.artifacts.onnx:
        _build_peers(cfg, ctx)
    # TensorRT's graphs through ONNX Runtime's CPU provider: their numerics, measured on any machine.
    ort = ENGINES["onnxruntime"]()
    ort_cfg = engine_config("onnxruntime", cfg.engine, providers=["CPUExecutionProvider"])
    for label, name in TRT_GRAPHS[cfg.quant.format].items():
        if name in ctx.artifacts.onnx:
            engine = ort.build(ctx.artifacts.onnx[name], label, ort_cfg, ctx.run_dir)
            ctx.check_engines[label] = engine
            fallback = getattr(engine, "fp32_fallback", None)
            ctx.metrics.tensorrt_graphs[label] = {"file": name, "ort_cpu_fp32_fallback_ops": fallback}
            log.info("build_engine: %s through ONNX Runtime; ops ORT CPU runs in FP32 for lack of FP16 kernels: %s", name, fallback)


def _build_peers(cfg: RunConfig, ctx: RunContext) -> None:
    """Other quantizers and float engines on the run's model_fp32.onnx (benchmark.peers), into peers/."""
    fp32 = ctx.artifacts.onnx["model_fp32.onnx"]
    names = [i.name for i in onnx.load(str(fp32), load_external_data=False).graph.input]
    config = ctx.model.config

    def calibration():  # the run's own calibration examples, as the calibrate stage batches them
        for b in batches(ctx.tokenizer, ctx.encoded["calib"], cfg.calibration.batch_size, limit=cfg.calibration.num_batches):
            yield {k: b.inputs[k].numpy().astype(np.int64) for k in names}

    out = ctx.path("peers").resolve()  # absolute: peers are built from a scratch working folder
    inputs = PeerInputs(
        fp32_onnx=fp32,
        out_dir=out,
        num_heads=getattr(config, "num_attention_heads", 0) or 0,
        hidden_size=getattr(config, "hidden_size", 0) or 0,
        # The tools' guidance for x86 without VNNI (7-bit weights) = our quant.weight_range decision.
        reduce_range=(ctx.metrics.quantization.weight_range or {}).get("resolved") == "reduced",
        calibration=calibration,
        int8_onnx=ctx.artifacts.onnx.get("model_int8.onnx"),
    )

    def build(peer: Peer, path):
        # Peers run as their tools wrote them, on their own engine: none of this project's engine rewrites.
        own = {"providers": ["CPUExecutionProvider"], "transformer_fusions": False} if peer.engine == "onnxruntime" else {}
        engine_cfg = engine_config(peer.engine, cfg.engine, **own | dict(peer.settings))
        return ENGINES[peer.engine]().build(path, peer.precision, engine_cfg, out)

    # A peer that is the run's own row under another name (our graph on the run's engine, its FP32 baseline) is not
    # built twice: the report's own rows are it.
    peer_names = [n for n in cfg.benchmark.peers if not PEERS[n].is_the_runs_own(cfg.engine.name)]
    ctx.peers, ctx.metrics.peers = build_peers(peer_names, inputs, build)
    for row in ctx.metrics.peers:
        log.info("build_engine: peer %s %s", row["name"], row["error"] or row.get("kernels"))
