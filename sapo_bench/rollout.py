"""Multi-turn search rollout (DESIGN §4), Search-R1 compatible.

    batch = rollout(engine, tokenizer, retriever, prompts, RolloutConfig())

Two layers. The *episode loop* (`rollout`) is the environment: it parses each turn's action,
calls the retriever once per turn for the whole batch, inserts `<information>` blocks or the
invalid-action feedback, enforces turn and token budgets, and records the loss mask. An *engine*
produces the tokens: `HFEngine` for any transformers causal LM, `VLLMEngine` (rollout.backend=vllm,
sapo_bench/vllm_engine.py, imported only when asked for), `ScriptedEngine` for fixed texts (tests,
and the teacher trajectories of the warm start).

How this differs from Search-R1's loop:
1. One KV cache lives across turns: inserted passages are appended to it, never re-encoded.
   Sequences in a batch may have holes (padding in the middle); position ids count real tokens
   only, so every sequence sees exactly what it would see alone.
2. Finished episodes leave the batch (the cache is compacted), so late turns cost only what is
   still running.
3. Tokens are kept as sampled: no decode → cut → re-tokenise. A turn ends on the token that
   completes `</search>` or `</answer>`; text after it inside that same token stays.
4. End-of-sequence ends the episode (Search-R1 would insert the invalid-action feedback).
5. Behaviour log-probs are recorded at sampling time (log-softmax of logits / temperature).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from sapo_bench.prompts import INVALID_ACTION, make_prompt, observation
from sapo_bench.retrieval import format_passages
from sapo_bench.rewards import extract_answer
from sapo_bench.settings import check_int, check_number

log = logging.getLogger("sapo_bench")

ACTION = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)
STOP_STRINGS = ("</search>", "</answer>")


@dataclass
class RolloutConfig:
    max_turns: int = 4              # turns that may search; then one final answer turn
    max_new_tokens: int = 64        # generated tokens per turn
    max_obs_tokens: int = 256       # an inserted observation is cut to this many tokens
    max_response_tokens: int = 640  # budget for the whole response (generated + inserted)
    max_prompt_tokens: int = 512    # longer prompts keep their end (the question)
    topk: int = 3
    temperature: float = 1.0
    top_p: float = 1.0
    template: str = "search_r1"
    chat_template: bool = False     # wrap the prompt in the tokenizer's chat template (instruct models)
    backend: str = "hf"             # the Engine that generates (ENGINES)
    # Used instead of `backend` when that one cannot run here (its package is not installed), with
    # a warning; None: such a backend is an error that says how to install it.
    fallback: str | None = None
    # {backend name: its options}, passed to that backend's factory as options= (the vllm
    # backend's are sapo_bench.vllm_engine.VLLMOptions).
    engine_options: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("max_new_tokens", "max_obs_tokens", "max_response_tokens", "max_prompt_tokens", "topk"):
            check_int(f"rollout.{name}", getattr(self, name))
        check_int("rollout.max_turns", self.max_turns, minimum=0)  # 0: answer at once, without searching
        check_number("rollout.temperature", self.temperature, positive=True)
        check_number("rollout.top_p", self.top_p, positive=True, maximum=1)
        unknown = sorted(set(self.engine_options) - set(ENGINES) - set(LAZY_ENGINES))
        if unknown:
            raise ValueError(f"rollout.engine_options names unknown backend(s) {', '.join(map(repr, unknown))}; "
                             f"valid: {', '.join(backend_names())}")
        if self.fallback is not None:
            try:
                engine_factory(self.backend)
            except BackendUnavailable as e:
                log.warning("rollout.backend=%s cannot run here, so this run rolls out with rollout.fallback=%s "
                            "instead. %s", self.backend, self.fallback, e)
                self.backend = self.fallback
        engine_factory(self.backend)  # an unknown name fails here, listing the valid ones

    def options(self) -> dict | None:
        """The selected backend's options, if the config gives any."""
        return self.engine_options.get(self.backend)

    def generation_budget(self) -> int:
        """The most tokens a response can generate: max_turns + 1 turns of max_new_tokens, within
        max_response_tokens (which counts the inserted passages too)."""
        return min(self.max_response_tokens, (self.max_turns + 1) * self.max_new_tokens)


def parse_action(text: str) -> tuple[str | None, str]:
    """Search-R1's rule: the first <search>…</search> or <answer>…</answer> of the turn."""
    m = ACTION.search(text)
    return (m.group(1), m.group(2).strip()) if m else (None, "")


