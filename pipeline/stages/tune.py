"""tune: accuracy budget — choose the calibrator, then return the most sensitive fusion groups to float
until fake-quant accuracy on the tuning split is within tune.max_drop of FP32 (pipeline/tune/).

Runs after calibrate (reads its histograms: one collection pass) and before qat (QAT trains the tuned
plan). Every decision reads ctx.encoded["tune"] only; the eval split is measured later by evaluate.
With tune.plan=<tuned_quant.yaml> it applies that plan instead of searching.

Writes sensitivity.csv/png, tune_trace.csv/png, tuned_quant.yaml, and quantizers.safetensors /
quant_map.json again (the plan: amax and which quantizers are on). Not cached itself: its cache key
(for the stages after it) is the plan it chose, so downstream entries are shared exactly when two
runs end with the same tuned model.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.context import RunContext
from pipeline.data.batching import Encoded
from pipeline.inference import torch_logits
from pipeline.outputs import write_text
from pipeline.quantization import rules as qrules
from pipeline.quantization import smoothing
from pipeline.quantization.state import amax_state, load_quantizer_state, save_quantizer_state
from pipeline.schema import ConfigError, RunConfig, SmoothingConfig
from pipeline.stages import _common
from pipeline.tasks import Models
from pipeline.tune import auto, plots
from pipeline.tune import plan as plan_file
from pipeline.tune.calibrators import (
    apply_amax,
    calibration_groups,
    candidate_amax,
    choose_per_group,
    histogram_pairs,
    load_histograms,
    override_rule,
    own_candidate,
)
from pipeline.tune.groups import FusionGroup, active_groups, fusion_groups, set_float
from pipeline.tune.latency import LatencyProbe, engine_outputs
from pipeline.tune.search import Budget, Score, SearchResult, TraceRow, search
from pipeline.tune.sensitivity import Sensitivity, hardest, rank_groups

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Tuning:
    """The tuning split and what every tuning method reads from it: the model's outputs on it (`logits`), their
    score against FP32 (`score`: the task's metric and its divergence), FP32's own outputs and the budget."""

    data: Encoded
    logits: Callable
    score: Callable[..., Score]
    fp32_logits: object
    budget: Budget
    hists: dict
    info: dict
    t0: float


def _tuning(cfg: RunConfig, ctx: RunContext) -> _Tuning:
    t0 = time.perf_counter()
    data = ctx.encoded.get("tune")
    if data is None or not len(data):
        raise ConfigError(["tune: the run has no tuning split (data.num_tune resolved to 0 for this data); set data.num_tune >= 1"])
    bs, task = cfg.evaluate.batch_size, ctx.task

    def logits(model, split=data):
        return torch_logits(model, ctx.tokenizer, split, bs, ctx.device, token_level=task.token_level)

    fp32_logits = logits(ctx.fp32_model)

    # The task's own score and its divergence from FP32 (classification: accuracy and KL of the softmax).
    def score(out) -> Score:
        return Score(float(task.score(out, data)), float(task.divergence(fp32_logits, out).mean()))

    fp32_score = task.score(fp32_logits, data)
    if fp32_score is None:
        raise ConfigError([f"tune: task={task.name} cannot score a tuning split of {len(data)} examples; set data.num_tune higher"])
    budget = Budget(float(fp32_score), cfg.tune.max_drop, cfg.tune.drop_type)
    info: dict = {"tune_examples": len(data), "fp32_tune_accuracy": budget.fp32_accuracy, "start_calibrator": _own_calibrator(cfg)}
    return _Tuning(data, logits, score, fp32_logits, budget, load_histograms(ctx.run_dir), info, t0)


def run(cfg: RunConfig, ctx: RunContext) -> None:
    t = cfg.tune
    tuning = _tuning(cfg, ctx)
    if t.method == "auto":
        return _Auto(cfg, ctx, tuning).run()
    data, logits, score, budget, hists = tuning.data, tuning.logits, tuning.score, tuning.budget, tuning.hists
    fp32_logits, info, t0, task = tuning.fp32_logits, tuning.info, tuning.t0, ctx.task
    evaluations = 1
    if t.plan is not None:
        calibrator, rules, groups, split = _apply_plan(cfg, ctx, hists)
        final_logits = logits(ctx.model)
        s = score(final_logits)
        evaluations += 1
        a = s.accuracy
        chosen = TraceRow(0, "plan", None, tuple(g.name for g in groups), a, budget.drop(a), budget.met(a), True, kl=s.kl)
        info.update(plan=str(t.plan), trace_steps=0)
    else:
        split = None  # tune=accuracy searches no split (tune=auto's step); a plan may carry one
        calibrator, scores, q_logits, rules, spent = _choose_calibrator(cfg, ctx, hists, score, logits, info)
        evaluations += len(scores) + spent
        if q_logits is None:
            q_logits = logits(ctx.model)
            evaluations += 1
        result, ranked, groups_all, fb_info = _fallback(cfg, ctx, data, logits, score, budget, fp32_logits, q_logits, t0)
        info.update(fb_info)
        evaluations += result.evaluations
        final_logits = logits(ctx.model)  # the chosen state, for the drop's confidence interval
        evaluations += 1
        for s in ranked:
            if s.group.name in result.effects:
                s.accuracy_effect = result.effects[s.group.name]
        chosen = result.chosen
        by_name = {g.name: g for g in groups_all}
        groups = [by_name[n] for n in chosen.groups_in_float]
        _write_outputs(ctx, ranked, result, budget)
        start = result.trace[0]
        info.update(
            calibrator_scores=scores,
            start={"accuracy": start.accuracy, "kl": start.kl, "drop": start.drop, "latency_ratio": start.speed},
            stopped=result.stopped,
            trace_steps=len(result.trace) - 1,
            fusion_groups=len(groups_all),
        )
    met = budget.met(chosen.accuracy) and not auto.short_targets(task.fidelity_targets(fp32_logits, final_logits))
    ref_correct, q_correct = task.correct(fp32_logits, data), task.correct(final_logits, data)
    ci = None if ref_correct is None else budget.drop_ci95(ref_correct, q_correct)
    ctx.metrics.tune = {
        "met": met,
        "max_drop": t.max_drop,
        "drop_type": t.drop_type,
        "calibrator": calibrator,
        "calibration_rules": rules,
        "groups_in_float": [g.name for g in groups],
        "evaluations": evaluations,
        "seconds": round(time.perf_counter() - t0, 1),
        "criterion": t.criterion,
        "tune_accuracy": chosen.accuracy,
        "tune_kl": chosen.kl,
        "drop": chosen.drop,
        "drop_ci95": ci,
        "latency_ratio": chosen.speed,
        "quantizers_in_float": sum(len(g.quantizers) for g in groups),
        **info,
    }
    _record_plan(cfg, ctx, calibrator, rules, groups, {"met": met, "tune_drop": round(chosen.drop, 4)}, split=split)
    ctx.chain_key("tune", calibrator, rules, split, sorted(q for g in groups for q in g.quantizers))
    say = "met" if met else "NOT met (best plan found)"
    log.info(
        "tune: budget %s %s: drop %.2f ± %.2f (95 %% interval, %s, %d tuning examples) with calibrator %s and %d fusion groups in float, "
        "%d evaluations",
        t.max_drop,
        say,
        chosen.drop,
        float("nan") if ci is None else ci,
        t.drop_type,
        len(data),
        calibrator,
        len(groups),
        evaluations,
    )
    if not met:
        log.warning(
            "tune: the budget (max_drop %s %s) was not met; kept the best plan found by tune.criterion=%s (drop %.2f)",
            t.max_drop,
            t.drop_type,
            t.criterion,
            chosen.drop,
        )


class _Auto:
    """One tune=auto run (pipeline/tune/auto.py): calibrator (global, then per slot) -> QAT -> fallback -> engine
    check, each taken only while the budget is not met on the tuning split (with tune.plan, the plan's steps
    replayed); each judged by `check` (auto.judge on the whole tuning split), then the metrics, tuned_quant.yaml
    and the cache key of the state it ends in."""

    def __init__(self, cfg: RunConfig, ctx: RunContext, tuning: _Tuning):
        self.cfg, self.ctx, self.data, self.logits, self.score = cfg, ctx, tuning.data, tuning.logits, tuning.score
        self.budget, self.hists, self.fp32_logits = tuning.budget, tuning.hists, tuning.fp32_logits
        self.info, self.t0 = tuning.info, tuning.t0
        self.checks: list[auto.Check] = []
        self.evaluations = 1
        self.clock = time.perf_counter()
        self.fake = None  # the last fake-quant outputs checked (the engine check's comparison)
        self.plan = plan_file.read(cfg.tune.plan) if cfg.tune.plan is not None else None
        self.calibrator, self.scores, self.rules = tuning.info["start_calibrator"], {}, []
        self.qat_taken = False
        self.groups: list[FusionGroup] = []
        self.result: SearchResult | None = None
        self.ranked: list[Sensitivity] | None = None  # the first search's ranking, reused when it resumes
        self.engine_note: str | None = None
        self.split: dict | None = None  # the outlier split kept (tuned_quant.yaml `split`, cache keys)

    def run(self) -> None:
        last = self.calibrate()
        last = self.train(last)
        last = self.fall_back(last)
        last = self.on_engine(last)
        self.finish(last)

    def check(self, step: str, note: str = "", out=None) -> auto.Check:
        if out is None:
            out = self.fake = self.logits(self.ctx.model)
        self.evaluations += 1
        c = auto.judge(self.ctx.task, self.budget, self.fp32_logits, out, self.data, step=step)
        now = time.perf_counter()
        c.seconds, c.note, self.clock = round(now - self.clock, 1), note, now
        self.checks.append(c)
        log.info(
            "tune=auto: after %s: budget %s (%s; %s) KL %.5f, %.1f s", step, "met" if c.met else "not met", c.basis, c.why, c.kl, c.seconds
        )
        return c

    def calibrate(self) -> auto.Check:
        """Step 1: the calibrator with the lowest KL, then per slot (reverted where the whole split disagrees)."""
        cfg, ctx, t, hists = self.cfg, self.ctx, self.cfg.tune, self.hists
        if self.plan is not None:
            self.split = _plan_split(cfg, ctx, hists, self.plan)
            self.calibrator, self.rules = _plan_calibration(cfg, ctx, hists, self.plan)
            return self.check("plan", f"calibrator {self.calibrator} and {len(self.rules)} method rules from {t.plan}")
        names = _candidates(cfg, hists)
        if names:
            self.calibrator, self.scores, kept = _global_calibrator(cfg, ctx, hists, self.score, self.logits, names)
            self.evaluations += len(names)
        last = self.check(
            "calibrator", f"{self.calibrator}, the lowest KL of {len(names)} calibrators" if names else "the run's calibration"
        )
        if not last.met and names and t.split_outliers and not cfg.smoothing.enabled:
            last, kept = self.split_outliers(last, names, kept)
        if last.met or t.calibrator_per == "none" or len(names) < 2:
            return last
        # ~40 candidate evaluations, compared by KL (paired, low noise): on the first search_examples
        task, sub = ctx.task, _head(self.data, t.search_examples)
        sub_ref = self.fp32_logits[: len(sub)]  # _head keeps a whole split it cannot cut (question answering)

        def sub_score(out) -> Score:
            return Score(float(task.score(out, sub)), float(task.divergence(sub_ref, out).mean()))

        self.info["search_examples"] = len(sub)
        start = {n: q.amax.detach().clone() for n, q in ctx.quantizers.items() if q.amax is not None}
        global_check = last
        self.rules, spent = _per_group(cfg, ctx, hists, sub_score, lambda m: self.logits(m, sub), self.calibrator, kept, self.info)
        self.evaluations += spent
        last = self.check(f"calibrator_per_{t.calibrator_per}", f"{len(self.rules)} {t.calibrator_per}s take another calibrator")
        if self.rules and last.kl > global_check.kl:
            # Chosen on the first search_examples, the per-slot state can be further from FP32 on the whole
            # split (measured: all-mpnet-base-v2, KL 0.00559 -> 0.00596): keep the global calibrator's state.
            apply_amax(ctx.quantizers, start, ctx.device)
            self.fake = None  # those outputs were the per-slot state's
            last.note += f"; reverted: whole-split KL {last.kl:.5f} > {global_check.kl:.5f} with the global calibrator"
            self.rules, last = [], dataclasses.replace(global_check, step=last.step, note=last.note, seconds=last.seconds)
            self.checks[-1] = last
            log.info("tune=auto: per-slot calibrators %s", last.note.split("; ", 1)[1])
        return last

    def split_outliers(self, last: auto.Check, names: list[str], kept: dict) -> tuple[auto.Check, dict]:
        """Step 1b: every quantized Linear's outlier input channels split (exact in FP32: the per-tensor input scale
        stops spending its range on a few channels; a Gather per split Linear on the engine), those inputs
        re-calibrated and the calibrator chosen again; kept only where the whole split's KL falls."""
        cfg, ctx = self.cfg, self.ctx
        before, hists, scfg = amax_state(ctx.quantizers), dict(self.hists), _split_config(cfg)
        counts, originals = _split(cfg, ctx, self.hists, scfg)
        if not counts:
            return last, kept
        calibrator, scores, kept_split = _global_calibrator(cfg, ctx, self.hists, self.score, self.logits, names)
        self.evaluations += len(names)
        record = _split_record(scfg, counts)
        check = self.check(
            "split",
            f"{record['channels_added']} input channels added to {len(counts)} Linears; {calibrator}, the lowest KL of {len(names)} calibrators",
        )
        if check.kl < last.kl:
            self.calibrator, self.scores, self.split = calibrator, scores, record
            self.info["split"] = smoothing.summary(counts, scfg)
            return check, kept_split
        smoothing.unsplit(ctx.model, originals)
        self.hists.clear()
        self.hists.update(hists)
        load_quantizer_state(ctx.quantizers, before)
        ctx.model.to(ctx.device)  # the saved state is on the CPU
        self.fake = None  # those outputs were the split state's
        note = f"{check.note}; reverted: KL {check.kl:.5f} >= {last.kl:.5f} without splitting"
        self.checks[-1] = dataclasses.replace(last, step="split", note=note, seconds=check.seconds)
        log.info("tune=auto: outlier split reverted (KL %.5f >= %.5f)", check.kl, last.kl)
        return self.checks[-1], kept

    def train(self, last: auto.Check) -> auto.Check:
        """Step 2: QAT (the qat group's recipe; kd_best keeps its state closest to FP32)."""
        cfg, ctx = self.cfg, self.ctx
        self.qat_taken = bool(self.plan.get("qat")) if self.plan is not None else (not last.met and cfg.qat.enabled)
        if not self.qat_taken:
            return last
        ctx.chain_key("tune", self.calibrator, self.rules, self.split)
        hit = _common.run_qat(cfg, ctx)
        sel = (ctx.metrics.training.get("qat") or {}).get("selection") or {}
        kept_at = f"; kept the state of step {sel['best'].get('step')}" if isinstance(sel.get("best"), dict) else ""
        if sel.get("stopped_early") is not None:
            kept_at += f" (stopped early: no better state in {cfg.qat.patience} evaluations)"
        return self.check("qat", f"{ctx.metrics.training['qat']['steps']} steps{' (cached)' if hit else ''}{kept_at}")

    def fall_back(self, last: auto.Check) -> auto.Check:
        """Step 3, on an evident miss only: fusion groups back to float (they cost latency on every request)."""
        cfg, ctx = self.cfg, self.ctx
        if self.plan is not None:
            self.groups = _plan_groups(cfg, ctx, self.plan)
            return self.check("fallback", f"{len(self.groups)} fusion groups in float from the plan") if self.groups else last
        if last.met or not last.evident_miss or not cfg.tune.fallback:
            return last
        q_logits = self.logits(ctx.model)
        self.evaluations += 1
        # tune.timeout_s bounds the fallback search itself: on a base-size model steps 1-2 alone can take
        # longer than that (measured: 22 min), which left the search no time at all.
        self.search(q_logits)
        return self.check("fallback", f"{len(self.groups)} fusion groups in float ({self.result.stopped})")

    def search(self, q_logits, residual=None) -> None:
        """The fallback search from the model as it is; with `residual`, every candidate judged with it added."""
        ctx, prefix = self.ctx, "" if residual is None else "engine_"
        self.result, ranked, groups_all, fb_info = _fallback(
            self.cfg, ctx, self.data, self.logits, self.score, self.budget, self.fp32_logits, q_logits, time.perf_counter(),
            residual=residual, ranked=self.ranked,
        )  # fmt: skip
        self.ranked = self.ranked if self.ranked is not None else ranked
        self.evaluations += self.result.evaluations
        self.info.update({f"{prefix}{k}": v for k, v in fb_info.items()}, stopped=self.result.stopped)
        self.info.setdefault("fusion_groups", len(groups_all))
        by_name = {g.name: g for g in groups_all}
        self.groups += [by_name[n] for n in self.result.chosen.groups_in_float]
        _write_outputs(ctx, ranked, self.result, self.budget, suffix="" if residual is None else "_engine")

    def on_engine(self, last: auto.Check) -> auto.Check:
        """Step 4. The engine ships, not fake quant: a state met in fake quant is checked once more on the engine
        built from it. Where the engine misses evidently, the fallback resumes once with the engine's own deviation
        from fake quant (measured here) added to every candidate's fake-quant outputs, then the engine decides."""
        cfg, ctx, t = self.cfg, self.ctx, self.cfg.tune
        go = last.met
        for resumed in (False, True):
            if not (go and t.engine_check):
                break
            fake = self.fake if self.fake is not None else self.logits(ctx.model)
            out, self.engine_note = engine_outputs(
                cfg, _probe_models(ctx), ctx.tokenizer, self.data, ctx.path(".tune_engine"), ctx.task.token_level
            )
            if out is None:
                log.info("tune=auto: no engine check: %s", self.engine_note)
                break
            last = self.check("engine", self.engine_note, out=out)
            if last.met or resumed or self.plan is not None or not (t.fallback and last.evident_miss):
                break
            residual = _minus(out, fake)
            self.search(fake, residual=residual)
            # Judged as the search judged it, with the engine's deviation: judged on fake quant alone, all-mpnet-base-v2
            # embeddings read a k-NN drop of 0.75 (3 of 400 examples) after the search met, and the engine was not
            # checked again. Where this reads met, the engine decides (the next round).
            self.fake = self.logits(ctx.model)
            last = self.check("fallback", f"{len(self.groups)} fusion groups in float ({self.result.stopped}), with the engine's deviation",
                              out=_plus(self.fake, residual))  # fmt: skip
            go = last.met
        return last

    def finish(self, last: auto.Check) -> None:
        """metrics.json's tune block, tuned_quant.yaml, the cache key, and one line saying why it stopped."""
        cfg, ctx, t, checks, groups = self.cfg, self.ctx, self.cfg.tune, self.checks, self.groups
        taken = [c.step for c in checks]
        if last.met:
            stopped = "met"
        elif last.step == "engine":
            stopped = "met in fake quant, not on the engine" + ("" if last.evident_miss else " (no evident miss there: no search resumed)")
        elif not last.evident_miss and self.result is None:
            stopped = (
                "not met on the point estimate, no evident miss: no fusion group returned to float (that costs latency on every request)"
            )
        else:
            stopped = "not met after every step available (qat=none or tune.fallback=false remove steps)"
        resolution = auto.resolution_note(checks[0], self.budget, len(self.data))
        ctx.metrics.tune = {
            "method": "auto",
            "met": last.met,
            "max_drop": t.max_drop,
            "drop_type": t.drop_type,
            "calibrator": self.calibrator,
            "calibration_rules": self.rules,
            "qat": self.qat_taken,
            "groups_in_float": [g.name for g in groups],
            "evaluations": self.evaluations,
            "seconds": round(time.perf_counter() - self.t0, 1),
            "criterion": t.criterion,
            "tune_accuracy": last.tune_accuracy,
            "tune_kl": last.kl,
            "drop": last.drop,
            "drop_ci95": last.drop_ci95,
            "expected_drop": last.expected_drop,
            "basis": last.basis,
            "why": last.why,
            "steps": [c.as_dict() for c in checks],
            "stopped_after": taken[-1],
            "stopped": stopped,
            "resolution": resolution,
            "needed_tune_examples": auto.needed_examples(checks[0].flips, self.budget),
            "calibrator_scores": self.scores,
            "latency_ratio": None if self.result is None else self.result.chosen.speed,
            "engine_check": self.engine_note,
            "quantizers_in_float": sum(len(g.quantizers) for g in groups),
            **({"plan": str(t.plan)} if self.plan is not None else {}),
            **self.info,
        }
        budget = {"met": last.met, "tune_drop": round(last.drop, 4), "basis": last.basis, "steps": taken}
        _record_plan(cfg, ctx, self.calibrator, self.rules, groups, budget, qat=self.qat_taken, split=self.split)
        floated = sorted(q for g in groups for q in g.quantizers)
        if self.qat_taken:
            ctx.chain_key("tune_fallback", floated)
        else:
            ctx.chain_key("tune", self.calibrator, self.rules, self.split, floated)
        log.info("tune=auto: %s after %s (%s) in %.0f s; %s", "met" if last.met else "NOT met", " -> ".join(taken), last.why,
                 time.perf_counter() - self.t0, resolution)  # fmt: skip


