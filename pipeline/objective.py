"""What a run returns to a sweeper (Optuna), and the conditional part of the Optuna search space.

A run's objective (config group key `objective`, schema `ObjectiveConfig`):

- `metric=accuracy`: the quantized (INT8 / FP8) engine's accuracy; the sweep maximizes it.
- `metric=latency`: the quantized engine's p50 latency at the headline shape (ms); the sweep minimizes
  it subject to `quantized accuracy >= min_accuracy`. This is a constraint, not a weighted sum: a run
  under the floor returns `INFEASIBLE + (floor - accuracy)`, larger than any real latency, so every
  feasible run beats every infeasible one whatever their latencies, and among infeasible runs the one
  closer to the floor ranks better (TPE still learns where feasibility lies).

The Hydra Optuna sweeper (1.2/1.3, optuna 2.x) only passes the job's return value to `study.tell`:
its TPE sampler has no constraints hook (Optuna's `constraints_func` for TPE arrived in optuna 3.0,
which the plugin's `optuna<3` pin excludes), so the constraint lives in the returned value.

A run that fails returns None: the sweeper marks that trial FAIL and goes on (the sweep report lists
it as a failed row).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.context import Metrics
    from pipeline.schema import ObjectiveConfig

# Returned for a run under the accuracy floor (ms; far above any real p50), plus the shortfall.
INFEASIBLE = 1.0e9

# The conditional search space (custom_search_space in conf/sweep/optuna*.yaml): parameters that only
# mean something for some choices are suggested only then, so no two trials differ in a value the run
# ignores (which would also miss the stage cache for nothing).
PERCENTILES = (99.9, 99.99, 99.999)
QAT_LR = (5e-6, 5e-5)  # log-uniform
QAT_EPOCHS = (1, 2)


@dataclass
class Objective:
    metric: str
    value: float | None
    feasible: bool | None
    accuracy: float | None
    latency_p50_ms: float | None
    min_accuracy: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_objective(cfg: ObjectiveConfig, metrics: Metrics) -> Objective:
    """The value a sweeper optimizes for this run (None when the run produced no quantized result)."""
    quant = metrics.engine_precisions.get("quantized") or "int8"
    acc = metrics.accuracy.get(quant)
    p50 = metrics.latency_ms.get(quant, {}).get("p50")
    return objective_value(cfg.metric, cfg.min_accuracy, acc, p50)


def objective_value(metric: str, min_accuracy: float | None, accuracy: float | None, p50: float | None) -> Objective:
    """Pure function of the run's numbers (unit-tested): see the module docstring."""
    if metric == "accuracy":
        ok = accuracy is not None and math.isfinite(accuracy)
        return Objective(metric, accuracy if ok else None, ok or None, accuracy, p50, min_accuracy)
    if metric != "latency":
        raise ValueError(f"objective.metric: {metric!r} is not valid; valid values: accuracy, latency")
    if accuracy is None or p50 is None or not math.isfinite(accuracy) or not math.isfinite(p50):
        return Objective(metric, None, None, accuracy, p50, min_accuracy)
    if min_accuracy is not None and accuracy < min_accuracy:
        return Objective(metric, INFEASIBLE + (min_accuracy - accuracy), False, accuracy, p50, min_accuracy)
    return Objective(metric, p50, True, accuracy, p50, min_accuracy)


def conditional_space(config: Any, trial: Any) -> None:
    """Optuna sweeper `custom_search_space`: called after the flat `params` are suggested.

    calibration.percentile only for calibration=percentile; QAT lr and epochs only when QAT runs.
    `++` adds the key or overrides it (not every calibration option file holds `percentile`).
    """
    if trial.params.get("calibration") == "percentile":
        trial.suggest_categorical("++calibration.percentile", list(PERCENTILES))
    if trial.params.get("qat", "default") != "none":
        trial.suggest_float("qat.lr", *QAT_LR, log=True)
        trial.suggest_categorical("qat.epochs", list(QAT_EPOCHS))
