"""calibrate (PTQ): keep a frozen FP32 copy, insert quantizers, collect statistics, set amax."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.context import Produces, RunContext
from pipeline.outputs import atomic_write
from pipeline.quantization import calibration_plot, smoothing
from pipeline.quantization import rules as qrules
from pipeline.quantization.calibrate import calibrate
from pipeline.quantization.placement import insert_quantizers
from pipeline.quantization.state import amax_state, load_quantizer_state, save_quantizer_state
from pipeline.schema import RunConfig
from pipeline.stages import _common

log = logging.getLogger(__name__)


def run(cfg: RunConfig, ctx: RunContext) -> str | None:
    c = cfg.calibration
    ctx.fp32_model = copy.deepcopy(ctx.model).eval()  # FP32 reference for evaluation and distillation
    for p in ctx.fp32_model.parameters():
        p.requires_grad_(False)
    rules = qrules.as_rules(cfg.quant.rules)
    calib_batches = _common.calib_batches(cfg, ctx)
    ctx.quantizers = insert_quantizers(ctx.model, cfg.quant, c, calib_batches[0])
    # Smoothing changes weights, so it is part of this stage's key; its scales are cached with the amax.
    key = ctx.chain_key("calibrate", cfg.quant, c, *([cfg.smoothing] if cfg.smoothing.enabled else []))
    scales: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    # The calibration pass's own histograms, kept for calibration.png (run folder and cache entry).
    hists: dict[str, torch.Tensor] = {}
    hist_file = calibration_plot.HISTOGRAMS

    def compute() -> None:
        if cfg.smoothing.enabled:  # before any amax: the quantizers must see x/s and W*s
            scales.update(smoothing.smooth(ctx.model, cfg.smoothing, calib_batches))
        counts.update(
            calibrate(
                ctx.model,
                ctx.quantizers,
                calib_batches,
                c,
                on_collected=lambda qs: hists.update(calibration_plot.histograms(qs)),
                rules=rules,
            )
        )

    def save(tmp: Path) -> None:
        save_file(amax_state(ctx.quantizers), str(tmp / "quantizers.safetensors"))
        (tmp / "counts.json").write_text(json.dumps(counts))
        if hists:
            save_file(hists, str(tmp / hist_file))
        if scales:
            save_file({k: v.contiguous() for k, v in scales.items()}, str(tmp / "smoothing.safetensors"))

    def restore(hit: Path) -> None:
        if (hit / "smoothing.safetensors").exists():
            scales.update(load_file(str(hit / "smoothing.safetensors")))
            smoothing.restore(ctx.model, scales, cfg.smoothing.method)
        load_quantizer_state(ctx.quantizers, load_file(str(hit / "quantizers.safetensors")))
        counts.update(json.loads((hit / "counts.json").read_text()))
        if (hit / hist_file).exists():
            hists.update(load_file(str(hit / hist_file)))

    # The ranges, and the smoothing scales applied to the weights before them: not run files, so saved as extras.
    hit = ctx.cached("calibrate", key, Produces(), compute, save_extra=save, restore_extra=restore)
    if hists:
        atomic_write(ctx.path(hist_file), lambda p: save_file(hists, str(p)))
    ctx.model.to(ctx.device)  # amax tensors are created on the CPU
    qm = ctx.metrics.quantization
    qm.method, qm.quantizers, qm.calibrated, qm.unreached = c.method, len(ctx.quantizers), counts["calibrated"], counts["unreached"]
    qm.count_enabled(ctx.quantizers)
    by_rule = {n: qrules.calibration_for(n, q.role, c, rules) for n, q in ctx.quantizers.items() if q.role != "linear_weight"}
    if any(v is not c for v in by_rule.values()):  # {quantizer: method} where a rule changed it
        qm.calibration_by_rule = {n: v.method for n, v in by_rule.items() if v is not c}
    if cfg.smoothing.enabled:
        qm.smoothing = smoothing.summary(scales, cfg.smoothing)
    ctx.artifacts.quantizers = save_quantizer_state(ctx.quantizers, ctx.run_dir)
    log.info(
        "calibrate: %s on %d batches -> %d quantizers %s",
        c.method,
        len(calib_batches),
        len(ctx.quantizers),
        qm.enabled_by_role,
    )
    return "cached" if hit else None
