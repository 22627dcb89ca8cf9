"""Config: every option of every group composes and validates; bad input gets exact messages."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from omegaconf import OmegaConf

from pipeline.schema import ConfigError
from pipeline.testing import CONF, compose_cfg
from pipeline.validation import validate

GROUPS = [
    "model",
    "data",
    "finetune",
    "calibration",
    "quant",
    "smoothing",
    "qat",
    "export",
    "engine",
    "benchmark",
    "deploy",
    "experiment",
    "task",
    "tune",
]
# Options that need more than the option itself to be a valid run.
NEEDS = {
    ("data", "csv"): ["data.train_path=a.csv", "data.eval_path=b.csv"],
    ("engine", "none"): ["benchmark=none"],
    ("export", "none"): ["engine=none", "benchmark=none"],
    ("calibration", "none"): ["qat=none"],
}


def _options():
    for group in GROUPS:
        for f in sorted((CONF / group).glob("*.yaml")):
            yield group, f.stem


def _leaves(node, prefix=""):
    """(dotted key, raw value) of every leaf of a plain container (interpolations left unresolved)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), node


def _declared(path) -> tuple[dict, bool]:
    """(the values an option file sets, `defaults` aside; whether they land at the root: @package _global_)."""
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    data.pop("defaults", None)
    return data, "@package _global_" in path.read_text()


@pytest.mark.parametrize(("group", "option"), list(_options()))
def test_every_option_composes_validates_and_sets_its_values(group, option):
    overrides = NEEDS.get((group, option), [])
    cfg = compose_cfg([f"{group}={option}"] + overrides)
    validate(cfg)
    data, is_global = _declared(CONF / group / f"{option}.yaml")
    root = OmegaConf.to_container(cfg if is_global else cfg[group], resolve=False)
    overridden = {o.split("=")[0] for o in overrides}
    for key, value in _leaves(data):
        full = key if is_global else f"{group}.{key}"
        if full not in overridden and not (isinstance(value, str) and "${" in value):  # interpolations resolve elsewhere
            assert OmegaConf.select(OmegaConf.create(root), key) == value, f"{group}={option}: {full} is not the option's value"


def test_every_yaml_opens_with_a_comment_saying_what_it_is_for():
    """House rule: each YAML file opens with a comment (Hydra's `# @package` directive does not count)."""
    missing = []
    for path in sorted(CONF.rglob("*.yaml")):
        lines = path.read_text().lstrip().splitlines()
        head = [ln for ln in lines if not ln.startswith("# @package")]
        if not head or not head[0].startswith("#") or len(head[0].lstrip("# ").strip()) < 3:
            missing.append(path.relative_to(CONF).as_posix())
    assert len(list(CONF.rglob("*.yaml"))) > 50  # the glob really found the configs
    assert missing == [], f"these configs should open with a comment saying what they are for: {missing}"


def test_default_config_is_the_embedded_demo():
    c = validate(compose_cfg())
    assert (c.model.name, c.data.name, c.calibration.method) == ("minilm_l6", "movie_snippets", "percentile")
    assert (c.benchmark.headline_batch, c.benchmark.headline_seq) == (8, 128)


def test_typo_in_group_option_is_refused_by_hydra_with_the_choices():
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(["calibration=entropyy"])
    msg = str(e.value)
    assert "Could not find 'calibration/entropyy'" in msg
    assert "Available options in 'calibration':" in msg and "entropy" in msg and "mse" in msg


def test_typo_in_key_is_refused():
    with pytest.raises(ConfigCompositionException, match=r"Could not override 'calibration.num_binz'"):
        compose_cfg(["calibration.num_binz=10"])
    cfg = compose_cfg(["+calibration.num_binz=10"])  # appended on purpose: our validator names it
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert (
        "calibration.num_binz: unknown key; valid keys: method, num_batches, batch_size, num_bins, skip_zeros, percentile, start_bin, stride"
        in str(e.value)
    )


def test_all_errors_reported_at_once_with_exact_text():
    cfg = compose_cfg(["calibration.num_bins=abc", "calibration.method=kl", "calibration.percentile=150", "engine.graph_optimization=max"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert e.value.errors == [
        "calibration.method: 'kl' is not valid; valid values: max, percentile, entropy, mse, none",
        "calibration.num_bins: expected int, got 'abc' (str)",
        "calibration.percentile: 150.0 out of range; must be in [0.0, 100.0]",
        "engine.graph_optimization: 'max' is not valid; valid values: disable, basic, extended, all",
    ]
    assert str(e.value).startswith("invalid configuration (4 errors):\n  - calibration.method:")


def test_wrong_type_bool_for_int():
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(["benchmark.iters=true"]))
    assert e.value.errors == ["benchmark.iters: expected int, got True (bool)"]


def test_bad_combinations():
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(["calibration=none", "qat.enabled=true", "benchmark.seq_lens=[128,512]"]))
    assert e.value.errors == [
        "qat: QAT needs calibrated quantizers; calibration=none cannot be combined with qat enabled (choose qat=none or a calibration method)",
        "benchmark.seq_lens: 512 exceeds model.max_length=128",
    ]
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(["export=none"]))
    assert e.value.errors == ["engine=auto needs the ONNX files: export=none cannot be combined with an engine (choose engine=none)"]


