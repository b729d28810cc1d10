"""experiment=micro_real's parts (issue 14): the retriever server around a command, the supervised warm
start of a pretrained model (on a micro model here: fast), its rows in the report; and, slow, the
whole smoke-real path on SmolLM2-135M-Instruct with sapo-eval of its checkpoint and export."""

import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from sapo_bench import withserver
from sapo_bench.report import WARM_START, measured_table

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


# --- the server around a command -----------------------------------------------------------------

def test_withserver_serves_the_corpus_during_the_command_and_stops_it_after_a_failure(tmp_path):
    port = free_port()
    probe = ("import json, sys, urllib.request; req = urllib.request.Request("
             f"'http://127.0.0.1:{port}/retrieve', data=json.dumps({{'queries': ['born'], 'topk': 2}}).encode(), "
             "headers={'Content-Type': 'application/json'}); "
             "hits = json.loads(urllib.request.urlopen(req).read())['result']; "
             "print(len(hits[0])); sys.exit(3 if len(hits[0]) == 2 else 1)")
    rc = withserver.main(["micro_smoke", "retriever=http", f"retriever.url=http://127.0.0.1:{port}/retrieve",
                          f"data.root={tmp_path}/world", "data.world_scale=0.05", f"out_root={tmp_path}/runs",
                          "--", sys.executable, "-c", probe])
    assert rc == 3  # the command's own status: it searched (two hits), then failed on purpose
    assert refused(port)  # and the server is gone
    assert (tmp_path / "runs" / "retriever.log").exists() and (tmp_path / "world" / "corpus.jsonl").exists()


def test_withserver_passes_sigterm_to_the_command_and_stops_the_server(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sapo_bench.withserver", "micro_smoke", "retriever=http",
                             f"retriever.url=http://127.0.0.1:{port}/retrieve", f"data.root={tmp_path}/world",
                             "data.world_scale=0.05", f"out_root={tmp_path}/runs", "--",
                             sys.executable, "-c", "import time; print('started', flush=True); time.sleep(120)"],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    for line in proc.stdout:
        if line.startswith("started"):
            break
    assert not refused(port)
    proc.terminate()
    assert proc.wait(60) == 128 + 15
    assert refused(port)


@pytest.mark.parametrize("overrides, message", [
    ([], "not http"),
    (["retriever=http", "retriever.url=http://10.0.0.1:8000/retrieve"], "not a loopback URL"),
])
def test_withserver_refuses_what_it_cannot_start(tmp_path, overrides, message):
    with pytest.raises(SystemExit, match=message):
        withserver.main(["micro_smoke", *overrides, f"data.root={tmp_path}/world", "--", "true"])


def test_withserver_needs_a_command():
    with pytest.raises(SystemExit, match="usage"):
        withserver.main(["micro_real"])
    with pytest.raises(SystemExit, match="unknown experiment 'nope'; valid: .*micro_real"):
        withserver.main(["nope", "--", "true"])


# --- the supervised warm start of a pretrained model ---------------------------------------------

def test_pretrained_warm_start_scores_the_untrained_model_first_trains_and_caches(small_world, bm25, tmp_path):
    """A micro model stands in for the pretrained one (load_policy reads either): the mechanics, fast."""
    from sapo_bench.realstart import pretrained_warm_start
    from sapo_bench.rollout import RolloutConfig
    from sapo_bench.warmstart import WarmStartConfig

    model_cfg = {"kind": "micro", "name": "qwen2-micro-1m", "world_dir": str(small_world), "vocab_size": 1024,
                 "tokenizer_cache": str(tmp_path / "tok")}
    # The micro rollout's budgets: the teacher's two-hop trajectories fit whole.
    rcfg = RolloutConfig(max_turns=2, max_new_tokens=32, max_obs_tokens=200, max_response_tokens=400,
                         max_prompt_tokens=256, template="micro")
    cfg = WarmStartConfig(questions=16, epochs=1, lr=1e-3, warmup_steps=1, batch_size=4, eval_limit=2, n_val=4,
                          aux_lm=0.0, answer_weight=1.0, aux_skip_top=0)
    model, tok, report = pretrained_warm_start(model_cfg, small_world, bm25, rcfg, cfg, cache_root=tmp_path / "c")
    assert list(report["baselines"]) == ["zero_shot", "zero_shot_rag", "common_answer", "no_search", "naive_rag",
                                         "oracle"]
    assert all(v["n"] == 2 for v in report["baselines"]["zero_shot"].values())
    assert report["teacher_em"] > 0.8 and len(report["sft_loss"]) == 1 and report["questions"] == 16
    (cached,) = (tmp_path / "c").iterdir()
    assert cached.name == f"sft-qwen2-micro-1m-{report['key']}"
    # The second call reads the cache: the same weights and report, no training.
    model2, _, report2 = pretrained_warm_start(model_cfg, small_world, bm25, rcfg, cfg, cache_root=tmp_path / "c")
    assert report2 == json.loads(json.dumps(report))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    # ... and it differs from the untrained model's (the pass trained something).
    from sapo_bench.models import load_policy

    fresh, _ = load_policy(model_cfg)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_the_micro_warm_start_key_is_not_the_sft_key(small_world, micro_tok):
    from sapo_bench.models import build_micro_model
    from sapo_bench.realstart import sft_cache_key
    from sapo_bench.rollout import RolloutConfig
    from sapo_bench.warmstart import WarmStartConfig, cache_key

    model = build_micro_model("qwen2-micro-1m", micro_tok, 0)
    rcfg, cfg = RolloutConfig(), WarmStartConfig()
    micro = cache_key(small_world, "qwen2-micro-1m", model.config.to_dict(), micro_tok, rcfg, cfg, 0)
    assert sft_cache_key(small_world, "qwen2-micro-1m", model, micro_tok, rcfg, cfg, 0) != micro


