"""Scale-out (issue 14): the Optuna sweeper, the submitit and Ray launchers end to end on a tiny
experiment=smoke pipeline, the Optuna objective's constraint logic, and multi-process training under
torchrun (one run folder, rank 0 writes, amax bit-identical across ranks, resume).

The plugins come with the `sweep` extra, which `make install-test` installs: these tests run in CI.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.objective import INFEASIBLE, PERCENTILES, conditional_space, objective_value
from pipeline.schema import ConfigError
from pipeline.testing import TINY, compose_cfg
from pipeline.validation import validate

ROOT = Path(__file__).resolve().parent.parent
# The launcher tests compare launchers, not pipelines: the cheapest whole run (no training stages).
FAST = [*TINY, "finetune=none", "qat=none", "export.tensorrt_graphs=false", "benchmark.peers=[]", "benchmark.real_length_examples=0"]


def _run(args: list[str], cwd: Path, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", **(env or {})}
    env.pop("OMP_NUM_THREADS", None)
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


def _rows(sweep: Path) -> list[dict]:
    return list(csv.DictReader((sweep / "sweep_summary.csv").open()))


# ---------------------------------------------------------------------------------------------
# Optuna: the objective (a constraint, not a weighted sum) and the search space


def test_latency_objective_is_a_constraint_not_a_weighted_sum():
    fast_under_floor = objective_value("latency", 0.84, accuracy=0.839, p50=1.0)
    slow_over_floor = objective_value("latency", 0.84, accuracy=0.85, p50=500.0)
    assert slow_over_floor.feasible and slow_over_floor.value == 500.0
    assert fast_under_floor.feasible is False and fast_under_floor.value == pytest.approx(INFEASIBLE + 0.001)
    # Minimized: every feasible trial beats every infeasible one, however fast the infeasible one is...
    assert slow_over_floor.value < fast_under_floor.value
    # ... and among infeasible trials the one closer to the floor ranks better (guides TPE).
    assert objective_value("latency", 0.84, accuracy=0.80, p50=0.5).value > fast_under_floor.value
    # On the floor is feasible; no floor means plain latency; nothing measured means a failed trial.
    assert objective_value("latency", 0.84, accuracy=0.84, p50=3.0).value == 3.0
    assert objective_value("latency", None, accuracy=0.1, p50=3.0).value == 3.0
    assert objective_value("latency", 0.84, accuracy=0.9, p50=None).value is None
    assert objective_value("accuracy", None, accuracy=0.85, p50=3.0).value == 0.85
    assert objective_value("accuracy", None, accuracy=None, p50=3.0).value is None


def test_optuna_sweeps_compose_seeded_tpe_and_validate():
    for name, direction, metric in [("optuna", "maximize", "accuracy"), ("optuna_latency", "minimize", "latency")]:
        cfg = compose_cfg([f"+sweep={name}", "seed=7"], return_hydra_config=True)
        sw = cfg.hydra.sweeper
        assert sw._target_.endswith("OptunaSweeper") and sw.direction == direction
        assert sw.sampler._target_ == "optuna.samplers.TPESampler" and sw.sampler.seed == 7
        assert sw.custom_search_space == "pipeline.objective.conditional_space"
        assert validate(cfg).objective.metric == metric
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(["+sweep=optuna_latency", "benchmark=none"]))
    assert "objective.metric=latency: needs the benchmark; benchmark=none cannot be combined with it" in str(err.value)


def test_conditional_search_space_suggests_only_what_the_run_uses():
    optuna = pytest.importorskip("optuna")
    seen = []
    for calibration, qat in [("percentile", "none"), ("mse", "default")]:
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
        trial.suggest_categorical("calibration", [calibration])
        trial.suggest_categorical("qat", [qat])
        conditional_space(None, trial)
        seen.append(trial.params)
    assert set(seen[0]) == {"calibration", "qat", "++calibration.percentile"} and seen[0]["++calibration.percentile"] in PERCENTILES
    assert set(seen[1]) == {"calibration", "qat", "qat.lr", "qat.epochs"} and 5e-6 <= seen[1]["qat.lr"] <= 5e-5


@pytest.mark.slow
def test_optuna_latency_search_runs_every_trial_and_reports_failed_ones(tmp_path):
    """A seeded TPE search through the real plugin: every trial is a row (a trial whose config is
    invalid is a failed row, not a crash), each done trial's objective is the constrained latency, and
    Optuna's best value is the best of those."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    r = _run(
        [
            sys.executable, "-m", "pipeline", "-m", "+sweep=optuna_latency", *FAST, f"cache.dir={tmp_path}/cache",
            "objective.min_accuracy=0.9",  # random weights reach ~0.5: every trial is under the floor
            "hydra.sweeper.n_trials=4", "hydra.sweeper.custom_search_space=null",
            # command-line sweep overrides join (and override) hydra.sweeper.params
            "quant=linear", "qat=none", "calibration=choice(percentile,mse)",
            "calibration.num_bins=choice(2048,8)",  # 8 < 16: refused by validation
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Sampler: TPESampler" in r.stdout + r.stderr
    rows = _rows(sweep)
    assert len(rows) == 4
    failed = [row for row in rows if row["status"] == "failed"]
    done = [row for row in rows if row["status"] == "done"]
    assert failed and done, [row["overrides"] for row in rows]  # seed 42 samples both num_bins values
    assert all("calibration.num_bins=8" in row["overrides"] for row in failed)
    assert all("calibration.num_bins: 8 out of range" in row["error"] for row in failed)
    values = []
    for row in done:
        obj = json.loads((sweep / row["job"] / "objective.json").read_text())
        acc = float(row["acc_quantized"])
        assert obj["feasible"] is False and obj["value"] == pytest.approx(INFEASIBLE + 0.9 - acc)
        assert row["feasible"] == "False" and float(row["objective"]) == obj["value"]  # the report's columns
        values.append(obj["value"])
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(values))
    report = (sweep / "sweep_report.md").read_text()
    assert (sweep / "pareto.png").stat().st_size > 1000 and "## Failed jobs" in report and "Under the accuracy floor" in report