def test_missing_required_value():
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(["data=csv"]))
    assert e.value.errors == [
        "data.train_path: missing (required; set it on the command line, e.g. data.train_path=...)",
        "data.eval_path: missing (required; set it on the command line, e.g. data.eval_path=...)",
    ]


def test_preflight_reports_environment_problems_before_any_stage(tmp_path):
    from pipeline.run import run_pipeline

    cfg = compose_cfg(
        ["data=csv", f"data.train_path={tmp_path}/nope.csv", f"data.eval_path={tmp_path}/nope2.csv", "model.name_or_path=/no/such/model"]
    )
    with pytest.raises(ConfigError) as e:
        run_pipeline(cfg, tmp_path / "run")
    assert e.value.errors == [
        f"data.train_path: file not found: {tmp_path}/nope.csv",
        f"data.eval_path: file not found: {tmp_path}/nope2.csv",
        "model.name_or_path: folder not found: /no/such/model",
    ]
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "variant").glob("*.yaml")))
def test_every_sweep_variant_composes_to_its_declared_options(name):
    """A variant is a list of group choices: composing it must give exactly those groups' options."""
    cfg = compose_cfg([f"+variant={name}"])
    validate(cfg)
    declared = OmegaConf.load(CONF / "variant" / f"{name}.yaml").defaults
    assert declared
    for entry in declared:
        ((group, option),) = entry.items()
        group = group.removeprefix("override /")
        assert cfg[group] == compose_cfg([f"{group}={option}"])[group], f"variant {name}: {group} is not {option}"


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "sweep").glob("*.yaml") if p.stem != "optuna"))
def test_every_sweep_composes(name):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+sweep={name}"], return_hydra_config=True)
    assert cfg.hydra.mode == RunMode.MULTIRUN and cfg.hydra.sweeper.params


def test_calibration_methods_are_one_registry():
    """The schema's valid values, the calibration figure and the tuned plans read the calibrate registry."""
    import typing

    from pipeline.quantization import calibrate, calibration_plot
    from pipeline.schema import CalibrationConfig, QuantRule

    assert set(typing.get_args(typing.get_type_hints(CalibrationConfig)["method"])) == {*calibrate.METHODS, "none"}
    rule_methods = [a for a in typing.get_args(typing.get_type_hints(QuantRule)["method"]) if a is not type(None)]
    assert set(typing.get_args(rule_methods[0])) == set(calibrate.METHODS)
    assert calibration_plot.METHODS == tuple(calibrate.METHODS)


def test_the_hydra_callbacks_preflight_resolves_engine_auto():
    """The RunDirGuard callback runs preflight on the validated (unresolved) config: engine=auto, the
    default, must be checked as the engine it resolves to, not fail with KeyError (which Hydra turns into
    a warning, skipping the check before the run folder exists)."""
    from pipeline.run import preflight

    cfg = validate(compose_cfg(["model.name_or_path=/no/such/model"]))
    assert cfg.engine.name == "auto"
    with pytest.raises(ConfigError) as e:
        preflight(cfg)
    assert e.value.errors == ["model.name_or_path: folder not found: /no/such/model"]


def test_replaced_selection_keys_are_refused_with_the_new_spelling():
    """quant.include / exclude / exclude_roles and calibration.overrides became quant.rules: on the command line
    (before Hydra, which would only call them unknown) and in a composed config (a user's own YAML)."""
    from pipeline.__main__ import replaced_keys

    errs = replaced_keys(["model=mpnet_base", "quant.exclude=[classifier*]", "+calibration.overrides=[{method: mse}]", "tune=none"])
    assert len(errs) == 2 and errs[0].startswith("quant.exclude: replaced by quant.rules; write '+quant.rules.<label>={name:")
    assert "method: <method>" in errs[1] and not replaced_keys(["quant.rules.heads.enable=true", "calibration=max"])
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(["+quant.include=[x]", "+quant.exclude_roles=[attn_probs]"]))
    assert "quant.include: replaced by quant.rules" in str(err.value) and "quant.exclude_roles: replaced by quant.rules" in str(err.value)
    assert replaced_keys(["export.exporter=legacy"]) == ["export.exporter: removed: the legacy TorchScript exporter is the only one "
                                                          "(it maps fake-quant to Q/DQ); drop the key"]  # fmt: skip


