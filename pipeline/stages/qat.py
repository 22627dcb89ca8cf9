"""qat: fine-tune with quantizers active (straight-through estimator), optionally distilling from the
frozen FP32 model. Starts from the calibrate stage's amax, so any calibration method combines with it.
Cached by everything upstream + the qat config. Under tune=auto (the default) QAT is the tune stage's
second step, taken only when the budget needs it: the stage loop (run.py) then records `skipped` and
metrics.json tune.steps says whether QAT ran."""

from __future__ import annotations

from pipeline.context import RunContext
from pipeline.schema import RunConfig
from pipeline.stages import _common


def run(cfg: RunConfig, ctx: RunContext) -> str | None:
    return "cached" if _common.run_qat(cfg, ctx) else None
