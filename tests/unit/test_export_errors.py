"""sapo-export's errors: each names the checkpoint and says what a checkpoint is. (Exporting a
trained run, loading it with plain transformers and scoring it: tests/integration/test_export.py.)"""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from sapo_bench.evaluate import run_eval
from sapo_bench.export import export, main

CONF = Path(__file__).resolve().parents[2] / "conf"


def test_a_wrong_path_says_where_a_checkpoint_is(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.prev.ckpt").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"sapo-export: checkpoint .*checkpoints/last\.ckpt not found \(a run's "
                                         r"checkpoint is <run_dir>/checkpoints/last\.ckpt, e\.g\. runs/.*\); that "
                                         r"run's checkpoints folder holds last\.prev\.ckpt"):
        main([str(tmp_path / "checkpoints" / "last.ckpt")])
    with pytest.raises(SystemExit, match=r"checkpoint .*nowhere\.ckpt not found \(a run's checkpoint is"):
        main([str(tmp_path / "nowhere.ckpt")])


def test_a_folder_is_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="is a folder, not a sapo-train checkpoint file"):
        export(tmp_path)


def test_a_damaged_checkpoint_says_what_is_wrong(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"PK\x03\x04 half a zip")
    with pytest.raises(ValueError, match="checkpoint .*last.ckpt cannot be read: it is truncated or corrupt"):
        export(tmp_path / "last.ckpt")


def test_a_checkpoint_outside_its_run_folder_needs_the_runs_config(tmp_path):
    import torch

    torch.save({"state_dict": {}}, tmp_path / "last.ckpt")
    with pytest.raises(FileNotFoundError, match=r"config\.yaml not found: sapo-export reads the model of the run"):
        export(tmp_path / "last.ckpt")


def test_sapo_eval_names_a_wrong_checkpoint_too(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"checkpoint={tmp_path}/last.ckpt", f"data.root={tmp_path}/world"])
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*last\.ckpt not found"):
        run_eval(cfg)