def _head(data, n: int | None):
    """The first n examples of a tuning split (all of it for n null, or a split type without a plain cut)."""
    if n is None or n >= len(data) or type(data) is not Encoded:
        return data
    return Encoded(data.features[:n], data.labels[:n])


def _record_plan(
    cfg: RunConfig,
    ctx: RunContext,
    calibrator: str,
    rules: list,
    groups: list,
    budget: dict,
    qat: bool | None = None,
    split: dict | None = None,
):
    """tuned_quant.yaml of the tuned state, and the run's quantizer counts and state file as it now is (the
    plan's float groups are off)."""
    t = cfg.tune
    plan_file.write(
        ctx.path("tuned_quant.yaml"),
        calibrator=calibrator,
        rules=rules,
        groups=groups,
        qat=qat,
        split=split,
        budget={"max_drop": t.max_drop, "drop_type": t.drop_type, **budget},
        tuned_under={"config_hash": ctx.config_hash, "model": cfg.model.name, "calibration": cfg.calibration.method},
        command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    )
    ctx.metrics.quantization.count_enabled(ctx.quantizers)
    ctx.artifacts.quantizers = save_quantizer_state(ctx.quantizers, ctx.run_dir)


def _fallback(
    cfg: RunConfig, ctx: RunContext, data, logits, score, budget: Budget, fp32_logits, q_logits, t0: float, residual=None, ranked=None
):
    """Step 3 of every search: rank the fusion groups by the sensitivity proxy, then the latency-aware
    greedy search (pipeline/tune/search.py) from the model as it is (its float groups stay float). With
    `residual` (the engine's outputs less fake quant's), each candidate is judged on its fake-quant outputs
    plus it. With `ranked` (an earlier search's ranking), the groups still quantized keep that order and the
    proxy is not run again (one forward per group: 760 s for all-mpnet-base-v2's 96 groups on 2 cores).
    Returns (result, ranking, all active groups, info); the model is left in the chosen state."""
    t, task = cfg.tune, ctx.task
    info: dict = {}
    groups_all = active_groups(ctx.quantizers)
    if ranked is not None:
        active = {g.name for g in groups_all}
        ranked = [s for s in ranked if s.group.name in active]
        info.update(proxy_reused=len(ranked))
    elif t.fallback:
        subset, ref = hardest(data, fp32_logits, q_logits, t.proxy_examples, task.divergence)
        ranked, base_kl = rank_groups(groups_all, ctx.quantizers, lambda: logits(ctx.model, subset), ref, task.divergence)
        info.update(proxy_examples=len(subset), proxy_forwards=len(groups_all) + 1, proxy_kl_all_quantized=base_kl)
        log.info("tune: %d fusion groups ranked on %d hardest tuning examples; top %s", len(ranked), len(subset),
                 [s.group.name for s in ranked[:5]])  # fmt: skip
    else:
        ranked = []
    probe = LatencyProbe(cfg, _probe_models(ctx), ctx.tokenizer, data, ctx.seed, ctx.path(".tune_work"))

    def scored(out) -> Score:
        # "Met" as the recipe judges it. tune=auto: auto.judge (the FP32-expected drop where the labels cannot
        # resolve the budget): judged on the point drop instead, the search of all-mpnet-base-v2 in issue 16's
        # setting stopped at its start (point drop 0.00, expected 0.58) and the eval lost 1.25 pt. Otherwise the
        # point drop, with the task's fidelity targets (embedding: cosine, recall@k).
        if residual is not None:
            out = _plus(out, residual)
        s = score(out)
        if t.method == "auto":
            return dataclasses.replace(s, met=auto.judge(task, budget, fp32_logits, out, data, step="fallback").met)
        short = auto.short_targets(task.fidelity_targets(fp32_logits, out))
        return dataclasses.replace(s, met=budget.met(s.accuracy) and not short)

    try:
        result = search(
            [s.group for s in ranked],
            budget=budget,
            evaluate=lambda: scored(logits(ctx.model)),
            set_float=lambda g, f: set_float(ctx.quantizers, g, f),
            latency=probe,
            retime=probe.retime,
            start=scored(q_logits),
            criterion=t.criterion,
            fallback=t.fallback,
            refine=t.refine,
            steps=t.fallback_steps,
            max_trials=t.max_trials,
            latency_tolerance=t.latency_tolerance,
            timeout_s=max(0.0, t.timeout_s - (time.perf_counter() - t0)),
        )
    finally:
        probe.close()
    info.update(latency_note=probe.note, latency_seconds=round(probe.seconds, 1))
    return result, ranked, groups_all, info


