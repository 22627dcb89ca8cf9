"""Nine encoder families + the embedded MiniLM, each through the whole pipeline with random tiny
weights (model.random_init=true): attention Q/DQ, export, ORT int8 kernels, parity, padding."""

from __future__ import annotations

import pytest

from pipeline.verify import measure
from tests.conftest import run_tiny

# Quantized GEMMs the ORT int8 graph must run as int8 kernels (2 layers; heads excluded), and the
# GEMMs that stay float with the reason.
EXPECTED = {
    "minilm_l6": (16, 2),  # 12 Linear + 4 attention; float: pooler + classifier (excluded head)
    "bert_base": (16, 2),
    "roberta_base": (16, 2),  # float: classifier.dense + classifier.out_proj
    "albert_base": (17, 2),  # + embedding projection; one shared layer applied twice
    "deberta_v3_base": (20, 6),  # + c2p/p2c GEMMs; float: 4 rel-embedding projections (input-independent) + head
    "electra_base": (17, 2),  # + embeddings_project (embedding size != hidden)
    "distilbert_base": (16, 2),
    "xlm_roberta_base": (16, 2),
    "mpnet_base": (16, 2),
    "modernbert_base": (12, 2),  # fused Wqkv + gated MLP: 4 Linear per layer; float: head.dense + classifier
}


@pytest.mark.parametrize("model", list(EXPECTED))
def test_architecture_end_to_end(tmp_path, model):
    ctx = run_tiny(tmp_path, [f"model={model}", "benchmark=none", "finetune.max_steps=2"])
    m = measure(ctx)
    assert (m["int8_gemms"], m["float_gemms"]) == EXPECTED[model], m
    # Both inputs of Q.K^T and P.V in each of 2 layers (ALBERT: one shared layer -> one set;
    # DeBERTa: + 2 relative-position GEMMs per layer).
    assert m["attention_quantizers"] == {"albert_base": 4, "deberta_v3_base": 16}.get(model, 8), m
    assert m["dynamic_shapes"]
    assert m["pad_fp32_torch"] < 1e-4 and m["pad_fake_quant"] < 1e-4, m
    assert m["pad_int8_engine"] < 1e-4, m
    assert m["fp32_engine_vs_torch"] < 1e-4, m
    assert m["parity_argmax"] >= 0.95 and m["parity_cosine"] > 0.99, m
    # TensorRT's graphs: legal by its rules, and they run (ONNX Runtime CPU) with the same numerics.
    assert m["trt_violations"] == 0, m
    assert m["trt_parity_argmax"] >= 0.95 and m["trt_parity_cosine"] > 0.99, m
