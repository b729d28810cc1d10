"""An algorithm = a registered loss + an advantage estimator (+ a value head for PPO).

`conf/algo/<name>.yaml` holds one; `Algo.from_config` checks every name and parameter against
the registries, so a typo fails at start-up with the valid choices, not mid-run.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from sapo_bench.advantages import get_advantage
from sapo_bench.losses import check_loss_params, value_loss
from sapo_bench.settings import check_number


def _tunable(fn) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values() if p.default is not p.empty]


def _check(what: str, params: Mapping, valid: list[str]) -> None:
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"unknown {what} parameter(s) {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")


@dataclass(frozen=True)
class Algo:
    name: str                  # the row label in tables
    loss: str                  # a name in sapo_bench.losses.LOSSES
    advantage: str             # a name in sapo_bench.advantages.ADVANTAGES
    loss_params: dict = field(default_factory=dict)
    advantage_params: dict = field(default_factory=dict)
    value_head: bool = False   # train a value head with the clipped value loss (PPO)
    value_params: dict = field(default_factory=dict)
    # The row's own entropy coefficient in place of train.entropy_coef (None: that one), for a control
    # row that differs from its baseline in the entropy bonus alone (grpo_noent).
    entropy_coef: float | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Algo":
        cfg = dict(cfg)
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(cfg) - set(valid))
        if unknown:
            raise ValueError(f"unknown algo field(s) {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
        missing = [k for k in ("name", "loss", "advantage") if k not in cfg]
        if missing:
            raise ValueError(f"algo config lacks {', '.join(missing)}")
        algo = cls(**{k: (dict(v) if isinstance(v, Mapping) else v) for k, v in cfg.items()})
        check_loss_params(algo.loss, algo.loss_params)
        estimator = get_advantage(algo.advantage)
        _check(f"advantage {algo.advantage!r}", algo.advantage_params, _tunable(estimator))
        if (algo.advantage == "gae") != algo.value_head:
            raise ValueError(f"algo {algo.name!r}: the gae advantage needs value_head: true, and only gae uses one")
        _check("value", algo.value_params, [p for p in _tunable(value_loss) if p not in ("agg", "scope")])
        if algo.entropy_coef is not None:
            check_number("algo.entropy_coef", algo.entropy_coef)
        return algo
