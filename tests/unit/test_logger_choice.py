"""The logger group: metrics.jsonl always, the chosen loggers beside it, clear errors, and no effect on
a run's identity. (tests/integration/test_loggers.py trains with each one.)"""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from lightning.pytorch.loggers import CSVLogger

from sapo_bench.loggers import JsonlLogger, open_loggers
from sapo_bench.runtime import config_hash
from sapo_bench.settings import SettingError

CONF = Path(__file__).resolve().parents[2] / "conf"


def composed(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[f"out_root={tmp_path}/runs", *overrides])


@pytest.mark.parametrize("choice", ["logger=jsonl", "logger=[]"])
def test_metrics_jsonl_alone(tmp_path, choice):
    with open_loggers(composed(tmp_path, choice)) as loggers:
        assert [type(lg) for lg in loggers] == [JsonlLogger]


def test_a_chosen_logger_goes_beside_metrics_jsonl(tmp_path):
    cfg = composed(tmp_path, "logger=csv")
    with open_loggers(cfg) as loggers:
        assert [type(lg) for lg in loggers] == [JsonlLogger, CSVLogger]
        assert loggers[0].path == Path(cfg.run_dir) / "metrics.jsonl"
        assert Path(loggers[1].log_dir).parent == Path(cfg.run_dir) / "csv"


def test_an_unknown_logger_lists_the_valid_ones(tmp_path):
    with pytest.raises(MissingConfigException) as e:
        composed(tmp_path, "logger=tensorbord")
    for name in ("csv", "jsonl", "mlflow", "tensorboard", "wandb"):
        assert f"\t{name}\n" in str(e.value) + "\n"


def test_a_missing_package_says_which_extra_brings_it(tmp_path, monkeypatch):
    from lightning.fabric.loggers import tensorboard

    monkeypatch.setattr(tensorboard, "_TENSORBOARD_AVAILABLE", False)
    monkeypatch.setattr(tensorboard, "_TENSORBOARDX_AVAILABLE", False)
    with pytest.raises(ModuleNotFoundError, match=r"(?s)logger=tensorboard needs a package that is not installed "
                                                  r"\(Neither `tensorboard` nor `tensorboardX`.*pip install -e '.\[tensorboard\]'"):
        with open_loggers(composed(tmp_path, "logger=tensorboard")):
            pass


@pytest.mark.parametrize("overrides,says", [
    (["logger.wandb.mode=online"], "logger.wandb.mode=online needs logger.wandb.project=<your W&B project>"),
    (["logger.wandb.mode=dryrun"], "logger.wandb.mode must be offline, online or disabled, got 'dryrun'"),
])
def test_wandb_goes_online_only_when_told_where(tmp_path, overrides, says):
    with pytest.raises(SettingError, match=says):
        with open_loggers(composed(tmp_path, "logger=wandb", *overrides)):
            pass


def test_where_metrics_go_is_not_part_of_a_runs_identity(tmp_path):
    """A finished run is still found (and skipped) when started again with another logger."""
    plain = config_hash(composed(tmp_path, "experiment=micro_smoke"))
    assert config_hash(composed(tmp_path, "experiment=micro_smoke", "logger=[tensorboard,wandb,mlflow]")) == plain
    assert config_hash(composed(tmp_path, "experiment=micro_smoke", "logger=csv")) == plain
    assert config_hash(composed(tmp_path, "experiment=micro_smoke", "seed=1")) != plain