def _plus(a, b):
    """Outputs added (arrays, or token-level lists of arrays)."""
    return [x + y for x, y in zip(a, b)] if isinstance(a, list) else a + b


def _minus(a, b):
    return [x - y for x, y in zip(a, b)] if isinstance(a, list) else a - b


def _choose_calibrator(cfg: RunConfig, ctx: RunContext, hists, score, logits, info: dict) -> tuple[str, dict, np.ndarray | None, list, int]:
    """Score every tune.calibrators candidate on the tuning split; keep the best by tune.criterion (the
    other measure breaks a tie); with tune.calibrator_per, then the best per role or slot. Returns (name,
    {name: {accuracy, kl}}, logits of the chosen state, quant.rules (dicts) where a role/slot
    differs, evaluations spent); the per-group scores go to info["calibrator_per_group"]."""
    own = _own_calibrator(cfg)
    names = _candidates(cfg, hists)
    if not names:
        return own, {}, None, [], 0
    best, scores, kept = _global_calibrator(cfg, ctx, hists, score, logits, names)
    if cfg.tune.calibrator_per == "none" or len(names) < 2:
        return best, scores, kept[best][1], [], 0
    rules, spent = _per_group(cfg, ctx, hists, score, logits, best, kept, info)
    # the refined state's logits are evaluated by the caller
    return best, scores, None, rules, spent


