"""evaluate: the task's score (accuracy.*: accuracy, k-NN accuracy for embeddings, ...; pipeline/tasks/) of FP32 torch, fake-quant torch, the baseline engine (engine_fp32 on ONNX
Runtime, engine_fp16 on TensorRT) and the quantized engine (int8 / fp8) on the eval split, parity of the
quantized engine against fake-quant torch (argmax agreement, mean cosine of logits), and, on ONNX
Runtime, the accuracy of TensorRT's own graphs (accuracy.trt_graph_fp16 / trt_graph_int8) with the
INT8 graph's parity: the numerics TensorRT would receive, measured on any machine.

Parity is not judged at 1e-5: near-tie roundings flip between torch and the engine's int8 kernels and
cascade through layers, so agreement of decisions and the cosine of logit vectors are what matter.
Each task measures parity in its own terms (Task.parity) and adds its own metrics (Task.task_metrics,
metrics.json under the task's name) from the same outputs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.cache import file_digests
from pipeline.context import Produces, RunContext
from pipeline.data.batching import Encoded
from pipeline.inference import engine_logits, torch_logits
from pipeline.schema import RunConfig

log = logging.getLogger(__name__)
BASELINES = ("fp32", "fp16")
PRODUCES = Produces(metrics=("accuracy", "parity", "tensorrt_graphs", "task"))


def run(cfg: RunConfig, ctx: RunContext) -> str | None:
    """Cached by everything upstream + the evaluate and engine configs + the sha256 of the ONNX and engine
    files measured: numbers are reused only for the very bytes they were measured on."""
    # every graph + engine file, the peers' graphs (benchmark.peers) included
    measured = [*sorted(ctx.run_dir.glob("*.onnx*")), *sorted(ctx.run_dir.glob("peers/*.onnx")), *ctx.artifacts.engine_files.values()]
    key = ctx.chain_key("evaluate", cfg.evaluate, cfg.engine, file_digests(measured))

    def save_peers(tmp: Path) -> None:  # each peer row's accuracy / error (rows are built by build_engine)
        (tmp / "peers.json").write_text(json.dumps({r["name"]: [r["accuracy"], r["error"]] for r in ctx.metrics.peers}))

    def restore_peers(hit: Path) -> None:
        scores = json.loads((hit / "peers.json").read_text())
        for row in ctx.metrics.peers:
            row["accuracy"], row["error"] = scores.get(row["name"], [None, row["error"]])
            if row["error"]:
                ctx.peers.pop(row["name"], None)

    hit = ctx.cached("evaluate", key, PRODUCES, lambda: _evaluate(cfg, ctx), save_extra=save_peers, restore_extra=restore_peers)
    return "cached" if hit else None


def _evaluate(cfg: RunConfig, ctx: RunContext) -> None:
    ev = ctx.encoded["eval"]
    if cfg.evaluate.max_examples is not None:
        ev = Encoded(ev.features[: cfg.evaluate.max_examples], ev.labels[: cfg.evaluate.max_examples])
    bs = cfg.evaluate.batch_size
    acc = ctx.metrics.accuracy
    task = ctx.task
    tl = task.token_level
    outputs = {}  # every output by its accuracy label, for the task's own metrics
    fp32_model = ctx.fp32_model if ctx.fp32_model is not None else ctx.model
    outputs["fp32"] = torch_logits(fp32_model, ctx.tokenizer, ev, bs, ctx.device, token_level=tl)
    acc["fp32"] = task.score(outputs["fp32"], ev)
    fq = None
    if ctx.quantized:
        fq = outputs["fake_quant"] = torch_logits(ctx.model, ctx.tokenizer, ev, bs, ctx.device, token_level=tl)
        acc["fake_quant"] = task.score(fq, ev)
    n = min(len(ev), cfg.evaluate.parity_batches * bs)
    # Baselines are reported as engine_<precision> (engine_fp32 on ONNX Runtime, engine_fp16 on
    # TensorRT); quantized engines under their precision (int8 / fp8), with parity against fake quant.
    for precision, engine in ctx.engines.items():
        logits = engine_logits(engine, ctx.tokenizer, ev, bs, token_level=tl)
        label = f"engine_{precision}" if precision in BASELINES else precision
        outputs[label] = logits
        acc[label] = task.score(logits, ev)
        if precision not in BASELINES:
            ctx.metrics.parity = task.parity(logits[:n], fq[:n])
    # TensorRT's own graphs through ONNX Runtime: the numerics TensorRT would receive, measured here.
    for label, engine in ctx.check_engines.items():
        logits = outputs[label] = engine_logits(engine, ctx.tokenizer, ev, bs, token_level=tl)
        acc[label] = task.score(logits, ev)
        if fq is not None and label != "trt_graph_fp16":
            ctx.metrics.tensorrt_graphs.setdefault(label, {})["parity_vs_fake_quant"] = task.parity(logits[:n], fq[:n])
    # Peers (ONNX Runtime's own quantizers): same split, same batches.
    # A peer that fails here (ONNX Runtime's quantizers do not handle every graph) is a row with its
    # error and is not timed; it never stops the run.
    for row in ctx.metrics.peers:
        if row["name"] in ctx.peers:
            try:
                outputs[row["name"]] = engine_logits(ctx.peers[row["name"]], ctx.tokenizer, ev, bs, token_level=tl)
            except Exception as exc:
                row["error"] = f"evaluate: {type(exc).__name__}: {exc}"
                log.warning("evaluate: peer %s failed: %s", row["name"], row["error"])
                del ctx.peers[row["name"]]
                continue
            row["accuracy"] = task.score(outputs[row["name"]], ev)
    ctx.metrics.task = task.task_metrics(outputs, ev)
    log.info("evaluate: peers %s", {r["name"]: r["accuracy"] for r in ctx.metrics.peers})
    log.info("evaluate: accuracy %s parity %s", {k: v if v is None else round(v, 4) for k, v in acc.items()}, ctx.metrics.parity)
