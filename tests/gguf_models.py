"""The slow real-model tests' fixture body: a kind-gguf model config loaded offline, or a skip that
says which package is missing."""

import pytest
from omegaconf import OmegaConf

from sapo_bench import models


def offline_gguf_model(cfg_path, find_file):
    """Yield (model, tokenizer) of the model config at cfg_path with the hub switched off; skip when
    gguf, accelerate or the package behind find_file (it raises FileNotFoundError) is missing."""
    pytest.importorskip("gguf", reason="transformers reads GGUF through the gguf package: pip install gguf")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF: pip install accelerate")
    try:
        find_file()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    try:
        yield models.load_policy(OmegaConf.load(cfg_path))
    finally:
        mp.undo()
