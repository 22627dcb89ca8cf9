"""tune=auto: the adaptive default recipe — spend effort only where the accuracy needs it.

Steps, each taken only while the budget (tune.max_drop) is not met on the tuning split:

1. calibrator: the best of the six calibrators by KL to FP32 (from the one calibration pass's
   histograms), then the best per slot (tune.calibrator_per);
2. qat: quantization-aware training as the qat group says (default qat=kd_best: distillation from the
   frozen FP32 model, the best state by KL, so it never ends above its start's KL);
3. fallback: the most sensitive fusion groups back to float (latency-aware search), taken only when the
   budget is *not met* on evidence (below), because it costs speed on every request afterwards; the search
   judges its candidates by the same check;
4. engine: the state that met the budget in fake quant, checked on the run's own engine (the tuning split
   through it); an evident miss there resumes the fallback once, each candidate's fake-quant outputs shifted
   by the engine's measured deviation (pipeline/stages/tune.py).

The budget check (`judge`). A labelled tuning split of a few hundred examples cannot resolve a budget of
a few tenths of a point: the paired 95 % interval of the drop is about 1.96 * sqrt(flips / n), e.g.
±1 pt for 400 examples and 3 % flips. So:

- where the interval is narrower than the budget, the labels decide: met when drop + interval <= budget,
  missed (evidently) when drop - interval > budget;
- otherwise two measures must both be within the budget: the labelled point drop and the FP32-expected
  drop — per example, how much probability FP32 itself gives its own answer over the quantized model's
  answer (0 where they agree). The expected drop needs no labels and its noise is a fraction of the
  labelled drop's (flips happen at near-ties, where FP32 is unsure); the point drop guards against
  FP32's probabilities being over-confident about its near-ties. A miss is evident when the expected drop
  (the low-noise measure) is over the budget; a point drop over it with the expected drop within is not;
- a task without class probabilities (embedding) checks its own fidelity targets (cosine, recall@k) and
  the point drop of its score.

Continuing is cheap and safe for steps 1-2 (more search, or QAT that keeps its best state by KL), so they
run unless the budget is met; step 3 costs latency on every request, so it runs only on an evident miss
(a point drop over the budget with the expected drop within it is neither "met" nor "evident": no float groups).

`needed_examples` says how many labelled tuning examples the budget would need at the measured flip
rate, so the report can say plainly when the data cannot resolve it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.inference import Outputs
from pipeline.tasks import Task
from pipeline.tune.search import Budget

Z95 = 1.96


@dataclass
class Check:
    """The budget judged once, on the whole tuning split, after a step."""

    step: str  # calibrator | calibrator_per_slot | qat | fallback | plan
    met: bool
    basis: str  # labels | fp32_expected | point (the task's score, no interval) | targets
    why: str
    tune_accuracy: float  # the task's score on the tuning split (fraction)
    drop: float  # labelled drop, budget unit
    drop_ci95: float | None  # its paired 95 % half-width (None: the score is not a per-example mean)
    expected_drop: float | None  # FP32-expected drop, budget unit
    kl: float  # mean divergence from FP32 (the decision criterion)
    evident_miss: bool = False  # not met beyond the noise of the evidence (what the fallback step needs)
    flips: float | None = None  # fraction of tuning examples where the quantized answer differs from FP32's
    expected_drop_low: float | None = None  # one-sided 95 % lower bound of the FP32-expected drop (budget unit)
    targets: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> {value, minimum}
    seconds: float = 0.0  # spent by the step
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def short_targets(targets: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The task's fidelity targets (Task.fidelity_targets) not met: the value, less its 95 % interval where the
    task gives one (ci95), below the minimum."""
    return {n: v for n, v in targets.items() if v["value"] - v.get("ci95", 0.0) < v["minimum"]}


def target_text(name: str, v: dict[str, float]) -> str:
    """ "recall_at_10 0.9023 ± 0.0061": a fidelity target's value and, where the task gives one, its interval."""
    ci = f" ± {v['ci95']:.4f}" if v.get("ci95") else ""
    how = f" (recall@{v['k']:.0f} of {v['pool']:.0f}: the eval pool's density)" if "k" in v and not name.endswith(f"_{v['k']:.0f}") else ""
    return f"{name} {v['value']:.4f}{ci}{how}"