def _own_calibrator(cfg: RunConfig) -> str:
    """The run's own calibration as a candidate name, else its method (a percentile not in the list, or rules)."""
    return own_candidate(cfg.calibration, qrules.as_rules(cfg.quant.rules)) or cfg.calibration.method


def _candidates(cfg: RunConfig, hists) -> list[str]:
    """tune.calibrators that this run can compute (calibration=max keeps no histograms: max alone)."""
    return [n for n in cfg.tune.calibrators if n == "max" or hists]


def _global_calibrator(cfg: RunConfig, ctx: RunContext, hists, score, logits, names: list[str]):
    """Every candidate on every quantizer, scored on the tuning split; the best by tune.criterion is
    applied. Returns (best, {name: {accuracy, kl}}, {name: (amax, logits)})."""
    crit = cfg.tune.criterion
    scores, kept = {}, {}
    for name in names:
        amax = candidate_amax(name, hists, ctx.quantizers, cfg.calibration) if name != "max" or hists else {}
        apply_amax(ctx.quantizers, amax, ctx.device)
        out = logits(ctx.model)
        s = score(out)
        scores[name] = {"accuracy": s.accuracy, "kl": s.kl}
        kept[name] = (amax, out)
        log.info("tune: calibrator %s: tuning accuracy %.4f, KL %.5f", name, s.accuracy, s.kl)
    best = max(names, key=lambda n: Score(**scores[n]).rank(crit))
    apply_amax(ctx.quantizers, kept[best][0], ctx.device)
    return best, scores, kept


