"""Greedy, latency-aware fallback: return the most sensitive fusion groups to float until the
tuning-split accuracy is within budget, then try to quantize them again (fewest float groups).

Every candidate step is verified by a full evaluation of the tuning split, which gives two numbers: the
accuracy and the mean KL(FP32 || quantized) of the outputs over every tuning example. A step is kept when
it brings the model closer to FP32 by the decision criterion (`tune.criterion`): `kl` (default) — the
KL falls — or `accuracy` — the accuracy rises; otherwise it is stepped back (the group is quantized
again). Why KL by default: on a few hundred examples one example is 0.25 pt, and accepting a step
whenever the accuracy happens to rise keeps the luckiest draw, after which no honest step can beat it
(measured: README "Accuracy budget"); the KL reads every example's whole output distribution, so its
noise is far smaller, and the budget itself is still checked on the accuracy, or on the caller's verdict where it gives one
(`Score.met`: tune=auto's criterion, the task's fidelity targets). After each accepted step the caller re-exports
and re-times the engine (`latency`), so every accepted state on the trace carries a measured INT8 /
baseline latency ratio. The plan chosen is the fastest accepted state that meets the budget (fewest
float groups on a tie or where latency is not measured); if none does, the best one by the criterion
(`met` false). Pure logic over callbacks: the stage supplies the model, tests supply fakes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pipeline.inference import paired_drop_ci95
from pipeline.tune.groups import FusionGroup


@dataclass(frozen=True)
class Budget:
    fp32_accuracy: float  # on the tuning split, fraction
    max_drop: float  # percentage points (absolute) or percent of fp32_accuracy (relative)
    drop_type: str = "absolute"

    def drop(self, accuracy: float) -> float:
        """Drop in the budget's unit (points, or % of FP32); negative = better than FP32."""
        points = 100 * (self.fp32_accuracy - accuracy)
        return points if self.drop_type == "absolute" else 100 * points / (100 * self.fp32_accuracy or 1.0)

    def met(self, accuracy: float) -> bool:
        return self.drop(accuracy) <= self.max_drop + 1e-9

    def drop_ci95(self, ref_correct: np.ndarray, q_correct: np.ndarray) -> float:
        """paired_drop_ci95 in the budget's unit."""
        points = paired_drop_ci95(ref_correct, q_correct)
        return points if self.drop_type == "absolute" else 100 * points / (100 * self.fp32_accuracy or 1.0)


@dataclass(frozen=True)
class Score:
    """One evaluation of the tuning split."""

    accuracy: float  # fraction
    kl: float  # mean KL(FP32 || quantized) over the tuning examples
    # The caller's verdict on the budget where the labelled point drop is not the whole criterion: the
    # task's fidelity targets (embedding: cosine and recall@k to FP32), and tune=auto's budget check
    # (auto.judge: the FP32-expected drop where the labels cannot resolve the budget). None: Budget.met.
    met: bool | None = None

    def better(self, other: Score, criterion: str) -> bool:
        """Closer to FP32 than `other` by the criterion (strictly)."""
        return self.kl < other.kl if criterion == "kl" else self.accuracy > other.accuracy

    def rank(self, criterion: str) -> tuple[float, float]:
        """Sort key, larger = better: the criterion first, the other measure on a tie."""
        return (-self.kl, self.accuracy) if criterion == "kl" else (self.accuracy, -self.kl)


@dataclass
class TraceRow:
    step: int
    action: str  # start | float | quantize (refine) ; rejected steps are recorded with accepted=False
    group: str | None
    groups_in_float: tuple[str, ...]  # the state after the step (before it, for a rejected step)
    accuracy: float  # tuning split, fraction
    drop: float  # budget unit
    met: bool
    accepted: bool
    latency_ratio: float | None = None  # quantized / baseline p50, headline shape; accepted states only
    seconds: float = 0.0  # since the search started
    kl: float = float("nan")  # mean KL to FP32 on the tuning split
    retimed: float | None = None  # latency ratio when the plans meeting the budget were timed together

    @property
    def speed(self) -> float | None:
        """The latency ratio the choice uses: the joint re-timing where there was one."""
        return self.retimed if self.retimed is not None else self.latency_ratio


@dataclass
class SearchResult:
    trace: list[TraceRow]
    chosen: TraceRow
    evaluations: int  # full tuning-split evaluations spent by the search
    stopped: str  # met | exhausted | max_trials | timeout | no_fallback
    effects: dict[str, float] = field(default_factory=dict)  # group -> accuracy change when tried (points)

    @property
    def met(self) -> bool:
        return self.chosen.met