def judge(
    task: Task,
    budget: Budget,
    reference: Outputs,
    outputs: Outputs,
    data,
    *,
    step: str,
) -> Check:
    """The budget on the tuning split for `outputs` (quantized) against `reference` (FP32)."""
    score = float(task.score(outputs, data))
    drop = budget.drop(score)
    kl = float(task.divergence(reference, outputs).mean())
    ref_ok, q_ok = task.correct(reference, data), task.correct(outputs, data)
    ci = None if ref_ok is None else budget.drop_ci95(ref_ok, q_ok)
    if ci is not None:
        # With few flips the normal interval collapses (0 flips: ±0); no interval is tighter than the rule
        # of three on the flip rate (95 % upper bound 3/n when none is seen), which bounds the drop.
        ci = max(ci, _in_unit(budget, 100 * 3 / len(q_ok)))
    flips = None if ref_ok is None else _flip_rate(reference, outputs)
    loss = task.expected_loss(reference, outputs)
    expected = None if loss is None else _in_unit(budget, 100 * float(np.mean(loss)))
    # A miss is evident when the expected drop is over the budget. Its 95 % lower bound (Poisson's on the summed
    # expected losses: a few flips carry them) is reported, not required: required, it withheld the float groups
    # from all-mpnet-base-v2 in issue 16's setting (expected 0.581, bound 0.121, point 0.00 on tuning), which then
    # lost 1.38 pt on eval; the symmetric demo's QAT state (expected 0.327) went to float for -0.05 pt on eval.
    expected_low = None if loss is None else _in_unit(budget, 100 * poisson_lower(float(np.sum(loss))) / max(len(loss), 1))
    targets = task.fidelity_targets(reference, outputs)
    short = short_targets(targets)
    m = budget.max_drop
    within = drop <= m + 1e-9
    if short:
        met, evident, basis = False, True, "targets"
        why = "; ".join(f"{target_text(n, v)} < {v['minimum']}" for n, v in short.items())
    elif ci is not None and ci < m and (drop + ci <= m + 1e-9 or drop - ci > m):
        met, basis = drop + ci <= m + 1e-9, "labels"
        evident = not met
        why = f"drop {drop:.2f} ± {ci:.2f} {'within' if met else 'beyond'} {m} on {len(q_ok)} labelled examples"
    elif expected is not None:
        met, basis = expected <= m + 1e-9 and within, "fp32_expected"
        evident = expected > m + 1e-9
        unresolved = "" if ci is None else f"labels cannot resolve it (drop {drop:.2f} ± {ci:.2f}, point {'<=' if within else '>'} {m}); "
        why = f"{unresolved}FP32-expected drop {expected:.3f} (95 % lower bound {expected_low:.3f}) {'<=' if expected <= m + 1e-9 else '>'} {m}"
    else:
        met, basis = within, "point" if not targets else "targets"
        evident = not met
        what = "".join(f"{target_text(n, v)} >= {v['minimum']}; " for n, v in targets.items())
        why = f"{what}{task.score_name} drop {drop:.2f} {'<=' if met else '>'} {m} (no per-example interval for this score)"
    return Check(step, bool(met), basis, why, score, float(drop), ci, expected, kl, bool(evident), flips, expected_low, targets)


def poisson_lower(total: float, z: float = 1.645) -> float:
    """One-sided 95 % lower bound of a Poisson mean observed as `total` (Wilson-Hilferty's chi-square quantile:
    within 0.02 of the exact bound for totals of 1 and more)."""
    if total <= 0:
        return 0.0
    c = 2 / (9 * 2 * total)
    return max(0.0, 2 * total * (1 - c - z * math.sqrt(c)) ** 3 / 2)


def needed_examples(flips: float | None, budget: Budget) -> int | None:
    """Labelled tuning examples for the paired interval of a drop near 0 to fit inside the budget at this
    flip rate (interval ~ 1.96 * sqrt(flips / n)); None where there is no per-example interval."""
    if flips is None or budget.max_drop <= 0:
        return None
    unit = 1.0 if budget.drop_type == "absolute" else 100.0 / (100 * budget.fp32_accuracy or 1.0)
    half = budget.max_drop / 100 / unit  # the budget as a fraction of examples
    return math.ceil((Z95**2) * max(flips, 1e-6) / half**2)


def resolution_note(check: Check, budget: Budget, examples: int) -> str:
    """One sentence: can this tuning split resolve the budget, and how many examples would."""
    if check.drop_ci95 is None:
        return "the task's score has no per-example paired interval: decided on the FP32-relative measures"
    need = needed_examples(check.flips, budget)
    if check.drop_ci95 < budget.max_drop:
        return f"{examples} labelled tuning examples resolve the budget (interval ±{check.drop_ci95:.2f})"
    return (
        f"{examples} labelled tuning examples give ±{check.drop_ci95:.2f} pt, wider than the budget {budget.max_drop}; at this model's "
        f"flip rate ({100 * (check.flips or 0):.1f} %) about {need} would be needed (data.num_tune): met needs the point and the "
        "FP32-expected drops within it, an evident miss the FP32-expected drop over it"
    )


def _flip_rate(reference: Outputs, outputs: Outputs) -> float:
    """Fraction of examples whose argmax (every token, for token-level outputs) differs from FP32's."""
    if isinstance(reference, list):
        return float(np.mean([np.any(r.argmax(-1) != o.argmax(-1)) for r, o in zip(reference, outputs)]))
    return float(np.mean(np.asarray(reference).argmax(-1) != np.asarray(outputs).argmax(-1)))


def _in_unit(budget: Budget, points: float) -> float:
    return points if budget.drop_type == "absolute" else 100 * points / (100 * budget.fp32_accuracy or 1.0)
