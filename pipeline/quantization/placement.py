"""Where quantizers go: placement rules for BERT-family encoders (config group `quant`).

- Linear layers -> QuantLinear (per-tensor input, per-channel weight on the output-feature axis).
- Attention -> `AttentionQuantizers` on every module that calls transformers' attention interface
  (found by one discovery forward through the registered "qdq" function).
- Residual (optional) -> a quantizer on the input of every LayerNorm outside the embeddings.
Which quantizers are on: quant.rules (pipeline/quantization/rules.py); a module none of whose quantizers
the rules leave on keeps its float module (e.g. the task heads). Returns every quantizer by name.

Shared modules (ALBERT reuses one layer's modules at every depth) get one set of quantizers, used at
every application and calibrated on all of them: a single engine weight/scale per shared GEMM.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.quantization import attention, matmul_mode
from pipeline.quantization import rules as qrules
from pipeline.quantization.calibrate import needs_histogram
from pipeline.quantization.modules import AttentionQuantizers, QuantLinear, ResidualQuantizer
from pipeline.quantization.tensor_quantizer import TensorQuantizer
from pipeline.schema import CalibrationConfig, QuantConfig

_NORMS = (nn.LayerNorm,)


def quantizer_factory(calib: CalibrationConfig, qcfg: QuantConfig) -> Callable[..., TensorQuantizer]:
    """Activations get the calibration method's calibrator; weights are always per-channel max."""
    histogram = needs_histogram(calib, qrules.as_rules(qcfg.rules))

    def make(role: str, *, unsigned: bool = False, axis: int | None = None) -> TensorQuantizer:
        weight = role == "linear_weight"
        q = TensorQuantizer(
            role,  # type: ignore[arg-type]
            num_bits=7 if weight and qcfg.weight_range == "reduced" and qcfg.format == "int8" else 8,
            axis=0 if weight else axis,
            unsigned=unsigned,
            calibrator="histogram" if histogram and not weight else "max",
            num_bins=calib.num_bins,
            skip_zeros=calib.skip_zeros,
            format=qcfg.format,
            # Linear inputs only: the attention GEMMs run in OpenVINO's fused int8 subgraphs as signed inputs.
            asymmetric=role == "linear_input" and qcfg.activations == "asymmetric",
        )
        return q

    return make


def insert_quantizers(
    model: nn.Module, qcfg: QuantConfig, calib: CalibrationConfig, example: dict[str, torch.Tensor]
) -> dict[str, TensorQuantizer]:
    """Insert quantizers into `model` in place; `example` is one input batch for attention discovery."""
    make = quantizer_factory(calib, qcfg)
    rules = qrules.as_rules(qcfg.rules)

    def kept(name: str, wrapper: nn.Module) -> nn.Module | None:
        return wrapper if qrules.apply_enable(name, wrapper, rules) else None

    if qcfg.linear:
        _swap(
            model,
            lambda name, m: isinstance(m, nn.Linear) and not isinstance(m, QuantLinear),
            lambda name, m: kept(name, QuantLinear.from_linear(m, make("linear_input"), make("linear_weight"))),
        )
    if qcfg.attention:
        _quantize_attention(model, qcfg, example, make, rules)
    if qcfg.residual:
        _swap(
            model,
            lambda name, m: isinstance(m, _NORMS) and "embeddings" not in name,
            lambda name, m: kept(name, ResidualQuantizer(m, make("residual"))),
        )
    return collect_quantizers(model)


def _quantize_attention(model: nn.Module, qcfg: QuantConfig, example: dict[str, torch.Tensor], make, rules) -> None:
    """Through the attention interface where the model uses it, else by intercepting its GEMMs."""
    if model.config._attn_implementation != attention.ATTN_IMPLEMENTATION:
        try:
            attention.use_qdq_attention(model)
        except ValueError:
            pass  # models that compute attention themselves refuse dynamic switching (DeBERTa-v2, MPNet)
    found: list[nn.Module] = []
    if model.config._attn_implementation == attention.ATTN_IMPLEMENTATION:
        with attention.discover_attention_modules() as found, torch.no_grad():
            model.eval()
            model(**example)
    names = {id(m): n for n, m in model.named_modules()}
    for mod in found:
        aq = AttentionQuantizers(lambda role, unsigned: make(role, unsigned=unsigned))
        if qrules.apply_enable(f"{names[id(mod)]}.attn_quant", aq, rules):
            mod.attn_quant = aq
    if not found:
        matmul_mode.attach(
            model, qcfg.matmul_attention_classes, example, lambda n, gq: qrules.apply_enable(f"{n}.gemm_quant", gq, rules), make
        )


def collect_quantizers(model: nn.Module) -> dict[str, TensorQuantizer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}


def _swap(model: nn.Module, want: Callable[[str, nn.Module], bool], build: Callable[[str, nn.Module], nn.Module | None]) -> None:
    """Replace matching submodules (build returns None: keep the module); a module reachable under several
    names is replaced once (shared), as its first name decides."""
    replaced: dict[int, nn.Module] = {}
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if id(child) in replaced:
                setattr(parent, child_name, replaced[id(child)])
            elif want(full, child):
                replaced[id(child)] = build(full, child) or child
                setattr(parent, child_name, replaced[id(child)])
