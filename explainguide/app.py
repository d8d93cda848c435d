"""The Hydra entry point: compose config -> RunContext -> task.run(cfg, ctx); print the output dir last."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from explainguide.runtime import RunContext, resolve_user_paths, seed_everything, validate
from explainguide.tracking import record_failure, runs_not_ok

log = logging.getLogger("explainguide")

# Run and sweep dirs are named to the second plus the process id (conf/hydra/default.yaml), so that runs started
# in the same second never share a folder.
if not OmegaConf.has_resolver("pid"):
    OmegaConf.register_new_resolver("pid", os.getpid, use_cache=True)


class NotOnConsole(logging.Filter):
    """Keeps two kinds of records off the console (conf/hydra/default.yaml), in the job log file only: those
    logged with extra={"console": False} (the failure line is printed once as `error: ...` on stderr), and
    libraries' INFO chatter on the root logger (open_clip's "Loading ..." lines on every model load)."""

    def filter(self, record: logging.LogRecord) -> bool:
        chatter = record.name == "root" and record.levelno < logging.WARNING
        return getattr(record, "console", True) and not chatter


def context_from_hydra(cfg: DictConfig) -> RunContext:
    """The only place that reads HydraConfig."""
    hydra_cfg = HydraConfig.get()
    overrides = [o for o in hydra_cfg.overrides.task]
    experiment = hydra_cfg.runtime.choices.get("experiment")
    sweep = Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode.name == "MULTIRUN" else None
    return RunContext(
        output_dir=Path(hydra_cfg.runtime.output_dir),
        launch_dir=Path(hydra_cfg.runtime.cwd),
        name=",".join(overrides) or cfg.task.name,
        group=experiment or sweep or cfg.task.name,
        tags=list(cfg.tags),
    )


def run_task(cfg: DictConfig, ctx: RunContext) -> dict:
    """Validate, resolve paths, seed, and call the task's runner. Usable from tests with the compose API."""
    logging.getLogger("explainguide").setLevel(cfg.log_level)
    resolve_user_paths(cfg, ctx.launch_dir)
    validate(cfg)
    if cfg.log_level == "DEBUG":
        log.debug("resolved config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    seed_everything(cfg.seed)
    runner = instantiate(cfg.task.runner)
    return runner(cfg, ctx)


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, `kill`, a scheduler's preemption) ends a run as Ctrl-C does: one line, a failed record."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated("terminated (SIGTERM)")


class SweepOutcome(Callback):
    """Ends a multirun with exit code 1 when any of its jobs failed, naming them. Failed jobs return normally, so
    Hydra prints no traceback; their metrics.json says so, wherever the launcher ran them (joblib, SLURM)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        failed = runs_not_ok(Path(config.hydra.sweep.dir), since=self.started)
        if failed:
            print(f"error: {len(failed)} job(s) of the sweep did not finish: {', '.join(map(str, failed))} "
                  "(each one's error is in its metrics.json and app.log)", file=sys.stderr)
            raise SystemExit(1)


def resume_hint(cfg: DictConfig, ctx: RunContext) -> str:
    """How to continue an interrupted run, for tasks that checkpoint (`task.resume`)."""
    if not cfg.task.get("resume"):
        return ""
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        where = f"hydra.sweep.dir={HydraConfig.get().sweep.dir}"
    else:
        where = f"hydra.run.dir={ctx.output_dir}"
    return f"; to continue from its last checkpoint, run the same command with {where}"


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"{category.__name__}: {message}"


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    # Python warnings (a truncated prompt, a downscaled image, libraries') become one log line: on the console
    # and in the job's app.log, without the source line `warnings` prints by default.
    warnings.formatwarning = _one_line_warning
    logging.captureWarnings(True)
    ctx = context_from_hydra(cfg)
    # Only where nobody else handles SIGTERM: submitit installs its own, for requeueing preempted jobs.
    own_sigterm = (threading.current_thread() is threading.main_thread()
                   and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    if own_sigterm:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        run_task(cfg, ctx)
    except KeyboardInterrupt as err:
        what, code = ("terminated (SIGTERM)", 143) if isinstance(err, Terminated) else ("interrupted", 130)
        log.error(what, exc_info=True, extra={"console": False})
        record_failure(ctx.output_dir, KeyboardInterrupt(what))
        print(f"error: {what}; {ctx.output_dir} keeps what finished{resume_hint(cfg, ctx)}", file=sys.stderr)
        raise SystemExit(code) from None
    except Exception as err:
        # Instantiation wraps the real error; show the cause. One clear line for the user; the traceback goes to
        # the job log file in the output dir.
        cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ else err
        log.error("%s: %s", type(cause).__name__, cause, exc_info=True, extra={"console": False})
        record_failure(ctx.output_dir, cause)
        print(f"error: {cause}", file=sys.stderr)
        print(ctx.output_dir)
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            raise SystemExit(1) from None
        return  # a sweep goes on with its other jobs; SweepOutcome exits 1 at its end
    finally:
        if own_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    print(ctx.output_dir)
