"""The quantizers' state as files and counts: quantizers.safetensors (amax of every quantizer),
quant_map.json (the human-readable map) and the enabled counts metrics.json records. Shared by every
stage that changes amax or switches quantizers (calibrate, tune, qat) and by tools that reload a run."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.outputs import atomic_write, write_json
from pipeline.quantization.tensor_quantizer import TensorQuantizer


def amax_state(quantizers: dict[str, TensorQuantizer]) -> dict[str, torch.Tensor]:
    """amax of every calibrated quantizer, and the signed range of the asymmetric ones."""
    state = {f"{n}.amax": q.amax.detach().cpu().contiguous() for n, q in quantizers.items() if q.amax is not None}
    state.update({f"{n}.signed_range": q.signed_range.cpu().contiguous() for n, q in quantizers.items() if q.signed_range is not None})
    return state


def enabled_counts(quantizers: dict[str, TensorQuantizer]) -> dict[str, dict[str, int]]:
    """Enabled quantizers by role and the GEMMs with both inputs quantized, by kind (modules; a shared ALBERT
    layer counts once): metrics.json quantization.enabled_by_role / quantized_gemms, recounted by every stage
    that switches quantizers on or off (calibrate, tune)."""
    roles: dict[str, int] = {}
    for q in quantizers.values():
        roles[q.role] = roles.get(q.role, 0) + int(q.enabled)
    gemms = {
        "linear": roles.get("linear_weight", 0),
        "attention_qk": roles.get("attn_q", 0),
        "attention_pv": roles.get("attn_probs", 0),
        "attention_rel": roles.get("attn_rel", 0) // 2,
    }
    return {"enabled_by_role": roles, "quantized_gemms": gemms}


def save_quantizer_state(quantizers: dict[str, TensorQuantizer], run_dir: Path) -> Path:
    """quantizers.safetensors and quant_map.json into run_dir; returns the safetensors path."""
    state = amax_state(quantizers)
    path = atomic_write(Path(run_dir) / "quantizers.safetensors", lambda p: save_file(state, str(p)))
    write_json(Path(run_dir) / "quant_map.json", quant_map(quantizers))
    return path


def quant_map(quantizers: dict[str, TensorQuantizer]) -> list[dict]:
    rows = []
    for name, q in quantizers.items():
        amax: float | dict | None = None
        if q.amax is not None:
            a = q.amax.detach().float()
            amax = (
                float(a) if a.dim() == 0 else {"min": float(a.min()), "max": float(a.max()), "mean": float(a.mean()), "channels": a.numel()}
            )
        row = {
            "name": name,
            "role": q.role,
            "axis": q.axis,
            "unsigned": q.unsigned,
            "num_bits": q.num_bits,
            "amax": amax,
            "enabled": q.enabled and q.amax is not None,
        }
        if q.asymmetric and q.amax is not None:
            scale, zero_point = q.asymmetric_qparams()
            row.update(asymmetric=True, scale=scale, zero_point=zero_point)
        rows.append(row)
    return rows


@torch.no_grad()
def load_quantizer_state(quantizers: dict[str, TensorQuantizer], state: dict[str, torch.Tensor]) -> None:
    """Set every quantizer's amax from a saved state; quantizers without one (never reached during
    calibration) are disabled, as calibrate() leaves them."""
    for name, q in quantizers.items():
        if f"{name}.signed_range" in state:
            q.signed_range = state[f"{name}.signed_range"].float().clone()
        if f"{name}.amax" in state:
            q.load_amax(state[f"{name}.amax"])
        elif q.role != "linear_weight":
            q.enabled = False
