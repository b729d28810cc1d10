from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sapo_bench.algos import Algo
from sapo_bench.losses import LOSSES

ALGO_DIR = Path(__file__).resolve().parents[2] / "conf" / "algo"
ALGO_FILES = sorted(ALGO_DIR.glob("*.yaml"))


def load(path):
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


@pytest.mark.parametrize("path", ALGO_FILES, ids=lambda p: p.stem)
def test_every_algo_config_is_valid_and_named_after_its_file(path):
    algo = Algo.from_config(load(path))
    assert algo.name == path.stem


def test_every_registered_loss_has_an_algo_config():
    used = {Algo.from_config(load(p)).loss for p in ALGO_FILES}
    assert set(LOSSES) <= used


def test_the_headline_pair_differs_only_in_the_loss():
    grpo, sapo = (Algo.from_config(load(ALGO_DIR / f"{n}.yaml")) for n in ("grpo", "sapo"))
    assert grpo.advantage == sapo.advantage and grpo.value_head == sapo.value_head
    assert grpo.loss_params["clip_eps"] == sapo.loss_params["clip_eps"]
    assert grpo.loss_params["agg"] == sapo.loss_params["agg"]


@pytest.mark.parametrize("change,message", [
    ({"loss": "sapoo"}, r"unknown loss 'sapoo'; valid: "),
    ({"loss_params": {"gama": 0.1}}, r"unknown parameter\(s\) 'gama' for loss 'sapo'"),
    ({"advantage": "grpo2"}, r"unknown advantage estimator 'grpo2'; valid: grpo, dr_grpo, rloo, gae"),
    ({"advantage_params": {"epsilon": 1}}, r"unknown advantage 'grpo' parameter\(s\) 'epsilon'; valid: eps"),
    ({"advantage": "gae"}, r"gae advantage needs value_head: true"),
    ({"colour": "red"}, r"unknown algo field\(s\) 'colour'; valid: name, loss, advantage"),
    ({"entropy_coef": "none"}, r"algo.entropy_coef must be a finite number, got 'none'"),
    ({"loss_params": {"gamma": 0.1, "strict": 1}}, r"algo.loss_params.strict must be true or false, got 1"),
])
def test_bad_algo_config_is_a_clear_error(change, message):
    cfg = {**load(ALGO_DIR / "sapo.yaml"), **change}
    with pytest.raises(ValueError, match=message):
        Algo.from_config(cfg)
