"""PTQ: collect statistics on calibration batches, then set every quantizer's amax.

The calibration method is a registry entry (config option `calibration=<method>`), not a string
switch inside the loop: each entry maps a filled calibrator to amax.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from pipeline import distributed
from pipeline.quantization import rules as qrules
from pipeline.quantization.calibrators import HISTOGRAM_METHODS, HistogramCalibrator, MaxCalibrator
from pipeline.quantization.tensor_quantizer import TensorQuantizer
from pipeline.schema import CalibrationConfig, QuantRule


def _max(c, cfg: CalibrationConfig):
    if isinstance(c, HistogramCalibrator):  # a max override on a histogram-calibrated quantizer
        return c.compute_max()
    return c.compute_amax()


def _hist(method: str) -> Callable:
    def compute(c, cfg: CalibrationConfig):
        if isinstance(c, MaxCalibrator):  # per-channel quantizers collect max only
            return c.compute_amax()
        kwargs = {"percentile": cfg.percentile} if method == "percentile" else {"stride": cfg.stride, "start_bin": cfg.start_bin}
        return c.compute_amax(method, **kwargs)

    return compute


# The one registry of calibration methods: name -> amax from a calibrator's statistics. The calibrate stage,
# the tuner, the calibration figure and tuned plans read it; tests check the schema's valid values against it.
METHODS: dict[str, Callable[[MaxCalibrator | HistogramCalibrator, CalibrationConfig], torch.Tensor | None]] = {
    "max": _max,
    "percentile": _hist("percentile"),
    "entropy": _hist("entropy"),
    "mse": _hist("mse"),
}


@torch.no_grad()
def calibrate_weights(quantizers: dict[str, TensorQuantizer], model: torch.nn.Module) -> None:
    """Weights: per-output-channel absolute max, read straight from the parameters."""
    for name, q in quantizers.items():
        if q.role == "linear_weight":
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            q.calibrator.reset()
            q.calibrator.collect(owner.weight)
            q.load_amax(q.calibrator.compute_amax())
            q.calibrator.reset()


@torch.no_grad()
def calibrate(
    model: torch.nn.Module,
    quantizers: dict[str, TensorQuantizer],
    batches: Iterable[dict[str, torch.Tensor]],
    cfg: CalibrationConfig,
    on_collected: Callable[[dict[str, TensorQuantizer]], None] | None = None,
    rules: list[QuantRule] = (),
) -> dict[str, int]:
    """Calibrate weights, then activations on `batches`; returns counts (calibrated / never reached).
    `rules` (quant.rules) give some activations another method / percentile.

    `on_collected(quantizers)` runs after the statistics are collected and before amax is computed
    (which frees them): e.g. to keep the histograms for calibration.png without a second pass.
    """
    calibrate_weights(quantizers, model)
    acts = {n: q for n, q in quantizers.items() if q.role != "linear_weight"}
    model.eval()
    for q in acts.values():
        q.signed_range = None
    if distributed.is_distributed():
        _collect_distributed(model, acts, list(batches))
    else:
        for q in acts.values():
            q.calibrator.reset()
        _forward_all(model, acts, batches)
    if on_collected is not None:
        on_collected(acts)
    unreached = 0
    for name, q in acts.items():
        qcfg = qrules.calibration_for(name, q.role, cfg, rules)
        amax = METHODS[qcfg.method](q.calibrator, qcfg)
        q.calibrator.reset()  # free the histograms
        if amax is None:
            unreached += 1
            q.enabled = False  # never saw data (e.g. an unused branch): leave it in float
            continue
        q.load_amax(amax)
    return {"calibrated": len(quantizers) - unreached, "unreached": unreached}


def needs_histogram(cfg: CalibrationConfig, rules: list[QuantRule] = ()) -> bool:
    """Activation quantizers collect histograms when the method or any rule's method needs one."""
    return cfg.method in HISTOGRAM_METHODS or bool(qrules.methods(rules) & set(HISTOGRAM_METHODS))


def _forward_all(model: torch.nn.Module, acts: dict[str, TensorQuantizer], batches: Iterable[dict[str, torch.Tensor]]) -> None:
    for q in acts.values():
        q.calibrating = True
    try:
        for inputs in batches:
            model(**inputs)
    finally:
        for q in acts.values():
            q.calibrating = False


def _collect_distributed(model: torch.nn.Module, acts: dict[str, TensorQuantizer], batches: list[dict[str, torch.Tensor]]) -> None:
    """Under torchrun: rank r collects on batches r, r + world, ...; the statistics are then gathered to
    every rank and merged in rank order (same inputs, same arithmetic), so amax is bit-identical on
    every rank. Histograms need a first pass for the common range (see HistogramCalibrator.fix_range).
    Weights are read from the parameters, identical on every rank, and need no reduction.
    """
    mine = batches[distributed.rank() :: distributed.world_size()]
    hist = {n: q for n, q in acts.items() if isinstance(q.calibrator, HistogramCalibrator)}
    for q in acts.values():
        q.calibrator.reset()
    if hist:
        for q in hist.values():
            q.calibrator.begin_range_pass()
        _forward_all(model, hist, mine)
        maxima = distributed.all_gather_object({n: q.calibrator.range_state() for n, q in hist.items()})
        for n, q in hist.items():
            q.calibrator.fix_range([m[n] for m in maxima])
    _forward_all(model, acts, mine)
    states = distributed.all_gather_object({n: (q.calibrator.state(), q.signed_range) for n, q in acts.items()})
    for n, q in acts.items():
        q.calibrator.merge([s[n][0] for s in states])
        for r in (s[n][1] for s in states if s[n][1] is not None):
            q.observe(r)  # a rank's (min, max) widens the range as a batch holding both values would