def _per_group(cfg: RunConfig, ctx: RunContext, hists, score, logits, best: str, kept: dict, info: dict) -> tuple[list, int]:
    """The best candidate per role or slot (tune.calibrator_per) on top of the global `best`: rules in the
    quant.rules format and the evaluations spent; the model is left refined."""
    crit = cfg.tune.criterion
    names = list(kept)
    groups = calibration_groups(cfg.tune.calibrator_per, hists, ctx.quantizers)

    chosen, tried = choose_per_group(
        {label: ns for label, (_, ns) in groups.items()},
        {n: kept[n][0] for n in names},
        best,
        lambda: score(logits(ctx.model)),
        lambda a: apply_amax(ctx.quantizers, a, ctx.device),
        key=lambda s: s.rank(crit),
    )
    rules = [override_rule(groups[label][0], cand) for label, cand in chosen.items()]
    info["calibrator_per_group"] = {
        label: {c: {"accuracy": r.accuracy, "kl": r.kl} for c, r in t.items()} | {"chosen": chosen.get(label, best)}
        for label, t in tried.items()
    }
    log.info("tune: per-%s calibrators %s (global %s)", cfg.tune.calibrator_per, chosen or "none better", best)
    return rules, 1 + sum(len(t) - 1 for t in tried.values())


