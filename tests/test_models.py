"""Model loading: the bundled SmolLM2 against transformers, tiny models, bad specs."""

from __future__ import annotations

import time

import pytest
import torch

from actsel.models import DEFAULT_MODEL, list_models, load_model
from actsel.models.loading import bundled_gguf_path


def test_smollm2_is_hooked_and_frozen(smollm2):
    from transformer_lens import HookedTransformer

    assert isinstance(smollm2, HookedTransformer)
    assert not smollm2.training
    assert all(not parameter.requires_grad for parameter in smollm2.parameters())
    assert smollm2.cfg.n_layers == 30
    assert smollm2.cfg.d_model == 576
    assert smollm2.cfg.n_key_value_heads == 3


@pytest.fixture(scope="module")
def hf_smollm2():
    """The same GGUF file read by transformers alone (about a minute on two cores)."""
    from transformers import AutoModelForCausalLM

    path = bundled_gguf_path()
    hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return hf_model.eval()


def test_smollm2_logits_match_transformers(smollm2, hf_smollm2):
    """The converted model reproduces the GGUF model as transformers runs it."""
    hf_model = hf_smollm2
    texts = ["Review: a gorgeous, witty film\nSentiment:", "The capital of France is"]
    tokenizer = smollm2.tokenizer
    encoded = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt")
    with torch.no_grad():
        expected = hf_model(encoded.input_ids, attention_mask=encoded.attention_mask).logits
        actual = smollm2(encoded.input_ids, attention_mask=encoded.attention_mask)
    real = encoded.attention_mask.bool()
    difference = (expected - actual).abs()[real].max().item()
    assert difference < 1e-3


def test_residual_matches_hidden_states(smollm2, hf_smollm2):
    """Unprocessed weights: hook_resid_post equals the HF hidden states, massive activation included."""
    hf_model = hf_smollm2
    tokens = smollm2.tokenizer("Review: a gorgeous, witty film\nSentiment:", return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = hf_model(tokens, output_hidden_states=True).hidden_states
        _, cache = smollm2.run_with_cache(tokens, names_filter="blocks.11.hook_resid_post")
    resid = cache["blocks.11.hook_resid_post"]
    torch.testing.assert_close(resid, hidden[12], rtol=1e-4, atol=1e-2)
    assert resid[0, 0, 507].abs().item() > 1e4


def test_second_load_is_fast(smollm2):
    start = time.perf_counter()
    model = load_model(DEFAULT_MODEL, device="cpu")
    elapsed = time.perf_counter() - start
    assert elapsed < 20.0, f"cached load took {elapsed:.1f} s"
    for name, parameter in smollm2.state_dict().items():
        assert torch.equal(parameter, model.state_dict()[name]), name


def test_tiny_models_are_seeded():
    first = load_model("tiny-llama", seed=3)
    second = load_model("tiny-llama", seed=3)
    other = load_model("tiny-llama", seed=4)
    assert torch.equal(first.W_E, second.W_E)
    assert not torch.equal(first.W_E, other.W_E)


def test_tiny_gpt2_runs(tiny_gpt2):
    tokens = torch.tensor([[1, 2, 3, 4]])
    logits = tiny_gpt2(tokens)
    assert logits.shape == (1, 4, tiny_gpt2.cfg.d_vocab)


def test_unknown_model_lists_valid_specs():
    with pytest.raises(ValueError, match="smollm2-135m") as info:
        load_model("smolm2-135m")
    assert "Close matches" in str(info.value)


def test_official_model_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE=1"):
        load_model("gpt2", device="cpu")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_model(str(tmp_path / "absent.gguf"))


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path))


def test_bad_dtype():
    with pytest.raises(ValueError, match="Unknown dtype"):
        load_model("tiny-llama", dtype="float8")


def test_list_models_marks_bundled():
    rows = list_models(include_official=True)
    specs = {row.spec: row for row in rows}
    assert specs[DEFAULT_MODEL].available_offline
    assert "meta-llama/Llama-3.2-3B" in specs
    assert "Qwen/Qwen2.5-3B" in specs


def test_smollm2_zero_shot_sst2(smollm2, data_dir):
    """Zero-shot SST-2 accuracy of the bundled model with the task's default template."""
    from actsel.tasks import load_task
    from actsel.utility.scoring import score_with_prefix

    task = load_task("sst2", data_dir=data_dir)
    queries = task.eval[:200]
    correct = score_with_prefix(smollm2, task, [], queries, "accuracy", batch_size=50)
    assert correct.shape == (200,)
    assert correct.mean() >= 0.70
