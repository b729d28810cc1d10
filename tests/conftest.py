import pytest
import torch

# As sapo-train does (conf/config.yaml, cpu_threads): tests may start subprocesses that train too,
# and threads that outnumber the cores slow everyone down several times.
torch.set_num_threads(1)

from sapo_bench.world import WorldConfig, write_world


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory):
    """The default micro world (seed 0, scale 1), written once per test session (about a second)."""
    out = tmp_path_factory.mktemp("world")
    write_world(out, WorldConfig(seed=0))
    return out


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A small world (scale 0.05) for tests that need a tokenizer, a retriever and a model."""
    out = tmp_path_factory.mktemp("small_world")
    write_world(out, WorldConfig(seed=0, scale=0.05))
    return out


@pytest.fixture(scope="session")
def micro_tok(small_world):
    from sapo_bench.models import micro_tokenizer

    return micro_tokenizer(small_world, vocab_size=1024)


@pytest.fixture(scope="session")
def bm25(small_world):
    from sapo_bench.retrieval import BM25Retriever

    return BM25Retriever(small_world / "corpus.jsonl")
