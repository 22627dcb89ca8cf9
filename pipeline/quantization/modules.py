"""Quantized modules: QuantLinear and the attention quantizers attached to attention modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.quantization.tensor_quantizer import TensorQuantizer


class QuantLinear(nn.Linear):
    """nn.Linear with a per-tensor input quantizer and a per-output-channel weight quantizer.

    `F.linear(Q(x), Q(W))` exports as DQ(x) -> MatMul <- DQ(W): the pattern ONNX Runtime fuses into
    MatMulIntegerToFloat / QLinearMatMul and TensorRT runs as an INT8 GEMM.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, input_quantizer, weight_quantizer):
        super().__init__(in_features, out_features, bias=bias)
        self.input_quantizer: TensorQuantizer = input_quantizer
        self.weight_quantizer: TensorQuantizer = weight_quantizer
        # Per-input-channel multiplier 1/s on the input branch (outlier smoothing, s folded into the
        # weight; pipeline/quantization/smoothing.py). None = no Mul in the graph.
        self.register_buffer("smooth", None)
        # Input channels gathered before it (outlier splitting: channel j repeated, its weight column copied;
        # pipeline/quantization/smoothing.py). None = no Gather in the graph.
        self.register_buffer("split_index", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, input_quantizer, weight_quantizer) -> QuantLinear:
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.in_features, q.out_features = linear.in_features, linear.out_features
        q.weight, q.bias = linear.weight, linear.bias  # share parameters: no copy, optimizer-safe
        q.input_quantizer, q.weight_quantizer = input_quantizer, weight_quantizer
        q.register_buffer("smooth", None)
        q.register_buffer("split_index", None)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split_index is not None:
            x = x.index_select(-1, self.split_index)  # exported Gather -> Mul(1/m) -> Q/DQ -> MatMul
        if self.smooth is not None:
            x = x * self.smooth  # exported Mul(1/s) -> Q/DQ -> MatMul
        x = self.input_quantizer(x)
        if torch.onnx.is_in_onnx_export():
            # Quantize W^T (per channel on axis 1) so the graph is DQ(W^T) -> MatMul with no Transpose
            # between them: the exporter folds the constant transpose, and the DQ feeds the GEMM
            # directly, the pattern ORT and TensorRT fuse. Same numbers as F.linear(x, Q(W)).
            w_t = self.weight_quantizer(self.weight.t(), axis=1)
            # Outside any TorchFunctionMode: the attention GEMM interceptor (matmul_mode) must not
            # mistake this already-quantized Linear GEMM for one of the attention GEMMs.
            with torch._C.DisableTorchFunction():
                out = torch.matmul(x, w_t)
            return out + self.bias if self.bias is not None else out
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)


class AttentionQuantizers(nn.Module):
    """The four GEMM inputs of one attention module: Q and K^T of Q.K^T, P (softmax) and V of P.V.

    Attached as `<attention module>.attn_quant`; the registered attention function reads it.
    P is in [0, 1], so its quantizer is unsigned (uint8) — one more bit of resolution for it.
    """

    def __init__(self, make):
        super().__init__()
        self.q: TensorQuantizer = make("attn_q", unsigned=False)
        self.k: TensorQuantizer = make("attn_k", unsigned=False)
        self.probs: TensorQuantizer = make("attn_probs", unsigned=True)
        self.v: TensorQuantizer = make("attn_v", unsigned=False)


class ResidualQuantizer(nn.Module):
    """Wraps a LayerNorm so both inputs of the residual add feeding it are quantized.

    Transformers computes `LayerNorm(dropout(dense(x)) + input_tensor)` in one line, so the add's two
    operands are not separate module inputs; the quantizer sits on the LayerNorm input (the sum),
    which is the tensor TensorRT needs in INT8 to fuse GEMM -> add -> LayerNorm chains.
    """

    def __init__(self, norm: nn.Module, quantizer: TensorQuantizer):
        super().__init__()
        self.norm = norm
        self.residual_quantizer = quantizer

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.norm(self.residual_quantizer(x), *args, **kwargs)