def _apply_plan(cfg: RunConfig, ctx: RunContext, hists) -> tuple[str, list, list[FusionGroup], dict | None]:
    plan = plan_file.read(cfg.tune.plan)
    split = _plan_split(cfg, ctx, hists, plan)
    calibrator, rules = _plan_calibration(cfg, ctx, hists, plan)
    groups = _plan_groups(cfg, ctx, plan)
    log.info("tune: plan %s applied: calibrator %s, %d method rules, %d quantizers in float", cfg.tune.plan, calibrator,
             len(rules), sum(len(g.quantizers) for g in groups))  # fmt: skip
    return calibrator, rules, groups, split


def _plan_calibration(cfg: RunConfig, ctx: RunContext, hists, plan: dict) -> tuple[str, list]:
    """A plan's calibrator and method rules, applied on this run's calibration histograms."""
    calibrator = plan.get("calibrator") or _own_calibrator(cfg)
    rules = plan_file.method_rules(plan)
    if plan.get("calibrator"):
        amax = candidate_amax(plan["calibrator"], hists, ctx.quantizers, cfg.calibration, rules)
        apply_amax(ctx.quantizers, amax, ctx.device)
    return calibrator, [qrules.to_dict(r) for r in rules]


def _split_config(cfg: RunConfig, ratio: float | None = None, max_extra: float | None = None) -> SmoothingConfig:
    """tune=auto's outlier split: smoothing.method=split on every quantized Linear (ratio / max_extra: smoothing's)."""
    s = cfg.smoothing
    return SmoothingConfig(enabled=True, method="split", split_ratio=s.split_ratio if ratio is None else ratio, max_extra=s.max_extra if max_extra is None else max_extra,
                           modules=["*"])  # fmt: skip