def search(
    ranked: list[FusionGroup],
    *,
    budget: Budget,
    evaluate: Callable[[], Score],
    set_float: Callable[[FusionGroup, bool], None],
    latency: Callable[[int], float | None],
    retime: Callable[[list[int]], dict[int, float]] | None = None,
    start: Score | None = None,
    criterion: str = "kl",
    fallback: bool = True,
    refine: bool = True,
    steps: str = "single",
    max_trials: int = 30,
    timeout_s: float = float("inf"),
    latency_tolerance: float = 0.0,
) -> SearchResult:
    """Run the search from the current state (every group in `ranked` quantized); leaves the model in
    the chosen state. `evaluate()` = tuning Score of the model as it is now; `latency(step)` = its
    quantized/baseline latency ratio (None where not measured); `retime(steps)` = those accepted states
    timed again together ({step: ratio}), used to pick the fastest of several plans meeting the budget.
    `steps`: single = one group per trial, in rank order; doubling = the next block of ranked groups per trial,
    the block doubled after a rejected trial (1, 2, 4, ... groups): where each group carries a small share of the
    error, one group's effect is under the noise of the measured KL, a block's is not."""
    t0 = time.perf_counter()
    evaluations = 0

    def met(s: Score) -> bool:
        return budget.met(s.accuracy) if s.met is None else s.met

    if start is None:
        start, evaluations = evaluate(), 1
    in_float: list[FusionGroup] = []
    cur = start
    a = cur.accuracy
    trace = [TraceRow(0, "start", None, (), a, budget.drop(a), met(cur), True, latency(0), time.perf_counter() - t0, cur.kl)]
    effects: dict[str, float] = {}

    def record(action: str, g: FusionGroup | list[FusionGroup], new: Score, accepted: bool) -> None:
        names = tuple(x.name for x in in_float)
        ratio = latency(len(trace)) if accepted else None
        a = new.accuracy
        label = g.name if isinstance(g, FusionGroup) else "+".join(x.name for x in g)
        trace.append(
            TraceRow(len(trace), action, label, names, a, budget.drop(a), met(new), accepted, ratio, time.perf_counter() - t0, new.kl)
        )

    def out_of_budget() -> str | None:
        if trials >= max_trials:
            return "max_trials"
        if time.perf_counter() - t0 > timeout_s:
            return "timeout"
        return None

    trials = 0
    stopped = "met" if met(cur) else ("no_fallback" if not fallback else "exhausted")
    if fallback and not met(cur):
        i, size = 0, 1
        while i < len(ranked):
            why = out_of_budget()
            if why:
                stopped = why
                break
            block = ranked[i : i + size]
            for g in block:
                set_float(g, True)
            new = evaluate()
            evaluations += 1
            trials += 1
            if len(block) == 1:  # a block's effect is not any one group's
                effects[block[0].name] = 100 * (new.accuracy - cur.accuracy)
            if new.better(cur, criterion):  # accept: the block back in float brings the model closer to FP32
                in_float.extend(block)
                cur = new
                record("float", block, new, True)
                i += len(block)
                if met(cur):
                    stopped = "met"
                    break
            else:  # step back
                for g in block:
                    set_float(g, False)
                record("float", block, new, False)
                if steps == "doubling" and i + size < len(ranked):
                    size *= 2  # the same groups and the next ones: a larger share of the error, above the noise
                else:
                    i += len(block)
        if refine and met(cur) and len(in_float) > 1:
            # Quantize each float group again while the budget still holds, latest-accepted (least
            # sensitive) first; the last one accepted is the step that met the budget, so it stays.
            for g in list(reversed(in_float[:-1])):
                if out_of_budget():
                    break
                set_float(g, False)
                new = evaluate()
                evaluations += 1
                trials += 1
                if met(new):
                    in_float.remove(g)
                    cur = new
                    record("quantize", g, new, True)
                else:
                    set_float(g, True)
                    record("quantize", g, new, False)
    if retime is not None and trace[0].latency_ratio is not None:
        # Time the start and every candidate plan again together (same minutes, in turns), so that the
        # choice among plans meeting the budget, and the before/after ratio, are same-time comparisons.
        meeting = [r for r in trace if r.accepted and r.met]
        steps = sorted({0} | {r.step for r in (meeting or [choose(trace, criterion, latency_tolerance)])})
        if len(steps) > 1:
            for step, ratio in retime(steps).items():
                trace[step].retimed = ratio
    chosen = choose(trace, criterion, latency_tolerance)
    by_name = {g.name: g for g in ranked}
    final = set(chosen.groups_in_float)
    now = {x.name for x in in_float}
    for name in now - final:
        set_float(by_name[name], False)
    for name in final - now:
        set_float(by_name[name], True)
    return SearchResult(trace, chosen, evaluations, stopped, effects)


def choose(trace: list[TraceRow], criterion: str = "kl", latency_tolerance: float = 0.0) -> TraceRow:
    """Fastest accepted state meeting the budget (by the joint re-timing where there was one; states within
    latency_tolerance of the fastest are ties, and the fewest float groups wins: one more group in float is not
    faster, a measurement that says so is noise); else the best accepted state by the criterion (lowest KL, or
    highest accuracy), fewest float groups on a tie."""
    states = [r for r in trace if r.accepted]
    meeting = [r for r in states if r.met]
    if meeting:
        timed = [r.speed for r in meeting if r.speed is not None]
        if timed:
            meeting = [r for r in meeting if r.speed is not None and r.speed <= min(timed) * (1 + latency_tolerance)]
        return min(meeting, key=lambda r: (len(r.groups_in_float), r.speed if r.speed is not None else float("inf"), r.step))
    if criterion == "kl":
        return min(states, key=lambda r: (r.kl, len(r.groups_in_float), r.step))
    return max(states, key=lambda r: (r.accuracy, -len(r.groups_in_float), -r.step))