def test_a_run_folder_from_before_quant_rules_still_loads_for_prediction(tmp_path):
    """The predictor reloads a finished run's config.resolved.yaml; a run made with the replaced keys baked them
    into its graphs, so they are dropped there, not refused."""
    from pipeline.deploy.predictor import load_run_config

    raw = compose_cfg(["engine=onnxruntime"])
    old = {k: OmegaConf.to_container(raw[k], resolve=True) if OmegaConf.is_config(raw[k]) else raw[k] for k in raw if k != "hydra"}
    old["quant"].pop("rules")
    old["quant"].update(include=["*"], exclude=["classifier", "classifier.*"], exclude_roles=[])
    old["calibration"]["overrides"] = []
    old["export"]["exporter"] = "legacy"
    (tmp_path / "config.resolved.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(old)))
    cfg = load_run_config(tmp_path)
    assert cfg.engine.name == "onnxruntime" and cfg.quant.rules == {}


def test_each_engine_and_task_has_its_own_schema():
    """engine and task are discriminated unions on `name`: a key another kind reads is refused naming that kind,
    whether it comes from a user's YAML or an appended override; Hydra refuses it on a plain override."""
    from pipeline.schema import ENGINE_CONFIGS, TASK_CONFIGS, OnnxRuntimeEngineConfig, engine_config

    for name, cls in ENGINE_CONFIGS.items():
        assert cls().name == name
    for name, cls in TASK_CONFIGS.items():
        assert cls().name == name
    with pytest.raises(ConfigCompositionException, match="inference_precision"):
        compose_cfg(["engine=onnxruntime", "engine.inference_precision=f32"])
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(["engine=onnxruntime", "+engine.inference_precision=f32", "task=embedding", "+task.doc_stride=16"]))
    assert "engine.inference_precision: not a key of engine=onnxruntime (read by engine=auto, openvino); engine=onnxruntime keys:" in str(
        e.value
    )
    assert "task.doc_stride: not a key of task=embedding (read by task=question_answering)" in str(e.value)
    with pytest.raises(ConfigError, match=r"engine.nam: unknown key"):  # a key no engine reads: the usual message
        validate(compose_cfg(["engine=openvino", "+engine.nam=x"]))
    typed = validate(compose_cfg(["engine=openvino", "engine.inference_precision=f32", "task=token_classification"]))
    assert type(typed.engine).__name__ == "OpenVinoEngineConfig" and not hasattr(typed.engine, "providers")
    assert type(typed.task).__name__ == "TokenClassificationConfig" and not hasattr(typed.task, "pooling")
    # Another engine's config from this one: the shared keys carried, the rest that engine's defaults.
    auto = validate(compose_cfg(["engine=auto", "engine.intra_op_threads=3", "engine.inference_precision=f32"])).engine
    ort = engine_config("onnxruntime", auto)
    assert isinstance(ort, OnnxRuntimeEngineConfig) and ort.intra_op_threads == 3 and ort.max_batch == 64
    assert engine_config("openvino", auto).inference_precision == "f32"
    with pytest.raises(TypeError, match=r"engine=openvino has no key providers"):
        engine_config("openvino", auto, providers=["CPUExecutionProvider"])


def test_a_run_folder_with_keys_its_engine_never_read_still_loads_for_prediction(tmp_path):
    """Runs made when one engine schema held every engine's keys carry them in config.resolved.yaml."""
    from pipeline.deploy.predictor import load_run_config

    raw = compose_cfg(["engine=openvino"])
    old = {k: OmegaConf.to_container(raw[k], resolve=True) if OmegaConf.is_config(raw[k]) else raw[k] for k in raw if k != "hydra"}
    old["engine"].update(providers=["CPUExecutionProvider"], max_batch=64, transformer_fusions=False)
    old["task"].update(pooling="auto", doc_stride=128)
    (tmp_path / "config.resolved.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(old)))
    cfg = load_run_config(tmp_path)
    assert cfg.engine.name == "openvino" and not hasattr(cfg.engine, "providers") and cfg.task.name == "sequence_classification"


def test_asymmetric_activations_only_where_the_engine_takes_a_zero_point():
    from pipeline.schema import symmetric_only

    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(["engine=tensorrt", "quant.activations=asymmetric"]))
    assert "quant.activations: asymmetric is not possible here (TensorRT quantizes symmetrically" in str(e.value)
    assert "valid values: auto, symmetric" in str(e.value)
    with pytest.raises(ConfigError, match="quant.format=fp8: E4M3 has no zero point"):
        validate(compose_cfg(["quant.format=fp8", "calibration=max", "quant.activations=asymmetric"]))
    # what auto resolves to (run.py): symmetric exactly where symmetric_only gives a reason
    assert symmetric_only(validate(compose_cfg(["engine=onnxruntime"]))) is None
    assert symmetric_only(validate(compose_cfg(["engine=openvino"]))) is None
    assert "TensorRT" in symmetric_only(validate(compose_cfg(["engine=onnxruntime", "engine.providers=[TensorrtExecutionProvider]"])))
    assert "learnable" in symmetric_only(validate(compose_cfg(["qat=default", "qat.learn_amax=true"])))


def test_a_negative_cache_cap_is_refused_and_null_means_no_cap():
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(["cache.max_gb=-1"]))
    assert e.value.errors == ["cache.max_gb: -1.0 out of range; must be >= 0.0"]
    assert validate(compose_cfg(["cache.max_gb=null"])).cache.max_gb is None
