"""A scripted real model for the engine tests: its next token depends only on the current one."""

import torch

from sapo_bench.models import _FAMILIES, MICRO_MODELS, micro_config


def bigram_model(tokenizer, family: str, transitions: list[tuple[str, str]], strength: float = 2.0):
    """A real Qwen2/LLaMA whose next token depends only on the current one, with scripted transitions.

    Attention and MLP outputs are zeroed (o_proj, down_proj), so the residual stream is the current
    token's embedding and the logits are lm_head · norm(embedding): a bigram table. Each token named
    in `transitions` gets its own unit embedding (dimension i), the other tokens none on those
    dimensions, and each (a, b) puts `strength` on dimension node(a) of b's output row: after a, b
    leads by √hidden · strength ≈ 23 logits, so greedy and T = 1 sampling both follow the script.
    Embeddings are untied so that the two tables are independent.
    """
    name = next(n for n, (fam, _) in MICRO_MODELS.items() if fam == family and n.endswith("-1m"))
    config = micro_config(name, len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config.tie_word_embeddings = False
    _, cls = _FAMILIES[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(config).eval()
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, key, getattr(config, key))
    script_bigram(model, tokenizer, transitions, strength)
    return model


@torch.no_grad()
def script_bigram(model, tokenizer, transitions: list[tuple[str, str]], strength: float = 2.0) -> None:
    """(Re)write the bigram table of `bigram_model` in place: these transitions and no others."""
    tid = tokenizer.convert_tokens_to_ids
    nodes = {}
    for a, _ in transitions:
        nodes.setdefault(tid(a), len(nodes))
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    k = len(nodes)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    g = torch.Generator().manual_seed(1)
    embed.copy_(torch.randn(embed.shape, generator=g) * 0.02)
    head.copy_(torch.randn(head.shape, generator=g) * 0.02)
    embed[:, :k] = 0.0
    head[:, :k] = 0.0
    for token, i in nodes.items():
        embed[token].zero_()
        embed[token, i] = 1.0
    for a, b in transitions:
        head[tid(b), nodes[tid(a)]] += strength