def test_micro_real_composes_to_the_paper_path_on_smollm2():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=micro_real"])
        smoke = compose(config_name="config", overrides=["experiment=micro_real_smoke"])
    assert (cfg.model.name, cfg.retriever.method, cfg.rollout.template, cfg.sft_warmstart) == \
        ("smollm2-135m-instruct", "http", "search_r1", True)
    assert cfg.train.prompts_per_step * cfg.train.group_size > cfg.train.mini_batch_size  # off-policy steps exist
    assert smoke.rollout == cfg.rollout and smoke.model == cfg.model and smoke.train.max_steps < cfg.train.max_steps
    from sapo_bench.runtime import run_configs

    run_configs(cfg)  # every size fits
    run_configs(smoke)


def test_the_report_shows_the_pretrained_rows_before_the_supervised_ones():
    import pandas as pd

    from sapo_bench.data import DATASETS

    def scores(v):
        return {d: {"em": v, "f1": v, "n": 8} for d in DATASETS}

    base = {"zero_shot": scores(0.0), "zero_shot_rag": scores(0.05), "no_search": scores(0.02),
            "naive_rag": scores(0.2), "oracle": scores(0.9)}
    res = {"run": {"collapse_step": None}, "test": scores(0.3), "warmstart": scores(0.25), "baselines": base}
    runs = pd.DataFrame([{"backbone": "smollm2", "method": m, "seed": 0, "state": "done", "result": res,
                          "collapse_step": None, "degenerate_step": None} for m in ("grpo", "sapo")])
    t = measured_table(runs, "grpo")
    assert list(t.method) == ["Oracle chain (teacher, ceiling)", "Zero-shot (pretrained, no fine-tuning)",
                              "Naive RAG, pretrained (no fine-tuning)", "Direct answer (no search)",
                              "Naive RAG (one search with the question)", WARM_START, "grpo", "sapo"]
    assert t.set_index("method").loc["Naive RAG, pretrained (no fine-tuning)", "avg_mean"] == pytest.approx(0.05)


# --- the whole path on SmolLM2 (slow: about 10 minutes on 2 cores) ---------------------------------

@pytest.mark.slow
@pytest.mark.timeout(1800)  # smoke-real, an export and two evaluations at 135M: beyond the suite's 600 s
def test_smoke_real_end_to_end_and_sapo_eval_of_checkpoint_and_export_agree(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from sapo_bench.models import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    port = free_port()
    common = [f"retriever.url=http://127.0.0.1:{port}/retrieve", f"out_root={tmp_path}/runs",
              f"data.root={tmp_path}/world"]
    py = sys.executable
    shell = (f"{py} -m sapo_bench.sweep micro_real_smoke {' '.join(common)} --jobs 1 && "
             f"{py} -m sapo_bench.report micro_real_smoke {' '.join(common)} --out {tmp_path}/results && "
             f"{py} -m sapo_bench.export {tmp_path}/runs/micro/default/smollm2-135m-instruct/sapo/seed0/checkpoints/last.ckpt"
             f" && {py} -m sapo_bench.evaluate experiment=micro_real_smoke {' '.join(common)} "
             f"checkpoint={tmp_path}/runs/micro/default/smollm2-135m-instruct/sapo/seed0/checkpoints/last.ckpt "
             f"out={tmp_path}/ckpt.json"
             f" && {py} -m sapo_bench.evaluate experiment=micro_real_smoke {' '.join(common)} "
             f"checkpoint={tmp_path}/runs/micro/default/smollm2-135m-instruct/sapo/seed0/export out={tmp_path}/export.json")
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([py, "-m", "sapo_bench.withserver", "micro_real_smoke", *common, "--", "sh", "-c", shell],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert refused(port)
    table = (tmp_path / "results" / "tables" / "micro_real_smoke.md").read_text()
    for row in ("Zero-shot (pretrained, no fine-tuning)", "Naive RAG, pretrained", WARM_START, "| grpo", "| sapo"):
        assert row in table
    result = json.loads((tmp_path / "runs/micro/default/smollm2-135m-instruct/sapo/seed0/result.json").read_text())
    from_ckpt = json.loads((tmp_path / "ckpt.json").read_text())["test"]
    from_export = json.loads((tmp_path / "export.json").read_text())["test"]
    assert from_export == from_ckpt == result["test"]  # EM, F1 and n of every mirror, exactly
