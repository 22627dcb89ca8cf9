"""Hydra callbacks."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

# Files whose presence marks a folder as holding a run.
RUN_MARKERS = ("manifest.json", "metrics.json", "config.resolved.yaml")
# ... and a sweep folder as holding a sweep (Hydra's multirun.yaml, our sweep report).
SWEEP_MARKERS = ("multirun.yaml", "sweep_summary.csv", "sweep_report.md")


def _holds_run(folder: Path) -> bool:
    return folder.is_dir() and (any((folder / m).exists() for m in RUN_MARKERS) or (folder / ".hydra").exists())


class RunDirGuard(Callback):
    """Refuse to start a run in a folder that already holds one, or a sweep in a folder that already
    holds a sweep.

    Hydra writes `.hydra/` into the run folder (and multirun.yaml + <job>/.hydra/ into the sweep
    folder) before the task starts, so the check must happen here, before Hydra touches the folder.
    A reused sweep folder would get its jobs' .hydra/ overwritten and the sweep report would pair new
    overrides with old metrics. Two runs started in the same second with the default timestamped
    folder also land here instead of mixing their files.

    Hydra turns an Exception raised by a callback into a warning and carries on, so the refusal is a
    SystemExit (not an Exception): the process stops with the message and exit status 1.
    """

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        from pipeline.distributed import is_main_process

        run_dir = Path(str(config.hydra.run.dir))
        # Under torchrun every rank names rank 0's run folder (pipeline/__main__.py); rank 0 checks it.
        if is_main_process() and _holds_run(run_dir):
            raise SystemExit(
                f"error: hydra.run.dir={run_dir} already holds a run; refusing to overwrite it. Choose another "
                "folder (or leave hydra.run.dir unset for a new timestamped one)."
            )
        # Bad input (config, data files, packages, GPU) is refused here, before Hydra creates the run
        # folder: nothing is written for a run that cannot start. run_pipeline checks again (it is
        # also called without Hydra, e.g. by tests and scripts); the checks are cheap.
        from pipeline.run import preflight
        from pipeline.schema import ConfigError
        from pipeline.validation import validate

        try:
            preflight(validate(config))
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        if any((sweep_dir / m).exists() for m in SWEEP_MARKERS) or any(_holds_run(job) for job in sweep_dir.iterdir()):
            raise SystemExit(
                f"error: hydra.sweep.dir={sweep_dir} already holds a sweep; refusing to overwrite it. Choose another "
                "folder (or leave hydra.sweep.dir unset for a new timestamped one)."
            )


class SweepReport(Callback):
    """At the end of a multirun, aggregate every job into sweep_summary.csv / sweep_report.md / pareto.png."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from pipeline.sweep_report import write_report

        sweep_dir = Path(str(config.hydra.sweep.dir))
        if sweep_dir.is_dir():
            rows = write_report(sweep_dir)
            print(f"sweep report: {len(rows)} jobs -> {sweep_dir / 'sweep_report.md'}", flush=True)
