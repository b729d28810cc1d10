"""Where a run's metrics go: its own metrics.jsonl always, and the loggers that `logger=` adds beside it.

metrics.jsonl is the run's record, like config.yaml and result.json: sapo-report reads it and a
resumed run cuts it back to the restored step, so every run writes it whatever `logger` says. The
`logger` config group (conf/logger/) names the others, each under its own key so that several go
together (`logger=[tensorboard,wandb]`): Lightning's TensorBoardLogger, WandbLogger (offline unless
told otherwise) and MLFlowLogger (a file store in the run folder), and CSVLogger. They get the
same metric names at the same steps (the global optimiser step) and the resolved config as their
hyperparameters. A resumed run's replayed steps reach them again: only metrics.jsonl is cut back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path

import hydra
from hydra.errors import InstantiationException
from lightning.pytorch.loggers import Logger, MLFlowLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from sapo_bench.io import append_line, atomic_write_text
from sapo_bench.settings import SettingError

log = logging.getLogger("sapo_bench")

EXTRAS = ("tensorboard", "wandb", "mlflow")  # logger options whose package is a pyproject extra of that name


class JsonlLogger(Logger):
    """metrics.jsonl: one JSON object per logging call, appended as it happens, whole or not at all."""

    def __init__(self, run_dir: str):
        super().__init__()
        self.path = Path(run_dir) / "metrics.jsonl"

    @property
    def name(self):
        return "jsonl"

    @property
    def version(self):
        return 0

    @property
    def save_dir(self):
        return str(self.path.parent)

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs):
        pass  # train() writes the resolved config.yaml itself

    @rank_zero_only
    def log_metrics(self, metrics, step=None):
        append_line(self.path, json.dumps({"optimizer_step": step, **{k: float(v) for k, v in metrics.items()}}))

    @rank_zero_only
    def truncate(self, last_step: int) -> None:
        """Forget lines past `last_step` (a resumed run replays those steps)."""
        if self.path.exists():
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            keep = []
            for i, line in enumerate(lines):
                try:
                    step = json.loads(line).get("train/step", 0)
                except json.JSONDecodeError:
                    if i < len(lines) - 1:
                        raise
                    # append_line never leaves half a line; a machine crash mid-write still can.
                    log.warning("%s: dropping its incomplete last line", self.path)
                    continue
                if step <= last_step:
                    keep.append(line)
            atomic_write_text(self.path, "".join(line + "\n" for line in keep))


def wandb_logger(save_dir: str, mode: str = "offline", project: str | None = None, **kwargs):
    """Lightning's WandbLogger, writing under `save_dir`/wandb/; online only when asked, with a project."""
    if mode not in ("offline", "online", "disabled"):
        raise SettingError(f"logger.wandb.mode must be offline, online or disabled, got {mode!r}")
    if mode == "online" and not project:
        raise SettingError("logger.wandb.mode=online needs logger.wandb.project=<your W&B project>")
    # mode goes to wandb.init, not WandbLogger's offline=True, which sets WANDB_MODE for the whole process
    return WandbLogger(save_dir=save_dir, project=project or "sapo-bench", mode=mode, **kwargs)


AVERAGE = re.compile(r"^((?:val|test)/em)$")  # the names that are also their per-dataset names' folder


class FileStoreMLFlowLogger(MLFlowLogger):
    """MLFlowLogger on MLflow's file store, which keeps each metric in a file whose path is its name:
    the dataset average `val/em` cannot be a file where `val/em/nq` needs a folder, so there (only
    there) the averages are `val/em/avg` and `test/em/avg`."""

    @rank_zero_only
    def log_metrics(self, metrics, step=None):
        super().log_metrics({AVERAGE.sub(r"\1/avg", k): v for k, v in metrics.items()}, step)


def mlflow_logger(save_dir: str, tracking_uri: str | None = None, **kwargs) -> MLFlowLogger:
    """Lightning's MLFlowLogger: a file store at `save_dir` unless `tracking_uri` names another store."""
    if tracking_uri is not None:
        return MLFlowLogger(tracking_uri=tracking_uri, **kwargs)
    # MLflow 3 keeps the file store in maintenance mode and refuses it unless this is set; it is
    # the store that needs no server and no database package (mlflow-skinny has neither).
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return FileStoreMLFlowLogger(tracking_uri=Path(save_dir).resolve().as_uri(), **kwargs)


@contextlib.contextmanager
def open_loggers(cfg: DictConfig):
    """The run's loggers for the block: metrics.jsonl's first, then those of `cfg.logger`, each
    started and given the resolved config at once, so that a missing package or a bad setting
    fails before the warm start; ended after the block (`_close`)."""
    loggers: list[Logger] = [JsonlLogger(cfg.run_dir)]
    for name, spec in (cfg.get("logger") or {}).items():
        loggers.append(_instantiate(name, spec))
    ok = False
    try:
        params = OmegaConf.to_container(cfg, resolve=True)
        for logger in loggers:
            logger.log_hyperparams(params)
        yield loggers
        ok = True
    finally:
        _close(loggers, ok)


def _instantiate(name: str, spec: DictConfig) -> Logger:
    try:
        return hydra.utils.instantiate(spec)
    except InstantiationException as e:  # Hydra's wrapper; what went wrong is its cause
        if isinstance(e.__cause__, ModuleNotFoundError):
            hint = f"; install it with pip install -e '.[{name}]'" if name in EXTRAS else ""
            raise ModuleNotFoundError(f"logger={name} needs a package that is not installed "
                                      f"({e.__cause__}){hint}") from e.__cause__
        if isinstance(e.__cause__, SettingError):
            raise e.__cause__ from None
        raise


def truncate(loggers: list[Logger], last_step: int) -> None:
    """Cut back every logger that can forget steps (metrics.jsonl's) to `last_step`, for a resume."""
    for logger in loggers:
        forget = getattr(logger, "truncate", None)
        if forget is not None:
            forget(last_step)


def _close(loggers: list[Logger], ok: bool) -> None:
    # A W&B run stays open in its process until finished, and the next run started in that process
    # (a test, a retry) would log into it; Lightning's finalize does not finish it.
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish(exit_code=0 if ok else 1)
