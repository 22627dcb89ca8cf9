"""Architecture checks shared by the test suite and `scripts/architectures_table.py`.

Given a finished run (RunContext with the fake-quant model, FP32 model and both engines), measure:
the INT8 kernels ONNX Runtime runs, dynamic shapes other than the export example, padding
invariance (FP32 torch, fake-quant torch, INT8 engine) and FP32 engine vs torch agreement.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.context import RunContext

INT8_KERNELS = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QGemm")
SENTENCE = "a gripping , beautifully acted film that never loses its nerve"


def _inputs(ctx: RunContext, texts: list[str], pad_to: int | None = None) -> dict[str, torch.Tensor]:
    kw = {"padding": "max_length", "max_length": pad_to} if pad_to else {"padding": True}
    enc = ctx.tokenizer(texts, return_tensors="pt", truncation=True, **kw)
    return {k: v for k, v in enc.items() if k in ctx.engines["int8"].input_names}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@torch.no_grad()
def measure(ctx: RunContext) -> dict:
    """Numbers for one architecture's row of the README table (all measured, none assumed)."""
    fq, fp32 = ctx.model.eval(), ctx.fp32_model.eval()
    int8, e32 = ctx.engines["int8"], ctx.engines["fp32"]
    kernels = int8.kernels
    roles: dict[str, int] = {}
    for q in ctx.quantizers.values():
        if q.enabled and q.role.startswith("attn"):
            roles[q.role] = roles.get(q.role, 0) + 1
    out = {
        "int8_gemms": sum(kernels.get(k, 0) for k in INT8_KERNELS),
        "float_gemms": sum(v for k, v in kernels.items() if k not in INT8_KERNELS),
        "attention_quantizers": sum(roles.values()),
    }
    # Dynamic shapes: batch 3 x seq 37 and 100 (the export example was batch 2, a short sequence).
    rng = np.random.default_rng(0)
    shapes_ok = True
    for seq in (37, 100):
        feed = {
            "input_ids": rng.integers(1000, 20000, (3, seq)),
            "attention_mask": np.ones((3, seq), np.int64),
            "token_type_ids": np.zeros((3, seq), np.int64),
        }
        for eng in (int8, e32):
            shapes_ok &= eng.run(feed).shape[0] == 3
    out["dynamic_shapes"] = bool(shapes_ok)
    # Padding: one sentence alone vs the same sentence padded to 64 tokens.
    alone, padded = _inputs(ctx, [SENTENCE]), _inputs(ctx, [SENTENCE], pad_to=64)
    out["pad_fp32_torch"] = _rel(fp32(**padded).logits.numpy(), fp32(**alone).logits.numpy())
    out["pad_fake_quant"] = _rel(fq(**padded).logits.numpy(), fq(**alone).logits.numpy())
    np_alone = {k: v.numpy() for k, v in alone.items()}
    np_padded = {k: v.numpy() for k, v in padded.items()}
    out["pad_int8_engine"] = _rel(int8.run(np_padded), int8.run(np_alone))
    # FP32 engine vs FP32 torch on a mixed-length batch.
    batch = _inputs(ctx, [SENTENCE, "dull .", "an uneven but often funny comedy about two brothers and a dog"])
    out["fp32_engine_vs_torch"] = _rel(e32.run({k: v.numpy() for k, v in batch.items()}), fp32(**batch).logits.numpy())
    out["parity_argmax"] = ctx.metrics.parity["argmax_agreement"]
    out["parity_cosine"] = ctx.metrics.parity["cosine"]
    # TensorRT's graphs: violations of its Q/DQ rules (0 = legal), ops kept FP32 in the FP16 graph
    # (position region included), and the INT8 graph's parity with fake quant through ONNX Runtime.
    from pipeline.engines.trt_rules import check_tensorrt

    out["trt_violations"] = sum(len(check_tensorrt(ctx.path(f))) for f in ("model_fp16.onnx", "model_int8_trt.onnx"))
    trt = ctx.metrics.tensorrt_graphs["trt_graph_int8"]["parity_vs_fake_quant"]
    out["trt_parity_argmax"], out["trt_parity_cosine"] = trt["argmax_agreement"], trt["cosine"]
    return out