# ---------------------------------------------------------------------------------------------
# Launchers: submitit (local executor) and Ray (a local instance the launcher starts)


def test_cluster_launcher_configs_compose_with_the_keys_users_edit():
    """conf/hydra/launcher/slurm.yaml and ray_cluster.yaml cannot run here (no SLURM, no cluster): they
    must still compose to the plugins' launchers with the documented keys."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    # A fixed sweep dir: the default one carries ${now:...}, which two compositions may resolve a second apart.
    fixed = "hydra.sweep.dir=outputs/sweep_x"
    slurm = compose_cfg(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", fixed], return_hydra_config=True).hydra.launcher
    local = compose_cfg(["hydra/launcher=submitit_local", fixed], return_hydra_config=True).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and local._target_.endswith("LocalLauncher")
    assert (slurm.partition, slurm.gpus_per_node, slurm.timeout_min, slurm.array_parallelism) == ("gpu", 1, 120, 16)
    assert slurm.submitit_folder == local.submitit_folder == "outputs/sweep_x/.submitit/%j"  # same launcher, executor swapped
    cluster = compose_cfg(["hydra/launcher=ray_cluster", "hydra.launcher.ray.init.address=10.0.0.5:6379"], return_hydra_config=True)
    ray = cluster.hydra.launcher.ray
    assert ray.init.address == "10.0.0.5:6379" and (ray.remote.num_cpus, ray.remote.num_gpus) == (8, 1)
    local_ray = compose_cfg(["hydra/launcher=ray_local"], return_hydra_config=True).hydra.launcher.ray
    assert local_ray.init.address is None and local_ray.remote.num_cpus == 1


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_sweep_in_its_own_processes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    r = _run(
        [sys.executable, "-m", "pipeline", "-m", *FAST, "calibration=max,mse", f"cache.dir={tmp_path}/cache",
         "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=15", f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(sweep)
    assert sorted(row["status"] for row in rows) == ["done", "done"] and all(row["acc_quantized"] for row in rows)
    for row in rows:  # each job ran in a process submitit started (its entry script), not in the sweep's
        assert json.loads((sweep / row["job"] / "manifest.json").read_text())["command"].startswith("_submit.py")


@pytest.mark.slow
def test_ray_launcher_runs_a_sweep_on_a_local_ray_with_per_job_resources(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    sweep = tmp_path / "sweep"
    r = _run(
        [sys.executable, "-m", "pipeline", "-m", *FAST, "calibration=max,mse", f"cache.dir={tmp_path}/cache",
         "hydra/launcher=ray_local", "hydra.launcher.ray.init.num_cpus=2", "hydra.launcher.ray.remote.num_cpus=1",
         f"hydra.sweep.dir={sweep}"],
        tmp_path,
        env={"RAY_USAGE_STATS_ENABLED": "0"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(sweep)
    assert sorted(row["status"] for row in rows) == ["done", "done"] and all(row["acc_quantized"] for row in rows)
    for row in rows:
        man = json.loads((sweep / row["job"] / "manifest.json").read_text())
        assert man["command"].startswith("default_worker.py")  # a Ray worker process ran the job
        # Ray gives a task OMP_NUM_THREADS = its num_cpus reservation: the per-job resources took effect.
        assert man["host"]["torch_threads"] == 1


# ---------------------------------------------------------------------------------------------
# torchrun: DistributedDataParallel training, one run folder, rank 0 writes, reduced calibration

# Two calibration batches: rank 0 calibrates on one, rank 1 on the other, so only a cross-rank
# reduction can make their amax agree. Percentile = histograms (the two-pass path).
DDP = [*TINY, "calibration=percentile", "export.tensorrt_graphs=false", "benchmark.peers=[]", "benchmark.real_length_examples=0"]


def _torchrun(tmp_path: Path, probe: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return _run(
        [*torchrun, str(ROOT / "tests" / "scaleout_worker.py"), str(probe), *overrides],
        tmp_path,
        env={"TMPDIR": str(scratch), "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    probe = tmp / "probe"
    r = _torchrun(tmp, probe, [*DDP, f"cache.dir={tmp}/cache"])
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return tmp, probe


@pytest.mark.slow
def test_torchrun_ranks_agree_on_one_run_folder_and_only_rank0_writes(ddp_run):
    tmp, probe = ddp_run
    folders = [p for p in (tmp / "outputs").glob("*/*") if p.is_dir()]
    assert len(folders) == 1, folders  # the default timestamped folder: one for both ranks
    run = folders[0].resolve()
    r0, r1 = (json.loads((probe / f"rank{i}.json").read_text()) for i in (0, 1))
    assert Path(r0["run_dir"]).resolve() == run
    man = json.loads((run / "manifest.json").read_text())
    assert man["status"] == "done" and (run / "metrics.json").exists() and (run / "model_int8.onnx").exists()
    assert (run / "checkpoints" / "qat").is_dir() and (run / ".hydra").is_dir()
    # Rank 1 wrote nothing under the output tree nor the cache (Hydra's mkdir of the shared run folder
    # and its parents aside: they exist already or are the same folder); its scratch folder is gone.
    outputs, cache = (tmp / "outputs").resolve(), (tmp / "cache").resolve()
    under = lambda path, root: Path(path).resolve().is_relative_to(root)  # noqa: E731
    stray = [
        (e, w) for e, w in r1["writes"] if (under(w, outputs) or under(w, cache)) and not (e == "os.mkdir" and run.is_relative_to(Path(w)))
    ]
    assert not stray, stray[:10]
    # The probe does see writes: rank 0's into the run folder, rank 1's into its scratch folder.
    assert any(under(w, run) for _, w in r0["writes"]) and any(under(w, r1["run_dir"]) for _, w in r1["writes"])
    assert Path(r1["run_dir"]).resolve().is_relative_to((tmp / "tmp").resolve()) and not list((tmp / "tmp").glob("qdq-rank*"))
    # Same steps as one process (every rank takes its slice of each global batch).
    single_steps = -(-compose_cfg(DDP).data.num_train // compose_cfg(DDP).finetune.batch_size)
    assert r0["training"]["finetune"]["steps"] == r1["training"]["finetune"]["steps"] == single_steps


@pytest.mark.slow
def test_torchrun_amax_and_weights_are_bit_identical_across_ranks(ddp_run):
    _, probe = ddp_run
    s0, s1 = load_file(str(probe / "rank0.safetensors")), load_file(str(probe / "rank1.safetensors"))
    amax = [k for k in s0 if k.startswith("amax/")]
    assert len(amax) > 20 and set(s0) == set(s1)
    differ = [k for k in s0 if not torch.equal(s0[k], s1[k])]
    assert not differ, differ[:10]


@pytest.mark.slow
def test_torchrun_resume_continues_from_rank0_checkpoint(ddp_run, tmp_path):
    tmp, _ = ddp_run
    first = next(p for p in (tmp / "outputs").glob("*/*") if p.is_dir())
    probe = tmp_path / "probe"
    r = _torchrun(tmp_path, probe, [*DDP, f"cache.dir={tmp_path}/cache", f"resume={first}", f"hydra.run.dir={tmp_path}/resumed"])
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    m_first, m_resumed = (json.loads((p / "metrics.json").read_text()) for p in (first, tmp_path / "resumed"))
    for stage in ("finetune", "qat"):
        assert m_resumed["training"][stage]["resumed_from_step"] == m_first["training"][stage]["steps"] > 0
    assert m_resumed["accuracy"] == m_first["accuracy"]
    s0, s1 = load_file(str(probe / "rank0.safetensors")), load_file(str(probe / "rank1.safetensors"))
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
