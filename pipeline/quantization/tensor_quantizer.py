"""TensorQuantizer: fake quantization with an amax-derived scale (pytorch-quantization's semantics).

Forward is `torch.fake_quantize_per_{tensor,channel}_affine` so that the legacy ONNX exporter emits
QuantizeLinear/DequantizeLinear and torch and ONNX Runtime round identically. The integer range is
the full -128..127 (0..255 unsigned): the exporter refuses narrow -127..127 ranges. scale = amax/127
(amax/255 unsigned), zero point 0. Gradient: straight-through inside [-amax, amax], zero outside
(torch's fake-quant backward), optionally also to amax (learnable amax, see `learn_amax`).

Asymmetric (uint8 with a zero point; CPU engines only, quant.activations): the range is the calibrated
clip [-amax, amax] narrowed to the signed extremes seen in calibration (`signed_range`), so an input that is
never (or barely) negative — the GELU output feeding each FFN's second Linear, min -0.17 — gets all 256
levels on the side it uses instead of 128.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from pipeline.quantization.calibrators import HistogramCalibrator, MaxCalibrator
from pipeline.schema import Role

# Largest finite FP8 E4M3 value: FP8 scale = amax / 448 (TensorRT's and ONNX's E4M3 Q/DQ).
FP8_MAX = 448.0

# Smallest amax kept: a dead channel (all-zero weights) would otherwise give scale 0, which ONNX
# QuantizeLinear forbids. Values below it quantize to 0 anyway.
_MIN_AMAX = 1e-8


class _LearnableAmaxFakeQuant(torch.autograd.Function):
    """Fake quant whose gradient also reaches amax (LSQ-style rule; s = amax / qmax, q the integer):
    inside the range, d/dx = 1 (straight-through) and d/damax = (q - x/s) / qmax, the rounding error;
    outside it (clipped), d/dx = 0 and d/damax = q / qmax = +-1, so clipped values pull amax outward
    and rounding error pulls it either way. Forward is identical to torch's fake quant, so export
    is unchanged.
    """

    @staticmethod
    def forward(ctx, x, amax, qmin: int, qmax: int, axis: int | None):
        scale = (amax / qmax).clamp(min=_MIN_AMAX / qmax)
        shape = [1] * x.dim()
        if axis is not None:
            shape[axis] = -1
        s = scale.reshape(shape) if axis is not None else scale
        q = torch.clamp(torch.round(x / s), qmin, qmax)
        ctx.save_for_backward(x, s, q)
        ctx.qmin, ctx.qmax, ctx.axis = qmin, qmax, axis
        ctx.amax_shape = amax.shape
        return q * s

    @staticmethod
    def backward(ctx, grad):
        x, s, q = ctx.saved_tensors
        inside = (x / s >= ctx.qmin) & (x / s <= ctx.qmax)
        grad_x = grad * inside
        # d(q*s)/d amax: (q - x/s) / qmax inside the range (rounding error), q/qmax (= +-1) when clipped.
        d_amax = torch.where(inside, (q - x / s), q) / ctx.qmax
        g = grad * d_amax
        if ctx.axis is None:
            grad_amax = g.sum().reshape(ctx.amax_shape)
        else:
            dims = [d for d in range(x.dim()) if d != ctx.axis]
            grad_amax = g.sum(dim=dims).reshape(ctx.amax_shape)
        return grad_x, grad_amax, None, None, None


class _FP8FakeQuant(torch.autograd.Function):
    """FP8 E4M3 quantize-dequantize: saturate x/s to +-448, round to the nearest E4M3 value (ties to
    even, torch's cast), multiply back. Straight-through gradient inside the range, zero outside."""

    @staticmethod
    def forward(ctx, x, scale):
        v = x / scale
        inside = v.abs() <= FP8_MAX
        ctx.save_for_backward(inside)
        return v.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None


class TensorQuantizer(nn.Module):
    """Quantize-dequantize one tensor; calibrates its own amax.

    Args:
        role: What the tensor is (linear_input, linear_weight, attn_q, ...): recorded in quant_map.json
            and used by include/exclude rules.
        num_bits: 8, or 7 for reduced-range weights (-64..63, still stored as int8; quant.weight_range).
        axis: None for per-tensor, or the channel axis (0 = output features of a Linear weight).
        unsigned: Range 0..2^bits-1 (softmax outputs); signed is -2^(bits-1)..2^(bits-1)-1.
        calibrator: "max" or "histogram" (percentile / entropy / mse pick amax from the histogram).
        num_bins, skip_zeros: Histogram settings.
        format: "int8" (integer grid, scale amax/127) or "fp8" (E4M3, scale amax/448, always signed).
            An FP8 quantizer exports as an int8 Q/DQ template (scale amax/127) that
            `pipeline.engines.trt_graphs.retype_qdq` turns into FP8 with the same amax.
        asymmetric: uint8 with a zero point over [max(min, -amax), min(max, amax)] (per-tensor int8 only;
            min / max: the signed extremes seen while calibrating, kept in `signed_range`).

    State: `amax` buffer (scalar or per channel) and, asymmetric, `signed_range` (min, max), saved in
    quantizers.safetensors.
    Modes: `calibrating` (collect statistics, pass x through), `enabled` (fake-quantize when amax set).
    """

    def __init__(
        self,
        role: Role,
        num_bits: int = 8,
        axis: int | None = None,
        unsigned: bool = False,
        calibrator: Literal["max", "histogram"] = "max",
        num_bins: int = 2048,
        skip_zeros: bool = False,
        format: Literal["int8", "fp8"] = "int8",
        asymmetric: bool = False,
    ):
        super().__init__()
        self.role = role
        self.format = format
        unsigned = unsigned and format == "int8"  # E4M3 has a sign bit and no unsigned variant
        if asymmetric and (format != "int8" or axis is not None or unsigned):
            raise ValueError("asymmetric quantization is per-tensor, signed-input int8 only")
        self.asymmetric = asymmetric
        self.num_bits = num_bits
        self.axis = axis
        self.unsigned = unsigned
        self.enabled = True
        self.calibrating = False
        self.learn_amax = False
        self.export_constant_scale = False  # set by onnx_export.constant_scales()
        self.register_buffer("amax", None)
        self.register_buffer("signed_range", None)  # asymmetric: (min, max) seen while calibrating
        self.calibrator_kind = calibrator
        if calibrator == "histogram" and axis is None:
            self.calibrator = HistogramCalibrator(num_bits, None, unsigned, num_bins=num_bins, skip_zeros=skip_zeros)
        else:  # per-channel statistics are max-only, as in pytorch-quantization
            self.calibrator = MaxCalibrator(num_bits, axis, unsigned)

    @property
    def qmin(self) -> float:
        if self.format == "fp8":
            return -FP8_MAX
        return 0 if self.unsigned else -(2 ** (self.num_bits - 1))

    @property
    def qmax(self) -> float:
        if self.format == "fp8":
            return FP8_MAX
        return 2**self.num_bits - 1 if self.unsigned else 2 ** (self.num_bits - 1) - 1

    def load_amax(self, amax: torch.Tensor) -> None:
        """Set amax (reduced to shape () per tensor or (C,) per channel)."""
        amax = amax.detach().float().reshape(-1) if self.axis is not None else amax.detach().float().reshape(())
        amax = amax.clamp(min=_MIN_AMAX)
        if self.learn_amax:
            self.amax = nn.Parameter(amax)
        else:
            self.amax = amax

    def set_learnable(self, learn: bool) -> None:
        """Make amax a trainable parameter (learnable-amax QAT) or a fixed buffer."""
        if learn and self.asymmetric:
            raise ValueError("learnable amax is symmetric only (quant.activations=symmetric)")
        self.learn_amax = learn
        if self.amax is not None:
            amax = self.amax.detach().clone()
            del self.amax
            if learn:
                self.amax = nn.Parameter(amax)
            else:
                self.register_buffer("amax", amax)

    def scale(self) -> torch.Tensor:
        return self.amax.clamp(min=_MIN_AMAX) / self.qmax

    def asymmetric_qparams(self) -> tuple[float, int]:
        """(scale, zero point) of the uint8 grid over [max(min, -amax), min(max, amax)], widened to hold 0
        (padding and ReLU zeros stay exact). Without a signed range (calibrated before it existed, or never
        reached) the range is the symmetric [-amax, amax]."""
        scale, zero_point = self.asymmetric_qparams_tensors()
        # Read through numpy: constants by design, so the exporter's tracer has nothing to warn about.
        return float(scale.cpu().numpy()), int(zero_point.cpu().numpy())

    def asymmetric_qparams_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """asymmetric_qparams as tensors on the quantizer's device (scale float64, zero point int32): the forward
        of training and evaluation reads nothing back to the host (on CUDA a host read is a device sync per
        quantizer per step); export takes the same values as Python constants."""
        a = self.amax.detach().double().reshape(()).clamp(min=_MIN_AMAX)
        if self.signed_range is None:
            lo, hi = -a, a
        else:
            r = self.signed_range.detach().to(a.device, torch.float64)
            lo, hi = torch.maximum(r[0], -a), torch.minimum(r[1], a)
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scale = (hi - lo).clamp(min=_MIN_AMAX) / 255
        zero_point = torch.round(-lo / scale).clamp(0, 255)
        return scale, zero_point.to(torch.int32)

    def observe(self, x: torch.Tensor) -> None:
        """Track the signed extremes (asymmetric quantizers, while calibrating)."""
        seen = torch.stack([x.detach().min(), x.detach().max()]).float().cpu()
        if self.signed_range is None:
            self.signed_range = seen
        else:
            self.signed_range = torch.stack([torch.minimum(self.signed_range[0], seen[0]), torch.maximum(self.signed_range[1], seen[1])])

    def forward(self, x: torch.Tensor, axis: int | None = None) -> torch.Tensor:
        """Fake-quantize x. `axis` overrides the channel axis for a transposed view of the tensor."""
        if self.calibrating:
            self.calibrator.collect(x)
            if self.asymmetric:
                self.observe(x)
            return x
        if not self.enabled or self.amax is None:
            return x
        if self.asymmetric:
            if self.export_constant_scale:
                # Python numbers are constants to the tracer: the exported Q/DQ get literal uint8 parameters.
                scale, zero_point = self.asymmetric_qparams()
                return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)
            scale, zero = self.asymmetric_qparams_tensors()
            return torch.fake_quantize_per_tensor_affine(x, scale.to(x.device, torch.float32), zero.to(x.device), 0, 255)
        if self.learn_amax and self.training:
            return _LearnableAmaxFakeQuant.apply(x, self.amax, self.qmin, self.qmax, self.axis)
        if self.format == "fp8" and not self.export_constant_scale:
            return self._fp8(x, axis)
        scale = self.scale().to(device=x.device, dtype=x.dtype)
        if self.format == "fp8":  # export: an int8 Q/DQ template carrying this amax (see class doc)
            scale = (self.amax.clamp(min=_MIN_AMAX) / 127).to(device=x.device, dtype=x.dtype)
        if self.export_constant_scale:
            # A fresh tensor is a constant to the tracer: the exported Q/DQ get literal scales.
            scale = torch.tensor(scale.detach().cpu().numpy(), dtype=x.dtype)
        lo, hi = (self.qmin, self.qmax) if self.format == "int8" else (-128, 127)
        if self.export_constant_scale and self.format == "int8" and self.num_bits < 8:
            # The legacy exporter writes Q/DQ only for the full 8-bit range. Clamping to this
            # quantizer's narrower range first gives the same values (a 7-bit weight is an int8 in
            # -64..63); on a weight the clamp is constant-folded into the initializer.
            bound = (
                scale.reshape([-1 if d == (self.axis if axis is None else axis) else 1 for d in range(x.dim())])
                if self.axis is not None
                else scale
            )
            x = (
                torch.clamp(x, min=bound * lo, max=bound * hi)
                if self.axis is None
                else torch.maximum(torch.minimum(x, bound * hi), bound * lo)
            )
            lo, hi = -128, 127
        if self.axis is None:
            zero = torch.zeros((), dtype=torch.int32, device=x.device)
            return torch.fake_quantize_per_tensor_affine(x, scale, zero, lo, hi)
        zero = torch.zeros(scale.shape, dtype=torch.int32, device=x.device)
        return torch.fake_quantize_per_channel_affine(x, scale, zero, self.axis if axis is None else axis, lo, hi)

    def _fp8(self, x: torch.Tensor, axis: int | None) -> torch.Tensor:
        scale = self.scale().to(device=x.device, dtype=x.dtype)
        if self.axis is not None:
            shape = [1] * x.dim()
            shape[self.axis if axis is None else axis] = -1
            scale = scale.reshape(shape)
        return _FP8FakeQuant.apply(x, scale)

    def extra_repr(self) -> str:
        amax = "unset" if self.amax is None else (f"{float(self.amax):.4g}" if self.amax.dim() == 0 else f"[{self.amax.numel()}]")
        asym = ", asymmetric" if self.asymmetric else ""
        return f"role={self.role}, format={self.format}, bits={self.num_bits}, axis={self.axis}, unsigned={self.unsigned}{asym}, amax={amax}, enabled={self.enabled}"
