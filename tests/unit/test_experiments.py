"""The experiment files: each one a table's grid, stated as the issue and the papers ask."""

import csv
from pathlib import Path

import pytest
from hydra.utils import get_class

from sapo_bench.sweep import EXPERIMENTS, compose_config, expand, grid, interleave, next_run, warm_start_key

CONF = Path(__file__).resolve().parents[2] / "conf"


def cells(experiment):
    return [r.cfg for r in expand([experiment])]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_states_its_command_and_expands(experiment):
    text = (CONF / "experiment" / f"{experiment}.yaml").read_text()
    assert f"experiment={experiment}" in text or f"sapo-sweep {experiment}" in text
    runs = expand([experiment])
    assert runs and len({r.run_dir for r in runs}) == len(runs)
    # rows differ only in what they name: model, algo and seed
    base = compose_config([f"experiment={experiment}"])
    for r in runs:
        for key in ("train", "rollout", "data", "retriever", "warmstart"):
            assert r.cfg[key] == base[key], (experiment, key)


def test_micro_main_is_two_families_two_sizes_three_seeds():
    got = cells("micro_main")
    assert {c.model.family for c in got} == {"qwen2", "llama"}
    for family in ("qwen2", "llama"):
        assert len({c.model.size for c in got if c.model.family == family}) >= 2
    assert {c.algo.name for c in got} == {"grpo", "sapo"} and {c.seed for c in got} == {0, 1, 2}
    assert len(got) == 2 * 2 * 2 * 3


def test_micro_experiments_cover_the_issue():
    ablation = {c.algo.name: c for c in cells("micro_ablation")}
    assert set(ablation) == {"grpo", "sapo_kl", "sapo_kl_r", "sapo", "sapo_strict", "grpo_noent", "llds"}
    # the controls: the paper's strict gate, GRPO without its entropy bonus (and nothing else), LLDS's default gate
    assert ablation["sapo_strict"].algo.loss_params.strict is True
    noent, grpo = ablation["grpo_noent"].algo, ablation["grpo"].algo
    assert noent.entropy_coef == 0.0 and grpo.get("entropy_coef") is None and ablation["grpo"].train.entropy_coef > 0
    assert (noent.loss, noent.loss_params, noent.advantage) == (grpo.loss, grpo.loss_params, grpo.advantage)
    assert (ablation["llds"].algo.loss, ablation["llds"].algo.loss_params.gate) == ("llds", "action")
    assert {c.model.size for c in cells("micro_scaling")} == {"1m", "1.3m", "4m", "16m"}
    stress = cells("micro_stress")
    default = compose_config([])
    assert stress[0].setting != "default" and stress[0].train.lr > default.train.lr
    n = stress[0].train.prompts_per_step * stress[0].train.group_size
    assert n // stress[0].train.mini_batch_size > n // default.train.mini_batch_size
    # The micro default holds the policy near its warm start (β 0.3, conf/config.yaml says why); the
    # stress test and the pretrained model keep the papers' 0.001, as the paper protocol does.
    assert default.train.ref_kl_beta == 0.3
    assert {c.train.ref_kl_beta for c in stress + cells("micro_real") + cells("paper_main")} == {0.001}
    assert {c.algo.name for c in cells("micro_stabilisers")} >= {"dr_grpo", "dapo", "gspo", "soft_gate", "ppo", "sapo"}


def test_paper_experiments_use_the_published_hyper_parameters():
    main = cells("paper_main")
    assert {c.model.name for c in main} == {"qwen2.5-3b", "qwen2.5-3b-instruct"}
    c = main[0]
    assert (c.train.prompts_per_step, c.train.group_size, c.train.mini_batch_size) == (256, 10, 256)
    assert (c.train.lr, c.train.max_steps, c.train.reward) == (1e-6, 420, "f1")
    assert (c.train.ref_kl_beta, c.train.entropy_coef) == (0.001, 0.001)
    assert (c.rollout.max_turns, c.rollout.max_new_tokens, c.rollout.template) == (5, 512, "sapo")
    assert (c.retriever.method, c.retriever.model, c.data.kind) == ("dense", "intfloat/e5-base-v2", "flashrag")
    sapo = next(x for x in main if x.algo.name == "sapo").algo.loss_params
    assert (sapo.gamma, sapo.tau) == (0.1, 1.0)
    ablation = cells("paper_ablation")
    assert (ablation[0].train.group_size, ablation[0].train.max_steps) == (5, 300)
    assert {x.algo.name for x in ablation} == {"grpo", "sapo_kl", "sapo_kl_r", "sapo"}
    sizes = {x.model.name for x in cells("paper_scaling")}
    assert sizes == {f"qwen2.5-{s}-instruct" for s in ("1.5b", "3b", "7b", "14b")}
    assert {x.model.family for x in cells("paper_llama")} == {"llama"}
    # every paper backbone is one the published tables name
    with open(CONF.parent / "results" / "reference" / "published_results.csv") as f:
        published = {row["backbone"].lower() for row in csv.DictReader(f)}
    for name in sizes | {"qwen2.5-3b-instruct", "llama3.2-3b-instruct"}:
        assert any(name.replace("llama", "llama-") in p or name in p for p in published), name


def test_the_slurm_launcher_composes_and_names_the_submitit_plugin():
    cfg = compose_config(["experiment=paper_main", "hydra/launcher=slurm"], hydra_config=True)
    launcher = cfg.hydra.launcher
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"
    assert launcher.gpus_per_node == 1 and launcher.max_num_timeout > 0


def test_command_line_overrides_replace_a_swept_key():
    assert len(grid("micro_main")) == 24
    assert len(grid("micro_main", ["seed=0"])) == 8
    assert {j[-1] for j in grid("micro_main", ["seed=0"])} == {"seed=0"}


def test_a_run_never_waits_in_a_slot_for_a_warm_start_another_worker_builds():
    runs = interleave(expand(["micro_main"]))
    label = lambda r: r.label if r else None  # noqa: E731
    queue, warmed = list(runs), set()
    first = next_run(queue, [], warmed)
    assert label(first) == "qwen2-micro-1m/grpo/seed0"
    # qwen2-micro-1m is being built: the next pick is another model's run, not its second run
    second = next_run(queue, [first], warmed)
    assert second.cfg.model.name != "qwen2-micro-1m"
    # every model building: queued runs of those four models wait in the queue, the slot stays free
    building = [first, second] + [next_run(queue, [first, second], warmed) for _ in range(2)]
    assert len({r.cfg.model.name for r in building}) == 4
    assert next_run(queue, building, warmed) is None
    # once a run of a model has finished its warm start exists: its other runs start beside a builder
    warmed.add(warm_start_key(first))
    assert next_run(queue, building[1:], warmed).cfg.model.name == "qwen2-micro-1m"
    # a hub model has no shared warm start: its runs never wait on each other
    hub = expand(["paper_main"])
    assert warm_start_key(hub[0]) is None and next_run(hub[1:2], hub[:1], set()) is hub[1]


def test_a_model_config_can_set_its_own_warm_start_settings():
    from sapo_bench.runtime import warmstart_config

    plain = compose_config(["model=qwen2-micro-1m"])
    own = compose_config(["model=qwen2-micro-1m", "+model.warmstart.warmup_steps=7"])
    assert warmstart_config(plain).warmup_steps == plain.warmstart.warmup_steps != 7
    assert warmstart_config(own).warmup_steps == 7 and warmstart_config(own).lr == plain.warmstart.lr
