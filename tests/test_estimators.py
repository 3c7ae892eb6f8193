"""Utility estimators checked against direct recomputation with uncached prompt scoring."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from actsel.tasks import load_task
from actsel.tasks.base import Task
from actsel.utility import (
    UTILITY_ESTIMATORS,
    EstimatorConfig,
    UtilityResult,
    estimate_utility,
    register_estimator,
    sample_prompt_demos,
    score_prompts,
)
from actsel.utility.estimators import _split_halves


@pytest.fixture
def byte_task():
    task = load_task("demo")
    task.answer_prefix = ""
    return task


def test_one_shot_matches_direct_scores(tiny_llama, byte_task):
    candidates, queries = byte_task.pool[:4], byte_task.eval[:6]
    result = estimate_utility(tiny_llama, byte_task, "one_shot", metric="label_logprob", candidates=candidates,
                              queries=queries, seed=5, progress=False)
    zero = score_prompts(tiny_llama, byte_task, [[]] * len(queries), queries, "label_logprob")
    gains = np.stack([
        score_prompts(tiny_llama, byte_task, [[c]] * len(queries), queries, "label_logprob") - zero
        for c in candidates
    ])
    assert result.uids == [c.uid for c in candidates]
    np.testing.assert_allclose(result.value, gains.mean(axis=1), atol=1e-6)
    np.testing.assert_allclose(result.stderr, gains.std(axis=1, ddof=1) / np.sqrt(len(queries)), atol=1e-6)
    half_a, half_b = _split_halves(len(queries), np.random.default_rng(5))
    assert set(half_a).isdisjoint(half_b)
    assert len(half_a) + len(half_b) == len(queries)
    np.testing.assert_allclose(result.halves[0], gains[:, half_a].mean(axis=1), atol=1e-6)
    np.testing.assert_allclose(result.halves[1], gains[:, half_b].mean(axis=1), atol=1e-6)
    assert result.metadata["zero_shot_mean"] == pytest.approx(zero.mean(), abs=1e-6)
    assert result.estimator == "one_shot"
    assert result.metric == "label_logprob"


def test_sampled_estimators_match_loops(tiny_llama, byte_task):
    candidates, queries = byte_task.pool[:5], byte_task.eval[:3]
    kwargs = dict(metric="label_logprob", candidates=candidates, queries=queries, seed=2, n_prompts=6, k=2,
                  progress=False)
    conditional = estimate_utility(tiny_llama, byte_task, "conditional", **kwargs)
    influence = estimate_utility(tiny_llama, byte_task, "influence", **kwargs)
    demos = conditional.metadata["prompt_demos"]
    assert demos == influence.metadata["prompt_demos"]  # same seed, same prompts
    assert all(len(d) == 2 and len(set(d)) == 2 for d in demos)

    by_uid = {c.uid: c for c in candidates}
    scores = np.array([
        score_prompts(tiny_llama, byte_task, [[by_uid[u] for u in d]] * len(queries), queries, "label_logprob").mean()
        for d in demos
    ])
    np.testing.assert_allclose(conditional.metadata["prompt_scores"], scores, atol=1e-6)

    for index, uid in enumerate(conditional.uids):
        inside = np.array([uid in d for d in demos])
        assert conditional.metadata["prompt_counts"][index] == inside.sum()
        if inside.sum() == 0:
            assert np.isnan(conditional.value[index])
            assert np.isnan(influence.value[index])
            continue
        assert conditional.value[index] == pytest.approx(scores[inside].mean() - scores.mean(), abs=1e-6)
        if inside.sum() < len(demos):
            expected = scores[inside].mean() - scores[~inside].mean()
            assert influence.value[index] == pytest.approx(expected, abs=1e-6)
        if 2 <= inside.sum() <= len(demos) - 2:
            welch = np.sqrt(scores[inside].var(ddof=1) / inside.sum() + scores[~inside].var(ddof=1) / (~inside).sum())
            assert influence.stderr[index] == pytest.approx(welch, abs=1e-6)
            sem = scores[inside].std(ddof=1) / np.sqrt(inside.sum())
            assert conditional.stderr[index] == pytest.approx(sem, abs=1e-6)

    half_a, _ = _split_halves(6, np.random.default_rng([2, 1]))
    first = [uid for uid in conditional.uids if any(uid in demos[i] for i in half_a)][0]
    col = conditional.uids.index(first)
    inside_a = np.array([first in demos[i] for i in half_a])
    expected = scores[half_a][inside_a].mean() - scores[half_a].mean()
    assert conditional.halves[0, col] == pytest.approx(expected, abs=1e-6)
    json.dumps(conditional.metadata)  # metadata must stay JSON-serialisable


def test_queries_per_prompt_subsets(tiny_llama, byte_task):
    result = estimate_utility(tiny_llama, byte_task, "influence", metric="accuracy", candidates=byte_task.pool[:4],
                              queries=byte_task.eval[:6], n_prompts=4, k=2, queries_per_prompt=2, progress=False)
    scores = np.array(result.metadata["prompt_scores"])
    assert set(np.round(scores * 2).astype(int)) <= {0, 1, 2}  # a mean of 2 accuracies is 0, 0.5 or 1
    assert result.metadata["queries_per_prompt"] == 2


def test_sample_prompt_demos_balanced(byte_task):
    rng = np.random.default_rng(0)
    draws = sample_prompt_demos(byte_task.pool, 3, 50, rng, label_balanced=True, labels=byte_task.labels)
    extra_labels = Counter()
    for draw in draws:
        assert len(set(draw.tolist())) == 3
        counts = Counter(byte_task.pool[i].label for i in draw)
        assert sorted(counts.values()) == [1, 2]
        extra_labels[max(counts, key=counts.get)] += 1
    assert set(extra_labels) == set(byte_task.labels)  # the remainder goes to either label


def test_sample_prompt_demos_seeded(byte_task):
    first = sample_prompt_demos(byte_task.pool, 4, 5, np.random.default_rng(7))
    again = sample_prompt_demos(byte_task.pool, 4, 5, np.random.default_rng(7))
    other = sample_prompt_demos(byte_task.pool, 4, 5, np.random.default_rng(8))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_sample_prompt_demos_errors(byte_task):
    positives = [ex for ex in byte_task.pool if ex.label == "positive"][:1]
    negatives = [ex for ex in byte_task.pool if ex.label == "negative"][:3]
    with pytest.raises(ValueError, match="need 2 candidates per label"):
        sample_prompt_demos(positives + negatives, 4, 2, np.random.default_rng(0), True, byte_task.labels)
    with pytest.raises(ValueError, match="exceeds the 4 candidates"):
        sample_prompt_demos(positives + negatives, 5, 2, np.random.default_rng(0))


def test_estimate_utility_errors(tiny_llama, byte_task):
    with pytest.raises(ValueError, match="Unknown utility estimator 'shapley'"):
        estimate_utility(tiny_llama, byte_task, "shapley")
    with pytest.raises(ValueError, match="at least 2 queries"):
        estimate_utility(tiny_llama, byte_task, queries=byte_task.eval[:1])
    with pytest.raises(ValueError, match="uids must be unique"):
        estimate_utility(tiny_llama, byte_task, candidates=[byte_task.pool[0]] * 2)
    generation = Task("gen", "generation", byte_task.pool, byte_task.eval, "{text}", answer_prefix="")
    with pytest.raises(ValueError, match="label_balanced needs a classification task"):
        estimate_utility(tiny_llama, generation, "conditional", label_balanced=True, n_prompts=2, k=1,
                         progress=False)
    with pytest.raises(ValueError, match="n_prompts must be at least 2"):
        EstimatorConfig(metric="accuracy", n_prompts=1)
    with pytest.raises(ValueError, match="k must be at least 1"):
        EstimatorConfig(metric="accuracy", k=0)


def test_registry_rejects_duplicates():
    assert set(UTILITY_ESTIMATORS) == {"one_shot", "conditional", "influence"}
    with pytest.raises(ValueError, match="already registered"):
        register_estimator("one_shot")(lambda *args: None)


def test_result_round_trip(tiny_llama, byte_task, tmp_path):
    result = estimate_utility(tiny_llama, byte_task, "conditional", metric="accuracy", candidates=byte_task.pool[:4],
                              queries=byte_task.eval[:2], n_prompts=3, k=2, mask="isolated", progress=False)
    path = tmp_path / "utility.parquet"
    result.save(path)
    loaded = UtilityResult.load(path)
    np.testing.assert_array_equal(loaded.value, result.value)
    assert loaded.metadata["mask"] == "isolated"
    assert loaded.metadata["prompt_demos"] == result.metadata["prompt_demos"]
