"""The peers that benchmarks/perf.py measures sapo-bench against. Not part of the package.

1. `regenerate_rollout`: Search-R1's multi-turn loop (`LLMGenerationManager.run_llm_loop`) with
   `model.generate` in place of its vLLM worker. Every turn re-encodes the whole context (prompt,
   earlier turns, inserted passages) from scratch, cuts the response after the first `</search>`
   or `</answer>`, re-tokenises it, and appends the retrieved block. It gets the same help
   sapo-bench's loop gets: batched retrieval, stop strings, finished episodes leaving the batch,
   and the same turn, token and observation budgets (RolloutConfig), so the only difference
   measured is how the context reaches the model.
2. `TRLRunner`: TRL's `GRPOTrainer` (on a CPU with `use_cpu=True`; on a GPU in bf16 autocast, as
   sapo-bench's GPU trainer is; no gradient checkpointing, no vLLM), configured as sapo-bench's
   GRPO row: same prompts, group size, completion length, mini-batch, number of optimiser steps per
   generation round, learning rate, clip, reference-KL β (k3), entropy bonus and token-mean
   aggregation (TRL's "dapo").
"""

from __future__ import annotations

import time

import torch

from sapo_bench.rewards import extract_answer, f1_score
from sapo_bench.rollout import STOP_STRINGS, RolloutConfig, encode_prompts, parse_action, respond


def _cut_at_action(text: str) -> str:
    """Search-R1's postprocessing: keep the response up to its first closing action tag."""
    for tag in STOP_STRINGS:
        if tag in text:
            return text.split(tag, 1)[0] + tag
    return text


@torch.no_grad()
def regenerate_rollout(model, tokenizer, retriever, questions: list[str], cfg: RolloutConfig, *, seed: int = 0) -> dict:
    """One batch of episodes; returns generated-token, search and turn counts (what the benchmark reports)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    prompts, _ = encode_prompts(tokenizer, questions, cfg)
    n = len(prompts)
    context = [list(p) for p in prompts]
    resp_len, generated, turns, searches = [0] * n, [0] * n, [0] * n, [0] * n
    active = list(range(n))
    for turn in range(cfg.max_turns + 1):
        if not active:
            break
        final = turn == cfg.max_turns
        width = max(len(context[e]) for e in active)
        ids = torch.full((len(active), width), pad, dtype=torch.long)
        mask = torch.zeros((len(active), width), dtype=torch.long)
        for row, e in enumerate(active):  # left-pad, as Search-R1's rolling state is
            ids[row, width - len(context[e]):] = torch.tensor(context[e])
            mask[row, width - len(context[e]):] = 1
        budget = max(min(cfg.max_new_tokens, cfg.max_response_tokens - resp_len[e]) for e in active)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=budget,
                             do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                             stop_strings=list(STOP_STRINGS), tokenizer=tokenizer, pad_token_id=pad)
        responses = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        acting = {}
        for e, text in zip(active, responses):
            room = cfg.max_response_tokens - resp_len[e]
            ids_e = tokenizer(_cut_at_action(text), add_special_tokens=False)["input_ids"][:min(cfg.max_new_tokens, room)]
            text = tokenizer.decode(ids_e)
            turns[e] += 1
            generated[e] += len(ids_e)
            resp_len[e] += len(ids_e)
            context[e] += ids_e
            action, content = parse_action(text)
            if action == "answer" or final or resp_len[e] >= cfg.max_response_tokens or not ids_e:
                continue
            acting[e] = (action, content)
            searches[e] += action == "search"
        inserts = respond(acting, retriever, cfg)  # the same environment as sapo-bench's loop
        active = [e for e in active if e in inserts]
        for e in active:
            obs = tokenizer(inserts[e], add_special_tokens=False)["input_ids"][:cfg.max_obs_tokens]
            obs = obs[:cfg.max_response_tokens - resp_len[e]]
            context[e] += obs
            resp_len[e] += len(obs)
        active = [e for e in active if resp_len[e] < cfg.max_response_tokens]
    return {"generated_tokens": sum(generated), "searches": sum(searches), "turns": sum(turns)}


class TRLRunner:
    """TRL's GRPOTrainer at sapo-bench's GRPO settings; `run(rounds)` times each generation round.

    One sapo-bench training step (rollout of P×G responses, then P×G / mini_batch optimiser steps)
    is one TRL generation round: `steps_per_generation` trainer steps of one mini-batch each.
    """

    def __init__(self, model, tokenizer, rows: list[dict], *, group_size: int, prompts_per_step: int,
                 mini_batch_size: int, completion_tokens: int, lr: float, clip_eps: float, beta: float,
                 entropy_coef: float, temperature: float, seed: int, workdir: str, device: str = "cpu"):
        from datasets import Dataset

        n_responses = prompts_per_step * group_size
        if n_responses % mini_batch_size:
            raise ValueError(f"TRL needs P·G ({n_responses}) to be a multiple of the mini-batch ({mini_batch_size})")
        self.steps_per_round = n_responses // mini_batch_size
        # TRL builds its reference model from the policy's path (β > 0), so both start from a saved copy.
        self.model_dir = f"{workdir}/policy"
        model.save_pretrained(self.model_dir)
        tokenizer.save_pretrained(self.model_dir)
        self.tokenizer = tokenizer
        self.dataset = Dataset.from_list([{"prompt": r["prompt"], "golden_answers": r["golden_answers"]} for r in rows])
        self.args = dict(
            output_dir=workdir, use_cpu=device == "cpu", model_init_kwargs={"dtype": "float32"},
            gradient_checkpointing=False, use_vllm=False, bf16=device != "cpu", fp16=False,
            per_device_train_batch_size=mini_batch_size, gradient_accumulation_steps=1,
            steps_per_generation=self.steps_per_round, num_generations=group_size,
            max_completion_length=completion_tokens, temperature=temperature, top_p=1.0, top_k=0,
            learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
            epsilon=clip_eps, beta=beta, entropy_coef=entropy_coef, loss_type="dapo", scale_rewards="group",
            num_iterations=1, logging_steps=self.steps_per_round, save_strategy="no", report_to="none",
            disable_tqdm=True, log_completions=False, seed=seed, data_seed=seed, dataloader_num_workers=0)
        self.completion_lengths: list[float] = []

    def run(self, rounds: int) -> list[float]:
        """Seconds per generation round (rollout + its optimiser steps), in order."""
        from transformers import PrinterCallback, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer

        marks: list[float] = []

        class Clock(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                marks.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kw):
                marks.append(time.perf_counter())

        def reward(completions, golden_answers, **_):
            return [0.0 if (a := extract_answer(c)) is None else f1_score(a, g)
                    for c, g in zip(completions, golden_answers)]

        args = GRPOConfig(**self.args, max_steps=rounds * self.steps_per_round)
        trainer = GRPOTrainer(model=self.model_dir, reward_funcs=reward, args=args, train_dataset=self.dataset,
                              processing_class=self.tokenizer, callbacks=[Clock()])
        trainer.remove_callback(PrinterCallback)  # its per-round log lines; the lengths are read below
        trainer.train()
        lengths = [v for log in trainer.state.log_history for k, v in log.items() if k == "completions/mean_length"]
        self.completion_lengths = lengths
        k = self.steps_per_round
        return [marks[(r + 1) * k] - marks[r * k] for r in range(rounds)]
