"""tuned_quant.yaml: the tuned plan as a config file a later run takes with one override.

    qdq-pipeline <the tuning run's overrides> tune.plan=<run>/tuned_quant.yaml

The file holds the chosen calibrator and `rules` in the quant.rules format (pipeline/quantization/rules.py):
the roles/slots that take another calibrator (tune.calibrator_per; `method` rules) and the fusion groups
returned to float (`enable: false` rules, one per group, naming its quantizers). Applied by the tune stage in
place of the search, each where the tuner decided it: activation amax from the calibrator and the method
rules on this run's calibration histograms (the same one collection pass, so the same numbers), QAT when
`qat` says it ran, then the enable rules. Same model, data and quant/calibration settings -> the tuned
model bit for bit (tests/test_tune.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.outputs import write_text
from pipeline.quantization import rules as qrules
from pipeline.quantization.calibrate import METHODS
from pipeline.schema import QuantRule
from pipeline.tune.calibrators import CANDIDATES

KEYS = ("calibrator", "split", "rules", "qat", "groups_in_float", "budget", "tuned_under")
# Keys of plans written before quant.rules, refused with what replaced them.
REPLACED = {
    "overrides": "rules (label -> {name, roles, method, percentile}); rerun the tuning to rewrite the plan",
    "exclude": "rules (label -> {name: [quantizer names], enable: false}); rerun the tuning to rewrite the plan",
    "role_calibrators": "rules (label -> {roles: [role], method: ..., percentile: ...}); rerun the tuning to rewrite the plan",
}
_RULE_KEYS = ("name", "roles", "enable", "method", "percentile")


def read(path: str | Path) -> dict[str, Any]:
    return yaml.safe_load(Path(path).expanduser().read_text()) or {}


def plan_errors(path: str, calibration_method: str, smoothing: bool = False) -> list[str]:
    """Problems with a tune.plan file, each naming the key and what is valid (start-up validation)."""
    p = Path(path).expanduser()
    if not p.is_file():
        return [f"tune.plan: {path} not found (a tuned_quant.yaml written by a tune=accuracy or tune=auto run)"]
    try:
        plan = read(p)
    except yaml.YAMLError as exc:
        return [f"tune.plan: {path} is not valid YAML ({exc})"]
    if not isinstance(plan, dict):
        return [f"tune.plan: {path} must hold a mapping with keys {', '.join(KEYS)}"]
    errors = [f"tune.plan: {path}: {k!r} was replaced by {REPLACED[k]}" for k in plan if k in REPLACED]
    errors += [f"tune.plan: {path}: unknown key {k!r}; valid keys: {', '.join(KEYS)}" for k in plan if k not in KEYS and k not in REPLACED]
    cal = plan.get("calibrator")
    if cal is not None and cal not in CANDIDATES:
        errors.append(f"tune.plan: {path}: calibrator {cal!r} is not valid; valid values: {', '.join(CANDIDATES)} or null")
    elif cal not in (None, "max") and calibration_method == "max":
        errors.append(f"tune.plan: {path}: calibrator {cal} needs activation histograms; calibration=max collects none")
    rules = plan.get("rules") or {}
    methods = tuple(METHODS)
    if not isinstance(rules, dict) or not all(isinstance(r, dict) and set(r) <= set(_RULE_KEYS) for r in rules.values()):
        errors.append(f"tune.plan: {path}: rules must map labels to quant.rules rules (keys {', '.join(_RULE_KEYS)})")
    else:
        for label, r in rules.items():
            if r.get("method") is not None and r["method"] not in methods:
                errors.append(f"tune.plan: {path}: rules.{label}.method {r['method']!r} is not valid; valid values: {', '.join(methods)}")
            if r.get("method") is None and r.get("enable") is None:
                errors.append(f"tune.plan: {path}: rules.{label} sets nothing; a plan's rules give a method or enable: false")
        if any(r.get("method") for r in rules.values()) and not cal:
            errors.append(f"tune.plan: {path}: method rules refine a calibrator: give calibrator (valid values: {', '.join(CANDIDATES)})")
    split = plan.get("split")

    def number(k: str, lo: float, hi: float) -> bool:
        v = split.get(k)
        return isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi

    if split is not None and not (isinstance(split, dict) and number("split_ratio", 1.0, float("inf")) and number("max_extra", 0.0, 1.0)):
        errors.append(f"tune.plan: {path}: split must be null or a mapping with numbers split_ratio (>= 1) and max_extra (0-1)")
    elif split is not None and smoothing:
        # The plan's split is replayed on the calibrated model: on top of smoothing's it would split twice.
        errors.append(f"tune.plan: {path} splits outlier channels (split); smoothing is set too: choose smoothing=none to replay it")
    if not isinstance(plan.get("qat", False), bool):
        errors.append(f"tune.plan: {path}: qat must be true or false (whether tune=auto's QAT step ran)")
    return errors


def method_rules(plan: dict) -> list[QuantRule]:
    """The plan's calibrator choices per role/slot (applied on the calibration histograms)."""
    return [r for r in qrules.as_rules(plan.get("rules")) if r.method is not None]


def float_rules(plan: dict) -> list[QuantRule]:
    """The plan's `enable: false` rules: the fusion groups returned to float (applied last)."""
    return [r for r in qrules.as_rules(plan.get("rules")) if r.enable is False]


def write(
    path: Path,
    *,
    calibrator: str | None,
    rules: list[dict],
    groups: list,
    budget: dict,
    tuned_under: dict,
    command: str,
    qat: bool | None = None,
    split: dict | None = None,
) -> Path:
    body = {
        # null: the run's own calibration was kept (tune.calibrators=[]), whatever it is
        "calibrator": calibrator if calibrator in CANDIDATES else None,
        # tune=auto: the outlier channel split kept (replayed before the calibrator, from the calibration split)
        **({} if split is None else {"split": split}),
        # tune=auto: whether its QAT step ran (replayed with the run's qat settings, before the enable rules)
        **({} if qat is None else {"qat": qat}),
        "rules": {
            **{f"calibrator_{i}": r for i, r in enumerate(rules)},
            **{f"float_{i}": {"name": list(g.quantizers), "enable": False} for i, g in enumerate(groups)},
        },
        "groups_in_float": [g.name for g in groups],
        "budget": budget,
        "tuned_under": tuned_under,
    }
    head = (
        "# Tuned quantization plan (accuracy budget), written by the tune stage.\n"
        "# calibrator: activation amax method (from the run's calibration histograms); split: outlier channels split\n"
        "# first (tune.split_outliers); rules (quant.rules format):\n"
        "# calibrator_<i>: the roles or slots that take another one (tune.calibrator_per); qat (tune=auto): QAT taken,\n"
        "# as the qat group says; float_<i>: a fusion group returned to float after it (groups_in_float).\n"
        "# Reproduce the tuned model bit for bit:\n"
        f"#   {command} tune.plan={path}\n"
    )
    write_text(path, head + yaml.safe_dump(body, sort_keys=False, width=200))
    return path