@dataclass
class TurnOutput:
    tokens: list[int]
    logps: list[float]
    reason: str  # "stop" (a stop string), "eos", or "length"


@dataclass
class RolloutBatch:
    """Compact, right-padded sequences: prompt then response, one row per episode."""

    input_ids: torch.Tensor       # (N, L)
    attention_mask: torch.Tensor  # (N, L)
    loss_mask: torch.Tensor       # (N, L) 1 on generated tokens only
    old_logp: torch.Tensor        # (N, L) behaviour log-prob of each generated token, 0 elsewhere
    prompt_lens: list[int]
    responses: list[str]          # decoded responses, inserted text included
    answers: list[str | None]
    turns: list[int]
    searches: list[int]
    invalid: list[int]
    stats: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        n = max(len(self.turns), 1)
        gen = self.loss_mask.sum(-1).float()
        return {"rollout/searches_mean": sum(self.searches) / n,
                "rollout/turns_mean": sum(self.turns) / n,
                "rollout/invalid_frac": sum(i > 0 for i in self.invalid) / n,
                "rollout/answered_frac": sum(a is not None for a in self.answers) / n,
                "rollout/response_len": float(gen.mean()) if len(gen) else 0.0,
                **self.stats}


# --- engines -------------------------------------------------------------------------------------


class Engine(Protocol):
    """What `rollout` drives: the policy's side of one batch of episodes, turn by turn.

    start(prompts)       a new batch; episode i's prompt token ids are prompts[i]
    generate(max_new)    one turn for each running episode, budgets in episode order
    keep(episodes)       only these episodes (ascending ids) go on
    append(token_lists)  the tokens inserted after each running episode's turn (passages, feedback)

    An engine may hold a KV cache across turns (HFEngine) or resubmit each episode's whole context
    to a server with prefix caching (VLLMEngine, sapo_bench/vllm_engine.py); `rollout` cannot tell.
    Register a backend with `register_engine` and pick it with `rollout.backend`. An engine may
    also have `metrics() -> {name: float}`, merged into the batch's stats at the end (the vLLM
    engine's prefix-cache counts).
    """

    def start(self, prompts: list[list[int]]) -> None: ...

    def generate(self, max_new: list[int]) -> list[TurnOutput]: ...

    def keep(self, episodes: list[int]) -> None: ...

    def append(self, token_lists: list[list[int]]) -> None: ...


# name -> factory(model, tokenizer, *, temperature, top_p, greedy, generator[, options]) -> Engine.
# `options` (rollout.engine_options[name]) is passed only when the config gives some. A factory
# may carry three optional attributes (see `sync_engine`, `release_engine`, `engine_exact_logp`):
#   sync_weights(model) -> {metric: float}  it serves its own copy of the weights: push the
#                                           policy's current ones to it and check them
#   release() -> None                       free what it holds on the accelerator until next use
#   exact_logp: bool                        its behaviour log-probs are the training forward's
#                                           (default True); False makes recompute_old_logp the default
ENGINES: dict[str, Callable[..., Engine]] = {}
# Backends in modules of their own, imported on first use (they register themselves), so that an
# environment without their package still imports sapo_bench and every other backend works.
LAZY_ENGINES: dict[str, str] = {"vllm": "sapo_bench.vllm_engine"}


class BackendUnavailable(RuntimeError):
    """A known backend whose package is not installed here; the message says how to install it."""


class EngineError(RuntimeError):
    """The engine failed mid-run: the run stops here (train() records it in error.json) and keeps
    its last checkpoint, from which it resumes once the cause is fixed."""


class EngineOutOfSync(EngineError):
    """The engine's log-probs disagree with the training forward after a weight sync: it serves
    stale or partial weights, and every rollout from it would be off-policy without a trace."""


def register_engine(name: str):
    def deco(factory):
        if name in ENGINES:
            raise ValueError(f"rollout backend {name!r} is already registered")
        ENGINES[name] = factory
        return factory

    return deco


def backend_names() -> list[str]:
    return sorted(set(ENGINES) | set(LAZY_ENGINES))


def engine_factory(backend: str) -> Callable[..., Engine]:
    """The factory registered as `backend`; BackendUnavailable if its package is missing."""
    if backend not in ENGINES and backend in LAZY_ENGINES:
        importlib.import_module(LAZY_ENGINES[backend])  # registers it, or raises BackendUnavailable
    try:
        return ENGINES[backend]
    except KeyError:
        raise ValueError(f"unknown rollout backend {backend!r}; valid: {', '.join(backend_names())}") from None


