"""What makes a finished run "the same run" for sapo-train and sapo-sweep: the config hash, and for
micro models the shape that the model file does not spell out."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from sapo_bench import models
from sapo_bench.runtime import RunConflict, architecture, config_hash, finished_result

CONF = Path(__file__).resolve().parents[2] / "conf"


def composed(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[f"out_root={tmp_path}/runs", *overrides])


def write_result(run_dir: Path, **run) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text(json.dumps({"run": {"model": "qwen2-micro-1m", **run}}))


def test_a_new_micro_shape_with_the_same_parameter_count_is_another_run(tmp_path, monkeypatch):
    cfg = composed(tmp_path, "model=qwen2-micro-1m")
    before, h = architecture(cfg), config_hash(cfg)
    write_result(tmp_path / "run", config_hash=h, architecture=before)
    assert finished_result(tmp_path / "run", h, before) is not None
    # Two key/value heads regrouped as four: the model file (name, parameter count) is unchanged.
    family, shape = models.MICRO_MODELS["qwen2-micro-1m"]
    monkeypatch.setitem(models.MICRO_MODELS, "qwen2-micro-1m", (family, {**shape, "num_key_value_heads": 4}))
    after = architecture(cfg)
    assert config_hash(cfg) == h and after != before
    with pytest.raises(RunConflict, match="another shape of qwen2-micro-1m"):
        finished_result(tmp_path / "run", h, after)


def test_runs_that_predate_the_shape_record_are_kept(tmp_path):
    cfg = composed(tmp_path, "model=qwen2-micro-1m")
    write_result(tmp_path / "run", config_hash=config_hash(cfg))  # no "architecture": made before it was recorded
    assert finished_result(tmp_path / "run", config_hash(cfg), architecture(cfg)) is not None
    with pytest.raises(RunConflict, match="another configuration"):
        finished_result(tmp_path / "run", "0" * 16, architecture(cfg))


def test_only_micro_models_have_a_shape_digest(tmp_path):
    assert architecture(composed(tmp_path, "model=qwen2.5-3b-instruct")) is None
    assert architecture(composed(tmp_path, "model=llama-micro-1m")) != architecture(composed(tmp_path,
                                                                                            "model=qwen2-micro-1m"))