def _split_record(scfg: SmoothingConfig, counts: dict) -> dict:
    """tuned_quant.yaml `split`: what replays it (the counts follow from the calibration split) and what it added."""
    return {
        "split_ratio": scfg.split_ratio,
        "max_extra": scfg.max_extra,
        "channels_added": sum(int((m - 1).sum()) for m in counts.values()),
    }


def _split(cfg: RunConfig, ctx: RunContext, hists: dict, scfg: SmoothingConfig) -> tuple[dict, dict]:
    """Split the calibrated model's outliers; `hists` takes the split inputs' new histograms. Returns (m by module,
    what smoothing.unsplit needs)."""
    counts, new, originals = smoothing.split_calibrated(
        ctx.model, ctx.quantizers, scfg, _common.calib_batches(cfg, ctx), cfg.calibration, qrules.as_rules(cfg.quant.rules)
    )  # fmt: skip
    hists.update(histogram_pairs(new))
    ctx.model.to(ctx.device)
    return counts, originals


def _plan_split(cfg: RunConfig, ctx: RunContext, hists: dict, plan: dict) -> dict | None:
    """A plan's outlier split, replayed (the same calibration split gives the same channel counts)."""
    rec = plan.get("split")
    if not rec:
        return None
    scfg = _split_config(cfg, rec["split_ratio"], rec["max_extra"])
    counts, _ = _split(cfg, ctx, hists, scfg)
    if not counts:
        log.warning("tune.plan: the plan splits outlier channels, but no input channel of this model exceeds split_ratio x its median")
        return None
    done = _split_record(scfg, counts)
    if rec.get("channels_added") not in (None, done["channels_added"]):
        # Another model or calibration split than the plan's: replayed, but not the tuned model bit for bit.
        log.warning("tune.plan: the plan's split added %s input channels, this run's %d (another model or calibration split?)",
                    rec["channels_added"], done["channels_added"])  # fmt: skip
    return done