def make_engine(backend: str, model, tokenizer, *, options: dict | None = None, **sampling) -> Engine:
    factory = engine_factory(backend)
    return factory(model, tokenizer, options=options, **sampling) if options else factory(model, tokenizer, **sampling)


def sync_engine(backend: str, model) -> dict[str, float]:
    """After the policy's weights changed: a backend that serves its own copy of them gets the new
    ones and checks them (its metrics come back); one that reads the policy itself needs nothing."""
    sync = getattr(engine_factory(backend), "sync_weights", None)
    return sync(model) if sync is not None else {}


def release_engine(backend: str) -> None:
    """The rollout batch is done: let the backend free accelerator memory for training."""
    release = getattr(engine_factory(backend), "release", None)
    if release is not None:
        release()


def engine_exact_logp(backend: str) -> bool:
    """Whether the backend's behaviour log-probs come from the training forward's own numerics."""
    return bool(getattr(engine_factory(backend), "exact_logp", True))


class ScriptedEngine:
    """Emits fixed text turns per episode (teacher trajectories, tests). Log-probs are 0."""

    def __init__(self, tokenizer, scripts: list[list[str]]):
        self.tok = tokenizer
        self.scripts = [[tokenizer(t, add_special_tokens=False)["input_ids"] for t in s] for s in scripts]
        self.slots: list[int] = []
        self.turn: dict[int, int] = {}

    def start(self, prompts: list[list[int]]) -> None:
        self.slots = list(range(len(prompts)))
        self.turn = {i: 0 for i in self.slots}

    def generate(self, max_new: list[int]) -> list[TurnOutput]:
        outs = []
        for ep, budget in zip(self.slots, max_new):
            turns = self.scripts[ep]
            k = self.turn[ep]
            self.turn[ep] += 1
            if k >= len(turns):
                outs.append(TurnOutput([self.tok.eos_token_id], [0.0], "eos"))
                continue
            ids = turns[k][:budget]
            outs.append(TurnOutput(ids, [0.0] * len(ids), "stop" if len(ids) == len(turns[k]) else "length"))
        return outs

    def keep(self, episodes: list[int]) -> None:
        self.slots = list(episodes)

    def append(self, token_lists: list[list[int]]) -> None:
        pass


