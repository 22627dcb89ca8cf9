"""tuned_quant.yaml: the tuned plan as a config file a later run takes with one override.

    qdq-pipeline <the tuning run's overrides> tune.plan=<run>/tuned_quant.yaml

The file holds the chosen calibrator, the roles/slots that take another one (`overrides`: rules in the
`calibration.overrides` format, tune.calibrator_per) and the quantizers returned to float (by fusion
group). Applied by the tune stage in place of the search: activation amax from the calibrator and rules on
this run's calibration histograms (the same one collection pass, so the same numbers), then the listed
quantizers off. Same
model, data and quant/calibration settings -> the tuned model bit for bit (tests/test_tune.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.outputs import write_text
from pipeline.quantization.calibrate import METHODS
from pipeline.tune.calibrators import CANDIDATES, override_rule

KEYS = ("calibrator", "overrides", "qat", "groups_in_float", "exclude", "budget", "tuned_under")
# Plans written before the rules (tune.per_role): {role: calibrator}; read as one rule per role.
LEGACY = ("role_calibrators",)
_RULE_KEYS = ("match", "roles", "method", "percentile")


def read(path: str | Path) -> dict[str, Any]:
    return yaml.safe_load(Path(path).expanduser().read_text()) or {}


def plan_errors(path: str, calibration_method: str) -> list[str]:
    """Problems with a tune.plan file, each naming the key and what is valid (start-up validation)."""
    p = Path(path).expanduser()
    if not p.is_file():
        return [f"tune.plan: {path} not found (a tuned_quant.yaml written by a tune=accuracy run)"]
    try:
        plan = read(p)
    except yaml.YAMLError as exc:
        return [f"tune.plan: {path} is not valid YAML ({exc})"]
    if not isinstance(plan, dict):
        return [f"tune.plan: {path} must hold a mapping with keys {', '.join(KEYS)}"]
    errors = [f"tune.plan: {path}: unknown key {k!r}; valid keys: {', '.join(KEYS)}" for k in plan if k not in KEYS + LEGACY]
    cal = plan.get("calibrator")
    if cal is not None and cal not in CANDIDATES:
        errors.append(f"tune.plan: {path}: calibrator {cal!r} is not valid; valid values: {', '.join(CANDIDATES)} or null")
    elif cal not in (None, "max") and calibration_method == "max":
        errors.append(f"tune.plan: {path}: calibrator {cal} needs activation histograms; calibration=max collects none")
    roles = plan.get("role_calibrators") or {}
    if not isinstance(roles, dict) or any(v not in CANDIDATES for v in roles.values()):
        errors.append(f"tune.plan: {path}: role_calibrators must map roles to calibrators; valid values: {', '.join(CANDIDATES)}")
    rules = plan.get("overrides") or []
    methods = tuple(METHODS)
    if not isinstance(rules, list) or not all(isinstance(r, dict) and set(r) <= set(_RULE_KEYS) for r in rules):
        errors.append(f"tune.plan: {path}: overrides must be a list of calibration.overrides rules (keys {', '.join(_RULE_KEYS)})")
    elif any(r.get("method") not in methods for r in rules):
        errors.append(f"tune.plan: {path}: overrides: every rule needs a method; valid values: {', '.join(methods)}")
    if (rules or roles) and not cal:
        errors.append(
            f"tune.plan: {path}: overrides / role_calibrators refine a calibrator: give calibrator (valid values: {', '.join(CANDIDATES)})"
        )
    if not isinstance(plan.get("qat", False), bool):
        errors.append(f"tune.plan: {path}: qat must be true or false (whether tune=auto's QAT step ran)")
    exclude = plan.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(x, str) for x in exclude):
        errors.append(f"tune.plan: {path}: exclude must be a list of quantizer names (quant_map.json 'name')")
    return errors


def overrides(plan: dict) -> list[dict]:
    """The plan's calibration override rules (a legacy role_calibrators map becomes one rule per role)."""
    legacy = [override_rule({"roles": [role]}, cand) for role, cand in (plan.get("role_calibrators") or {}).items()]
    return list(plan.get("overrides") or []) + legacy


def write(
    path: Path,
    *,
    calibrator: str | None,
    overrides: list,
    groups: list,
    budget: dict,
    tuned_under: dict,
    command: str,
    qat: bool | None = None,
) -> Path:
    body = {
        # null: the run's own calibration was kept (tune.calibrators=[]), whatever it is
        "calibrator": calibrator if calibrator in CANDIDATES else None,
        "overrides": overrides,
        # tune=auto: whether its QAT step ran (replayed with the run's qat settings, before `exclude`)
        **({} if qat is None else {"qat": qat}),
        "groups_in_float": [g.name for g in groups],
        "exclude": [q for g in groups for q in g.quantizers],
        "budget": budget,
        "tuned_under": tuned_under,
    }
    head = (
        "# Tuned quantization plan (accuracy budget), written by the tune stage.\n"
        "# calibrator: activation amax method (from the run's calibration histograms); overrides: the roles or\n"
        "# slots that take another one (tune.calibrator_per; calibration.overrides rules, first match wins);\n"
        "# qat (tune=auto): QAT taken, as the qat group says; exclude: quantizers returned to float after it,\n"
        "# whole fusion groups (groups_in_float).\n"
        "# Reproduce the tuned model bit for bit:\n"
        f"#   {command} tune.plan={path}\n"
    )
    write_text(path, head + yaml.safe_dump(body, sort_keys=False, width=200))
    return path
