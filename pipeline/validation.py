"""Whole-config validation before any stage runs: the schema's own checks (types, ranges, allowed
values, cross-group rules on fields) plus the rules that live with the layers above the schema — each
task's rules on the other groups and a tuned plan's consistency — collected into one ConfigError."""

from __future__ import annotations

from omegaconf import DictConfig

from pipeline import schema
from pipeline.schema import RunConfig
from pipeline.tasks import combination_errors
from pipeline.tune.plan import plan_errors


def _plan_errors(c: RunConfig) -> list[str]:
    # (calibration=none already has its own error: a plan needs calibrated quantizers)
    if not c.tune.enabled or c.tune.plan is None or c.calibration.method == "none":
        return []
    return plan_errors(c.tune.plan, c.calibration.method, smoothing=c.smoothing.enabled)


def validate(cfg: DictConfig) -> RunConfig:
    """The composed config typed, or ConfigError naming every problem (key, value, valid values)."""
    return schema.validate(cfg, cross_checks=(combination_errors, _plan_errors))
