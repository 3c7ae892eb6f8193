"""SAE hooks, SAE features and SAE training (actsel.sae), on tiny models with small SAE-Lens SAEs."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import scipy.stats
import torch
from sae_lens import SAE, StandardSAE, StandardSAEConfig

import actsel
from actsel.activations.table import FeatureTable
from actsel.sae import (
    SAE_STATISTICS,
    attach_saes,
    extract_sae_features,
    latent_statistics,
    load_sae,
    top_latents,
)
from actsel.sae.train import evaluate_sae, hook_activations, train_sae

HOOK = "blocks.1.hook_resid_post"


def make_sae(d_in: int = 32, d_sae: int = 64, hook_name: str | None = HOOK, seed: int = 0) -> StandardSAE:
    """A randomly initialised SAE-Lens StandardSAE with non-zero biases."""
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.1)
        sae.b_dec.normal_(0.0, 0.1)
    if hook_name is not None:
        sae.cfg.metadata.hook_name = hook_name
    return sae


@pytest.fixture(scope="module")
def demo_task():
    task = actsel.load_task("demo")
    task.answer_prefix = ""  # the byte-level tiny tokenizer would give every label word the same first token
    return task


@pytest.fixture(scope="module")
def tiny_batch(tiny_llama, demo_task):
    builder = actsel.PromptBuilder(demo_task, tiny_llama.tokenizer)
    prompts = [builder.build([example]) for example in demo_task.pool[:4]]
    return actsel.collate(prompts, tiny_llama.tokenizer.pad_token_id)


def run_logits(model, batch):
    with torch.no_grad():
        return model(batch.tokens, attention_mask=batch.attention_mask)


def test_attach_without_splice_keeps_logits(tiny_llama, tiny_batch):
    sae = make_sae()
    reference = run_logits(tiny_llama, tiny_batch)
    with attach_saes(tiny_llama, sae) as capture:
        logits = run_logits(tiny_llama, tiny_batch)
    assert torch.equal(logits, reference)
    latents = capture.latents[HOOK]
    assert latents.shape == (*tiny_batch.tokens.shape, 64)
    _, cache = tiny_llama.run_with_cache(tiny_batch.tokens, attention_mask=tiny_batch.attention_mask)
    expected = sae.encode(cache[HOOK])
    torch.testing.assert_close(latents, expected)


def test_splice_with_error_term_keeps_logits(tiny_llama, tiny_batch):
    sae = make_sae()
    reference = run_logits(tiny_llama, tiny_batch)
    with attach_saes(tiny_llama, sae, splice=True, error_term=True):
        logits = run_logits(tiny_llama, tiny_batch)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


def test_splice_without_error_term_changes_logits(tiny_llama, tiny_batch):
    sae = make_sae()
    reference = run_logits(tiny_llama, tiny_batch)
    with attach_saes(tiny_llama, sae, splice=True, error_term=False, keep_reconstructions=True) as capture:
        logits = run_logits(tiny_llama, tiny_batch)
    assert (logits - reference).abs().max() > 1e-2
    torch.testing.assert_close(capture.reconstructions[HOOK], sae.decode(capture.latents[HOOK]))


def test_splice_error_term_passes_gradients_to_sae(tiny_llama, tiny_batch):
    sae = make_sae()
    with torch.enable_grad(), attach_saes(tiny_llama, sae, splice=True, error_term=True):
        logits = tiny_llama(tiny_batch.tokens, attention_mask=tiny_batch.attention_mask)
        logits[:, -1].logsumexp(-1).sum().backward()
    assert sae.W_dec.grad is not None
    assert sae.W_dec.grad.abs().sum() > 0


def test_hooks_removed_after_error(tiny_llama, tiny_batch):
    sae = make_sae()
    with pytest.raises(RuntimeError, match="inside the block"):
        with attach_saes(tiny_llama, sae):
            raise RuntimeError("failure inside the block")
    assert tiny_llama.hook_dict[HOOK].fwd_hooks == []
    with attach_saes(tiny_llama, sae):
        pass
    assert tiny_llama.hook_dict[HOOK].fwd_hooks == []


def test_mismatched_d_in_rejected(tiny_llama):
    with pytest.raises(ValueError, match=r"d_in=16 .* width 32"):
        with attach_saes(tiny_llama, make_sae(d_in=16)):
            pass


def test_unknown_hook_lists_close_matches(tiny_llama):
    with pytest.raises(ValueError, match="blocks.1.hook_resid_post"):
        with attach_saes(tiny_llama, {"blocks.1.hook_resid_pots": make_sae()}):
            pass


def test_sae_without_hook_name_needs_mapping(tiny_llama):
    with pytest.raises(ValueError, match="records no hook point"):
        with attach_saes(tiny_llama, [make_sae(hook_name=None)]):
            pass


def test_object_without_encode_rejected(tiny_llama):
    with pytest.raises(TypeError, match="no encode"):
        with attach_saes(tiny_llama, {HOOK: torch.nn.Linear(32, 64)}):
            pass


class PlainSae(torch.nn.Module):
    """A hand-written ReLU autoencoder with the minimal SAE interface."""

    def __init__(self, d_in: int, d_sae: int):
        super().__init__()
        self.d_in = d_in
        self.encoder = torch.nn.Linear(d_in, d_sae)
        self.decoder = torch.nn.Linear(d_sae, d_in)

    def encode(self, x):
        return torch.relu(self.encoder(x))

    def decode(self, latents):
        return self.decoder(latents)


def test_plain_module_sae_collects_latents(tiny_llama, tiny_batch):
    torch.manual_seed(1)
    sae = PlainSae(32, 48)
    with attach_saes(tiny_llama, {"blocks.0.hook_resid_post": sae}) as capture:
        run_logits(tiny_llama, tiny_batch)
    assert capture.latents["blocks.0.hook_resid_post"].shape[-1] == 48


def test_load_sae_round_trip(tmp_path):
    sae = make_sae()
    sae.save_model(tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    x = torch.randn(5, 32)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    assert loaded.cfg.metadata.hook_name == HOOK


def test_load_sae_release_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        load_sae("gpt2-small-res-jb", "blocks.8.hook_resid_pre")


def test_load_sae_unknown_release_lists_close(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="gpt2-small-res-jb"):
        load_sae("gpt2-small-res-jbb", "blocks.8.hook_resid_pre")


def test_load_sae_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="sae_id"):
        load_sae(tmp_path / "absent")


def test_latent_statistics_match_scipy():
    rng = np.random.default_rng(0)
    latents = np.maximum(rng.normal(size=(7, 50)), 0.0) * rng.exponential(size=(7, 50))
    statistics = latent_statistics(latents.astype(np.float32))
    flat = latents.astype(np.float32).astype(np.float64).ravel()
    expected = {
        "latent_mean": flat.mean(),
        "latent_variance": np.var(flat),
        "latent_skewness": scipy.stats.skew(flat, bias=True),
        "latent_kurtosis": scipy.stats.kurtosis(flat, fisher=True, bias=True),
        "latent_max": flat.max(),
        "latent_active_mean": flat[flat > 0].mean(),
        "l0": np.count_nonzero(latents, axis=1).mean(),
    }
    for name, value in expected.items():
        assert statistics[name] == pytest.approx(value, rel=1e-6), name
    assert set(statistics) == set(SAE_STATISTICS)


def test_top_latents_rank_by_sum_and_frequency():
    latents = np.zeros((3, 6))
    latents[:, 1] = [0.1, 0.1, 0.1]  # fires on every token, small
    latents[0, 4] = 5.0  # fires once, large
    latents[:2, 2] = [0.5, 0.5]
    by_activation, by_frequency = top_latents(latents, k=10)
    assert by_activation == [4, 2, 1]
    assert by_frequency == [1, 2, 4]
    statistics = latent_statistics(latents)
    assert statistics["top_latent_by_activation"] == 4
    assert statistics["top_latent_by_frequency"] == 1


def test_silent_span_gives_nan_top_latent():
    statistics = latent_statistics(np.zeros((4, 8)))
    assert np.isnan(statistics["top_latent_by_activation"])
    assert np.isnan(statistics["latent_skewness"])
    assert statistics["l0"] == 0


def test_extract_sae_features_match_unbatched_run(tiny_llama, demo_task):
    sae = make_sae()
    examples = demo_task.pool[:6]
    table = extract_sae_features(
        tiny_llama, demo_task, sae, examples, spans=("example", "last"), batch_size=4, progress=False
    )
    assert isinstance(table, FeatureTable)
    assert table.values.shape == (6, 2 * len(SAE_STATISTICS))
    assert set(table.columns["hook"]) == {HOOK + ".sae"}
    assert set(table.columns["layer"]) == {1}

    builder = actsel.PromptBuilder(demo_task, tiny_llama.tokenizer)
    for row, example in enumerate(examples):
        prompt = builder.build([example])
        _, cache = tiny_llama.run_with_cache(torch.from_numpy(prompt.input_ids)[None])
        start, end = prompt.demo_span(0, "example")
        latents = sae.encode(cache[HOOK][0, start:end]).detach().numpy()
        expected = latent_statistics(latents)
        for statistic in ("l0", "latent_mean", "latent_max", "latent_kurtosis", "top_latent_by_activation"):
            value = table.column(span="example", statistic=statistic)[row]
            assert value == pytest.approx(expected[statistic], rel=1e-4, abs=1e-6), statistic
        last = latent_statistics(latents[-1:])
        assert table.column(span="last", statistic="latent_max")[row] == pytest.approx(last["latent_max"], rel=1e-4)
        listed = table.metadata["sae_top_latents"][HOOK + ".sae"]["example"][example.uid]
        assert listed["by_activation"] == top_latents(latents)[0]


def test_extract_sae_features_rejects_unknown_span(tiny_llama, demo_task):
    with pytest.raises(ValueError, match="valid"):
        extract_sae_features(tiny_llama, demo_task, make_sae(), demo_task.pool[:2], spans=("query",), progress=False)


def test_isolated_sink_mask_equals_causal_for_one_demo(tiny_llama, demo_task):
    pytest.importorskip("actsel.masks.hooks", reason="actsel.masks is not available yet")
    sae = make_sae()
    examples = demo_task.pool[:4]
    causal = extract_sae_features(tiny_llama, demo_task, sae, examples, progress=False)
    sink = extract_sae_features(tiny_llama, demo_task, sae, examples, mask="isolated_sink", progress=False)
    np.testing.assert_allclose(sink.values, causal.values, rtol=1e-5, atol=1e-6)
    assert set(sink.columns["mask"]) == {"isolated_sink"}


def test_hook_activations_exclude_bos(tiny_llama, demo_task):
    examples = demo_task.eval[:5]
    activations = hook_activations(tiny_llama, demo_task, HOOK, examples)
    builder = actsel.PromptBuilder(demo_task, tiny_llama.tokenizer)
    lengths = [len(builder.build([example])) for example in examples]
    assert activations.shape == (sum(lengths) - len(examples), 32)
    first = builder.build([examples[0]])
    _, cache = tiny_llama.run_with_cache(torch.from_numpy(first.input_ids)[None])
    np.testing.assert_allclose(activations[: lengths[0] - 1], cache[HOOK][0, 1:].numpy(), rtol=1e-4, atol=1e-5)


def test_train_sae_tiny_saves_and_reloads(tiny_llama, demo_task, tmp_path):
    handler = signal.getsignal(signal.SIGINT)
    sae, metrics = train_sae(
        tiny_llama,
        demo_task,
        hook=HOOK,
        d_sae=64,
        training_tokens=32_768,
        out_dir=tmp_path / "sae",
        l1_coefficient=0.3,
        lr=3e-3,
        context_size=32,
        train_batch_size_tokens=256,
        store_batch_size_prompts=8,
        n_batches_in_buffer=16,
    )
    assert signal.getsignal(signal.SIGINT) is handler
    assert isinstance(sae, SAE)
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (32, 64)
    assert sae.cfg.metadata.hook_name == HOOK
    assert json.loads((tmp_path / "sae" / "actsel_metrics.json").read_text())["explained_variance"] == pytest.approx(
        metrics["explained_variance"]
    )
    # A fresh evaluation of the reloaded SAE gives the same numbers, and training beat a constant predictor.
    again = evaluate_sae(tiny_llama, demo_task, load_sae(tmp_path / "sae"), HOOK)
    assert again["explained_variance"] == pytest.approx(metrics["explained_variance"], rel=1e-6)
    assert metrics["explained_variance"] > 0.5
    assert 0 < metrics["l0"] < 64


def test_train_sae_rejects_small_buffer(tiny_llama, demo_task, tmp_path):
    with pytest.raises(ValueError, match="n_batches_in_buffer"):
        train_sae(tiny_llama, demo_task, hook=HOOK, d_sae=64, training_tokens=4096, out_dir=tmp_path / "s",
                  context_size=32, train_batch_size_tokens=1024, n_batches_in_buffer=4)


def test_train_sae_refuses_existing_folder(tiny_llama, demo_task, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        train_sae(tiny_llama, demo_task, hook=HOOK, d_sae=64, training_tokens=4096, out_dir=tmp_path / "taken")


@pytest.mark.slow
def test_train_sae_smollm2_layer15(smollm2, data_dir, tmp_path):
    """About 12 minutes on 2 busy CPU cores: 49,152 tokens of SST-2 pool text through 16 layers."""
    task = actsel.load_task("sst2", data_dir=data_dir)
    sae, metrics = train_sae(
        smollm2, task, training_tokens=49_152, out_dir=tmp_path / "sae", eval_examples=task.eval[:100]
    )
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (576, 2048)
    assert metrics["explained_variance"] > 0.4
    assert 1 < metrics["l0"] < 200


def test_sae_features_feed_correlation(tiny_llama, demo_task):
    correlation = pytest.importorskip("actsel.analysis.correlation")
    examples = demo_task.pool[:12]
    table = extract_sae_features(tiny_llama, demo_task, make_sae(), examples, progress=False)
    utility = np.random.default_rng(0).normal(size=len(examples))
    result = correlation.correlate(table, utility, n_bootstrap=0)
    assert len(result) == table.n_features
    row = result[result["statistic"] == "l0"].iloc[0]
    expected = scipy.stats.spearmanr(table.column(statistic="l0"), utility).statistic
    assert row["rho"] == pytest.approx(expected, abs=1e-12)