@register_engine("hf")
class HFEngine:
    """Batched sampling with one KV cache across turns, for any transformers causal LM."""

    def __init__(self, model, tokenizer, *, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                 generator: torch.Generator | None = None):
        self.model, self.tok = model, tokenizer
        self.temperature, self.top_p, self.greedy, self.gen = temperature, top_p, greedy, generator
        self.device = next(model.parameters()).device
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # Only a token whose text contains ">" can complete a stop string: check just those.
        self._closing = torch.tensor([">" in s for s in tokenizer.convert_ids_to_tokens(range(len(tokenizer)))])
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        # A stop string may be spelled by as many tokens as it has characters (byte pieces), even
        # where the tokenizer also has it as one added token: the decoded tail is that long.
        self._stop_window = max(len(s) for s in STOP_STRINGS)

    def _forward(self, ids, mask_new, positions):
        """Logits of the last column only: every caller aligns each row's last real token there."""
        self.mask = torch.cat([self.mask, mask_new], dim=1) if self.mask is not None else mask_new
        # transformers renamed past_key_values to cache (5.x); accept both spellings.
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self._cache_arg: self.cache})
        self.cache = out.get("cache", out.get("past_key_values"))
        return out.logits[:, -1].float()

    @torch.no_grad()
    def start(self, prompts: list[list[int]]) -> None:
        from transformers import DynamicCache

        n, length = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((n, length), self.pad, dtype=torch.long)
        mask = torch.zeros((n, length), dtype=torch.long)
        for i, p in enumerate(prompts):  # left-pad, so every prompt ends in the last column
            ids[i, length - len(p):] = torch.tensor(p)
            mask[i, length - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        self.cache, self.mask = DynamicCache(), None
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.next_logits = self._forward(ids, mask, positions)
        self.n_real = mask.sum(-1)
        self.pending: list[int | None] = [None] * n
        self.slots = list(range(n))

    def _sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.greedy:
            tok = logits.argmax(-1)
            return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
        # Inverse-CDF sampling from unnormalised weights: one exp over the vocabulary per step, no
        # log-softmax, and ~20x faster than torch.multinomial on a CPU; the same distribution.
        z = logits / self.temperature
        z = z - z.max(-1, keepdim=True).values
        w = z.exp()
        log_total = w.sum(-1).log()  # log Σ exp(z): the behaviour log-prob is z_tok − log_total
        if self.top_p < 1.0:
            sorted_w, order = w.sort(-1, descending=True)
            drop = sorted_w.cumsum(-1) - sorted_w > self.top_p * log_total.exp()[:, None]
            w = w.scatter(-1, order, sorted_w.masked_fill(drop, 0.0))
        cdf = w.cumsum(-1)
        u = torch.rand(cdf.shape[0], 1, generator=self.gen, device=cdf.device) * cdf[:, -1:]
        tok = torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=cdf.shape[-1] - 1)
        return tok, z.gather(-1, tok[:, None])[:, 0] - log_total

    def _stopped(self, turn_tokens: list[int]) -> bool:
        tail = self.tok.decode(turn_tokens[-self._stop_window:])
        return any(s in tail for s in STOP_STRINGS)

    @torch.no_grad()
    def generate(self, max_new: list[int]) -> list[TurnOutput]:
        n = len(self.slots)
        outs = [TurnOutput([], [], "length") for _ in range(n)]
        active = torch.tensor([b > 0 for b in max_new], device=self.device)
        logits = self.next_logits
        for step in range(max(max_new, default=0)):
            tok, lp = self._sample(logits)
            tok = torch.where(active, tok, torch.full_like(tok, self.pad))
            still = active.clone()
            toks, lps = tok.tolist(), lp.tolist()  # one device sync per step, not one per sequence
            for i in active.nonzero()[:, 0].tolist():
                t = toks[i]
                outs[i].tokens.append(t)
                outs[i].logps.append(lps[i])
                if t in self.eos:
                    outs[i].reason = "eos"
                elif self._closing[t] and self._stopped(outs[i].tokens):
                    outs[i].reason = "stop"
                elif len(outs[i].tokens) < max_new[i]:
                    continue
                still[i] = False
                self.pending[i] = t  # the turn's last token is fed with whatever comes next
            if not still.any():
                break
            logits = self._forward(tok[:, None], still[:, None].long(), self.n_real[:, None])
            self.n_real = self.n_real + still.long()
            active = still
        self.next_logits = logits
        return outs

    def keep(self, episodes: list[int]) -> None:
        """Drop finished episodes from the batch, cache included."""
        idx = [self.slots.index(e) for e in episodes]
        if idx == list(range(len(self.slots))):
            return
        index = torch.tensor(idx, device=self.device, dtype=torch.long)
        self.cache.batch_select_indices(index)
        self.mask, self.n_real, self.next_logits = self.mask[index], self.n_real[index], self.next_logits[index]
        self.pending = [self.pending[i] for i in idx]
        self.slots = list(episodes)

    @torch.no_grad()
    def append(self, token_lists: list[list[int]]) -> None:
        """Feed each slot's pending last token plus its inserted tokens, in one forward."""
        seqs = [([p] if p is not None else []) + list(t) for p, t in zip(self.pending, token_lists)]
        self.pending = [None] * len(seqs)
        width = max((len(s) for s in seqs), default=0)
        if width == 0:
            return
        n = len(seqs)
        ids = torch.full((n, width), self.pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, s in enumerate(seqs):  # left-aligned to the end, so the logits needed are the last column's
            if s:
                ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
                mask[i, width - len(s):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = self.n_real[:, None] + (mask.cumsum(-1) - 1).clamp(min=0)
        fresh = self._forward(ids, mask, positions)
        has = torch.tensor([len(s) > 0 for s in seqs], device=self.device)
        self.next_logits = torch.where(has[:, None], fresh, self.next_logits)
        self.n_real = self.n_real + mask.sum(-1)


# --- the episode loop ----------------------------------------------------------------------------


def encode_prompts(tokenizer, questions: list[str], cfg: RolloutConfig) -> tuple[list[list[int]], int]:
    """Token ids of each prompt, and how many had to be cut to max_prompt_tokens."""
    out, cut = [], 0
    for q in questions:
        text = make_prompt(q, cfg.template)
        if cfg.chat_template:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > cfg.max_prompt_tokens:
            ids, cut = ids[-cfg.max_prompt_tokens:], cut + 1
        out.append(list(ids))
    return out, cut


def respond(acting: dict[int, tuple[str | None, str]], retriever, cfg: RolloutConfig) -> dict[int, str]:
    """The environment's reply to each episode that goes on, from its (action, content): the
    retrieved passages for a search (one retriever call for the whole batch), else the
    invalid-action feedback."""
    inserts = {e: INVALID_ACTION for e, (action, _) in acting.items() if action != "search"}
    searching = [e for e, (action, _) in acting.items() if action == "search"]
    if searching:
        for e, hits in zip(searching, retriever.search([acting[e][1] for e in searching], cfg.topk)):
            inserts[e] = observation(format_passages(hits).strip(), cfg.template)
    return inserts


def rollout(engine, tokenizer, retriever, questions: list[str], cfg: RolloutConfig) -> RolloutBatch:
    prompts, prompts_cut = encode_prompts(tokenizer, questions, cfg)
    n = len(prompts)
    resp = [[] for _ in range(n)]
    mask = [[] for _ in range(n)]
    logps = [[] for _ in range(n)]
    texts = [[] for _ in range(n)]      # every piece of the response, inserted text included
    generated = [[] for _ in range(n)]  # the policy's own turns only
    turns, searches, invalid = [0] * n, [0] * n, [0] * n
    obs_cut = ctx_cut = 0
    engine.start(prompts)
    running = list(range(n))
    for turn in range(cfg.max_turns + 1):
        final = turn == cfg.max_turns
        budget = [min(cfg.max_new_tokens, cfg.max_response_tokens - len(resp[e])) for e in running]
        outs = engine.generate(budget)
        acting = {}  # the episodes that go on: their action and its content
        for e, out in zip(running, outs):
            turns[e] += 1
            resp[e] += out.tokens
            mask[e] += [1] * len(out.tokens)
            logps[e] += out.logps
            text = tokenizer.decode(out.tokens, skip_special_tokens=True)
            texts[e].append(text)
            generated[e].append(text)
            action, content = parse_action(text)
            if out.reason == "eos" or action == "answer" or final:
                continue
            if len(resp[e]) >= cfg.max_response_tokens:  # the response budget is spent: no room to go on
                ctx_cut += 1
                continue
            acting[e] = (action, content)
            searches[e] += action == "search"
            invalid[e] += action != "search"
        inserts = respond(acting, retriever, cfg)
        running = [e for e in running if e in inserts]
        if not running:
            break
        engine.keep(running)
        token_lists = []
        for e in running:
            ids = tokenizer(inserts[e], add_special_tokens=False)["input_ids"]
            if len(ids) > cfg.max_obs_tokens:
                ids, obs_cut = ids[:cfg.max_obs_tokens], obs_cut + 1
            room = cfg.max_response_tokens - len(resp[e])
            if len(ids) > room:
                ids, ctx_cut = ids[:room], ctx_cut + 1
            resp[e] += ids
            mask[e] += [0] * len(ids)
            logps[e] += [0.0] * len(ids)
            texts[e].append(tokenizer.decode(ids, skip_special_tokens=True))
            token_lists.append(ids)
        engine.append(token_lists)
        running = [e for e in running if len(resp[e]) < cfg.max_response_tokens]
        engine.keep(running)
    responses = ["".join(t) for t in texts]
    engine_metrics = getattr(engine, "metrics", None)
    batch = _pack(tokenizer, prompts, resp, mask, logps)
    return RolloutBatch(
        **batch, prompt_lens=[len(p) for p in prompts], responses=responses,
        # From generated text only: the invalid-action feedback itself contains "<answer> and </answer>".
        answers=[extract_answer("".join(g)) for g in generated],
        turns=turns, searches=searches, invalid=invalid,
        stats={"rollout/obs_truncated": obs_cut / max(n, 1), "rollout/context_truncated": ctx_cut / max(n, 1),
               "rollout/prompt_truncated": prompts_cut / max(n, 1),
               **(engine_metrics() if engine_metrics is not None else {})})


def _pack(tokenizer, prompts, resp, mask, logps) -> dict:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n = len(prompts)
    width = max(len(p) + len(r) for p, r in zip(prompts, resp))
    ids = torch.full((n, width), pad, dtype=torch.long)
    att = torch.zeros((n, width), dtype=torch.long)
    lm = torch.zeros((n, width), dtype=torch.float32)
    old = torch.zeros((n, width), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, resp)):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        att[i, :len(p) + len(r)] = 1
        lm[i, len(p):len(p) + len(r)] = torch.tensor(mask[i], dtype=torch.float32)
        old[i, len(p):len(p) + len(r)] = torch.tensor(logps[i], dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": att, "loss_mask": lm, "old_logp": old}
