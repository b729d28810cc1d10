"""sapo-export on a trained (tiny) micro_smoke run: plain transformers loads the folder, and sapo-eval
scores it exactly as it scores the checkpoint, which is the run's own test."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from sapo_bench.evaluate import run_eval
from sapo_bench.export import export, load_policy_weights, main, run_config
from sapo_bench.models import load_policy
from sapo_bench.train import train

from test_training import CONF, tiny_overrides


def overrides(tmp):
    return ["experiment=micro_smoke", *tiny_overrides(tmp, algo="sapo")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides(tmp))
    result = train(cfg)
    return tmp, Path(cfg.run_dir), result


def sapo_eval(tmp, checkpoint, out):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return run_eval(compose(config_name="config", overrides=overrides(tmp) + [f"checkpoint={checkpoint}",
                                                                                  f"out={out}"]))


def test_the_export_scores_as_the_checkpoint_and_the_runs_own_test(trained, tmp_path):
    tmp, run_dir, result = trained
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    out = export(ckpt)
    assert out == run_dir / "export"
    assert {"config.json", "model.safetensors", "tokenizer.json", "sapo_export.json"} <= {p.name for p in out.iterdir()}
    record = json.loads((out / "sapo_export.json").read_text())
    assert (record["model"], record["algo"], record["rollout_step"]) == ("qwen2-micro-1m", "sapo", 2)
    from_ckpt = sapo_eval(tmp, ckpt, tmp_path / "ckpt.json")["test"]
    from_export = sapo_eval(tmp, out, tmp_path / "export.json")["test"]
    assert from_export == from_ckpt == result["test"]  # every dataset's EM, F1 and n, exactly


def test_the_export_rolls_out_as_the_checkpoint_token_for_token(trained):
    """The EMs above are equal however weak the tiny policy is; its responses show the export acts
    as the checkpoint does, through sapo-eval's own loading of each."""
    from omegaconf import OmegaConf

    from sapo_bench import evaluate
    from sapo_bench.data import load_eval
    from sapo_bench.retrieval import build_retriever
    from sapo_bench.rollout import RolloutConfig, make_engine, rollout

    tmp, run_dir, _ = trained
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    out = run_dir / "export"
    if not out.exists():
        export(ckpt)
    batches = []
    for checkpoint in (ckpt, out):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides(tmp) + [f"checkpoint={checkpoint}"])
        retriever = build_retriever(**OmegaConf.to_container(cfg.retriever, resolve=True))
        rcfg = RolloutConfig(**cfg.rollout)
        model, tok = evaluate._policy(cfg, retriever, rcfg)
        questions = load_eval(cfg.data.source, ("nq", "hotpotqa"), limit=4)
        batches.append(rollout(make_engine("hf", model.eval(), tok, greedy=True), tok, retriever,
                               [q for ds in questions.values() for q in ds["question"]], rcfg))
    a, b = batches
    assert any(r.strip() for r in a.responses)
    assert a.responses == b.responses and torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.old_logp, b.old_logp)


def test_plain_transformers_loads_the_export(trained, tmp_path):
    _, run_dir, _ = trained
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    out = export(ckpt, tmp_path / "qwen2-sapo")
    # a process that imports transformers and nothing of sapo-bench
    code = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval(); t = AutoTokenizer.from_pretrained(sys.argv[1]); "
            "ids = t('Question: who founded the city?', return_tensors='pt').input_ids; "
            "print(type(m).__name__, m(ids).logits[0, -1].tolist())")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    name, logits = proc.stdout.split(" ", 1)
    assert name == "Qwen2ForCausalLM"
    cfg = run_config(ckpt)
    policy, tok = load_policy(cfg.model, world_dir=cfg.data.root)
    load_policy_weights(policy, ckpt)
    ids = tok("Question: who founded the city?", return_tensors="pt").input_ids
    with torch.no_grad():
        # Equal weights, but not bit-equal logits: the child process runs torch's default thread
        # count, and another split of the matmuls sums in another order (CI saw it; 1e-7 apart).
        torch.testing.assert_close(torch.tensor(json.loads(logits)), policy.eval()(ids).logits[0, -1],
                                   rtol=0, atol=1e-5)
    from safetensors.torch import load_file

    exported = load_file(out / "model.safetensors")
    assert exported and all(torch.equal(v, policy.state_dict()[k]) for k, v in exported.items())


def test_the_console_script_refuses_to_overwrite_unless_forced(trained, capsys):
    _, run_dir, _ = trained
    ckpt = str(run_dir / "checkpoints" / "last.ckpt")
    main([ckpt, "--out", str(run_dir / "again")])
    assert json.loads(capsys.readouterr().out)["out"] == str(run_dir / "again")
    with pytest.raises(SystemExit, match=r"sapo-export: .*again exists: give another --out, or --force"):
        main([ckpt, "--out", str(run_dir / "again")])
    main([ckpt, "--out", str(run_dir / "again"), "--force"])
    assert (run_dir / "again" / "model.safetensors").is_file()