def _plan_groups(cfg: RunConfig, ctx: RunContext, plan: dict) -> list[FusionGroup]:
    """A plan's quantizers returned to float (its enable: false rules; whole fusion groups)."""
    rules = plan_file.float_rules(plan)
    unmatched = [r for r in rules if not any(qrules.matches(r, n, q.role) for n, q in ctx.quantizers.items())]
    if unmatched:
        some = ", ".join(list(ctx.quantizers)[:3])
        raise ConfigError(
            [
                f"tune.plan: {cfg.tune.plan}: {len(unmatched)} enable: false rules match no quantizer of this model, e.g. {unmatched[0].name[:3]}; "
                f"names look like {some}, ..."
            ]  # fmt: skip
        )
    exclude = [n for n, q in ctx.quantizers.items() if not qrules.enabled(n, q.role, rules)]
    groups = fusion_groups({n: ctx.quantizers[n].role for n in exclude})
    for g in groups:
        set_float(ctx.quantizers, g, True)
    return groups


def _write_outputs(ctx: RunContext, ranked: list[Sensitivity], result: SearchResult, budget: Budget, suffix: str = "") -> None:
    """sensitivity.csv/png and tune_trace.csv/png (`suffix`: _engine for tune=auto's search resumed after the
    engine check)."""
    rows = [["rank", "group", "kind", "quantizers", "proxy_score", "kl_group_in_float", "accuracy_effect_pt"]]
    for i, s in enumerate(ranked, 1):
        effect = "" if s.accuracy_effect is None else f"{s.accuracy_effect:.4f}"
        rows.append([i, s.group.name, s.group.kind, len(s.group.quantizers), f"{s.score:.6g}", f"{s.kl:.6g}", effect])
    write_text(ctx.path(f"sensitivity{suffix}.csv"), _csv(rows))
    if ranked:
        plots.sensitivity_png(ranked, ctx.path(f"sensitivity{suffix}.png"))
    rows = [
        [
            "step",
            "action",
            "group",
            "accepted",
            "groups_in_float",
            "n_groups_in_float",
            "tune_accuracy",
            "tune_kl",
            "drop",
            "met",
            "latency_ratio",
            "latency_ratio_retimed",
            "seconds",
        ]
    ]
    for r in result.trace:
        ratio = "" if r.latency_ratio is None else f"{r.latency_ratio:.4f}"
        again = "" if r.retimed is None else f"{r.retimed:.4f}"
        rows.append(
            [r.step, r.action, r.group or "", int(r.accepted), ";".join(r.groups_in_float), len(r.groups_in_float), f"{r.accuracy:.6f}",
             f"{r.kl:.6g}", f"{r.drop:.4f}", int(r.met), ratio, again, f"{r.seconds:.1f}"]
        )  # fmt: skip
    write_text(ctx.path(f"tune_trace{suffix}.csv"), _csv(rows))
    floor = (
        budget.fp32_accuracy - budget.max_drop / 100
        if budget.drop_type == "absolute"
        else budget.fp32_accuracy * (1 - budget.max_drop / 100)
    )
    plots.trace_png(result.trace, result.chosen, floor, budget.fp32_accuracy, ctx.path(f"tune_trace{suffix}.png"))
    ctx.artifacts.plots.update(
        {f"sensitivity{suffix}": ctx.path(f"sensitivity{suffix}.png"), f"tune_trace{suffix}": ctx.path(f"tune_trace{suffix}.png")}
    )


def _csv(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _probe_models(ctx: RunContext) -> Models:
    return Models(ctx.model, ctx.fp32_model, ctx.tokenizer, ctx.device)
