"""Selectors: registry, vote-k on hand-built graphs, k-center, activation ranking, oracle, uncertainty, embeddings."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import softmax
from scipy.stats import entropy

from actsel.activations.table import FeatureTable
from actsel.selection import SELECTORS, SelectionContext, mean_pooled_embeddings, register_selector, select
from actsel.selection.predictions import prediction_entropy
from actsel.selection.selectors import covering_radius, greedy_k_center, k_means_representatives, standardize_columns
from actsel.selection.votek import (
    adjacency_from_neighbors,
    greedy_votek,
    knn_graph,
    stratified_votek,
    two_stage_votek,
    votek_scores,
)
from actsel.tasks import load_task
from actsel.utility.result import UtilityResult

# Hand-built coverage graph: VOTES[v] are the nodes that voter v covers (its k=2 nearest neighbours).
VOTES = {0: [1, 2], 1: [0, 2], 2: [0, 1], 3: [2, 4], 4: [3, 5], 5: [4, 3]}


def hand_graph() -> np.ndarray:
    return adjacency_from_neighbors(np.array([VOTES[v] for v in range(6)]), 6)


@pytest.fixture(scope="module")
def demo_task():
    return load_task("demo")


@pytest.fixture(scope="module")
def tiny_task():
    task = load_task("demo")
    task.answer_prefix = ""  # the byte-level tokenizer would give every label word the same first token
    return task


def synthetic_features(task, seed=0) -> FeatureTable:
    rng = np.random.default_rng(seed)
    columns = pd.DataFrame({
        "mask": ["causal"] * 4,
        "hook": ["blocks.0.hook_resid_post", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post",
                 "blocks.1.hook_mlp_out"],
        "layer": [0, 0, 1, 1],
        "span": ["example"] * 4,
        "statistic": ["mean", "kurtosis", "mean", "max_abs"],
    })
    values = rng.normal(size=(len(task.pool), 4)) * np.array([1.0, 50.0, 0.01, 3.0])
    return FeatureTable(values, columns, [e.uid for e in task.pool], [e.label for e in task.pool])


# --- registry -------------------------------------------------------------------------------------------------

def test_registry_rejects_duplicate_name():
    with pytest.raises(ValueError, match="already registered"):
        register_selector("random")(lambda context, budget, seed: [])


def test_registry_has_builtin_selectors():
    expected = {"random", "kate", "activation-rank", "activation-diversity", "uncertainty", "votek", "fast-votek",
                "oracle"}
    assert expected <= set(SELECTORS)
    assert SELECTORS["kate"].retrieval == "similar"
    assert SELECTORS["random"].retrieval == "fixed"


def test_select_unknown_name(demo_task):
    with pytest.raises(ValueError, match="Unknown selector 'nope'"):
        select("nope", SelectionContext(None, demo_task), 3)


@pytest.mark.parametrize("budget", [0, 25, -1, 2.5])
def test_select_rejects_invalid_budget(demo_task, budget):
    with pytest.raises(ValueError, match="from 1 to 24"):
        select("random", SelectionContext(None, demo_task), budget)


def test_select_budget_counts_only_unselected(demo_task):
    context = SelectionContext(None, demo_task, selected=[e.uid for e in demo_task.pool[:20]])
    with pytest.raises(ValueError, match="from 1 to 4"):
        select("random", context, 5)
    picked = select("random", context, 4, seed=3)
    assert sorted(picked) == sorted(e.uid for e in demo_task.pool[20:])


def test_random_is_seeded(demo_task):
    context = SelectionContext(None, demo_task)
    assert select("random", context, 6, seed=1) == select("random", context, 6, seed=1)
    assert select("random", context, 6, seed=1) != select("random", context, 6, seed=2)
    assert select("kate", context, 6, seed=1) == select("random", context, 6, seed=1)


# --- vote-k ---------------------------------------------------------------------------------------------------

def test_votek_scores_hand_graph():
    adjacency = hand_graph()
    none = np.zeros(6, dtype=bool)
    assert votek_scores(adjacency, none).tolist() == [2.0, 2.0, 3.0, 2.0, 2.0, 1.0]
    after_two = none.copy()
    after_two[2] = True
    scores = votek_scores(adjacency, after_two)
    # Voters 0, 1 and 3 cover node 2, so each now counts 1/10; voter 2 is selected and counts 0.
    assert scores[[0, 1, 3, 4, 5]] == pytest.approx([0.1, 0.1, 2.0, 1.1, 1.0])
    assert scores[2] == -np.inf


def test_greedy_votek_hand_graph():
    # Picks: 2 (score 3), then 3 (score 2 after the discount), then a four-way tie at 0.1 goes to node 0.
    assert greedy_votek(hand_graph(), 3) == [2, 3, 0]


def test_greedy_votek_respects_selected_and_candidates():
    adjacency = hand_graph()
    assert greedy_votek(adjacency, 1, selected=[2]) == [3]
    assert greedy_votek(adjacency, 2, candidates=[0, 4, 5]) == [0, 4]


def reference_scores(votes: dict[int, list[int]], selected: set[int], rho: float) -> dict[int, float]:
    """Su et al. (2022) score written as the set definition, one node at a time."""
    scores = {}
    for u in votes:
        if u in selected:
            continue
        voters = [v for v in votes if u in votes[v] and v not in selected]
        scores[u] = sum(rho ** -len([l for l in selected if l in votes[v]]) for v in voters)
    return scores


def test_votek_scores_match_set_definition():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(30, 5))
    neighbors = knn_graph(embeddings, 6)
    votes = {v: neighbors[v].tolist() for v in range(30)}
    adjacency = adjacency_from_neighbors(neighbors, 30)
    selected = {3, 7, 19}
    mask = np.isin(np.arange(30), list(selected))
    expected = reference_scores(votes, selected, 10.0)
    scores = votek_scores(adjacency, mask, 10.0)
    for u, value in expected.items():
        assert scores[u] == pytest.approx(value)


def test_knn_graph_excludes_self_and_caps_k():
    points = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    neighbors = knn_graph(points, 150)
    assert neighbors.shape == (4, 3)
    for node in range(4):
        assert node not in neighbors[node]
    assert neighbors[0, 0] == 1
    assert neighbors[3, 0] == 2  # cosine: (0, 1) is orthogonal to (-1, 0), the others point away


def test_stratified_votek_hand_graph():
    # Confidence order 5, 2, 1 | 0, 3, 4: the first stratum's best is 2 (score 3); after the
    # discount the second stratum's scores are 0: 0.1, 3: 2.0, 4: 1.1, so it gives 3.
    confidence = np.empty(6)
    confidence[[5, 2, 1, 0, 3, 4]] = np.arange(6)
    assert stratified_votek(hand_graph(), 2, confidence) == [2, 3]


def test_two_stage_votek_one_pick_per_stratum():
    rng = np.random.default_rng(1)
    embeddings = rng.normal(size=(40, 6))
    adjacency = adjacency_from_neighbors(knn_graph(embeddings, 8), 40)
    confidence = rng.normal(size=40)
    calls = []

    def confidence_fn(annotated, unlabeled):
        calls.append((list(annotated), list(unlabeled)))
        return confidence[unlabeled]

    picked = two_stage_votek(adjacency, 10, confidence_fn)
    assert len(picked) == 10
    assert len(set(picked)) == 10
    assert picked[0] == greedy_votek(adjacency, 1)[0]  # budget // 10 = 1 greedy pick first
    annotated, unlabeled = calls[0]
    assert annotated == picked[:1]
    order = np.array(unlabeled)[np.argsort(confidence[unlabeled], kind="stable")]
    strata = np.array_split(order, 9)
    for stratum in strata:
        assert len(set(stratum) & set(picked[1:])) == 1


def test_fast_votek_selector_uses_embeddings(demo_task):
    rng = np.random.default_rng(0)
    vectors = {e.uid: rng.normal(size=8) for e in demo_task.pool}
    context = SelectionContext(None, demo_task, embed_fn=lambda examples: np.stack([vectors[e.uid] for e in examples]))
    picked = select("fast-votek", context, 5, graph_k=4)
    adjacency = adjacency_from_neighbors(knn_graph(np.stack(list(vectors.values())), 4), 24)
    assert picked == [demo_task.pool[i].uid for i in greedy_votek(adjacency, 5)]


# --- diversity --------------------------------------------------------------------------------------------------

def test_k_center_on_a_line():
    points = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [20.0]])
    # From centre 0 the farthest point is 20; then 10 is 10 away from both centres.
    assert greedy_k_center(points, 2, initial=[0]) == [5, 3]
    assert covering_radius(points, [0, 5, 3]) == pytest.approx(2.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k_center_radius_within_twice_optimum(seed):
    points = np.random.default_rng(seed).normal(size=(10, 2))
    centers = greedy_k_center(points, 3, seed=seed)
    radius = covering_radius(points, centers)
    optimum = min(covering_radius(points, subset) for subset in itertools.combinations(range(10), 3))
    assert radius <= 2 * optimum + 1e-12
    # Farthest-first: the centres are pairwise at least the final covering radius apart.
    pairwise = [np.linalg.norm(points[a] - points[b]) for a, b in itertools.combinations(centers, 2)]
    assert min(pairwise) >= radius - 1e-12


def test_k_means_picks_one_per_cluster():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0]])
    points = np.concatenate([centre + rng.normal(size=(8, 2)) for centre in centres])
    picked = k_means_representatives(points, 3, seed=0)
    assert sorted(index // 8 for index in picked) == [0, 1, 2]


def test_standardize_columns():
    values = np.array([[1.0, 5.0, np.nan, 2.0], [3.0, 5.0, np.nan, np.nan], [5.0, 5.0, np.nan, 4.0]])
    out = standardize_columns(values)
    assert out.shape == (3, 2)  # the constant and the all-NaN columns are dropped
    assert out[:, 0] == pytest.approx((values[:, 0] - 3.0) / np.std(values[:, 0]))
    assert out[1, 1] == pytest.approx(0.0)  # NaN filled with the column mean


def test_activation_diversity_matches_k_center(demo_task):
    features = synthetic_features(demo_task)
    context = SelectionContext(None, demo_task, features=features)
    picked = select("activation-diversity", context, 5, seed=4, layer=0)
    points = standardize_columns(features.select(layer=0).values)
    assert picked == [demo_task.pool[i].uid for i in greedy_k_center(points, 5, seed=4)]
    kmeans = select("activation-diversity", context, 5, seed=4, method="kmeans")
    assert len(set(kmeans)) == 5


# --- activation rank, oracle -------------------------------------------------------------------------------------

def test_activation_rank_orders(demo_task):
    features = synthetic_features(demo_task)
    context = SelectionContext(None, demo_task, features=features)
    column = features.column(hook="blocks.0.hook_resid_post", statistic="kurtosis")
    uids = np.array(features.uids)
    highest = select("activation-rank", context, 4, hook="blocks.0.hook_resid_post", statistic="kurtosis")
    lowest = select("activation-rank", context, 4, hook="blocks.0.hook_resid_post", statistic="kurtosis",
                    order="lowest")
    assert highest == uids[np.argsort(-column)[:4]].tolist()
    assert lowest == uids[np.argsort(column)[:4]].tolist()


def test_activation_rank_nan_ranks_last(demo_task):
    features = synthetic_features(demo_task)
    features.values[:, 3] = np.nan
    features.values[5, 3] = 1.0
    context = SelectionContext(None, demo_task, features=features)
    assert select("activation-rank", context, 1, statistic="max_abs")[0] == demo_task.pool[5].uid


def test_activation_rank_unknown_feature(demo_task):
    context = SelectionContext(None, demo_task, features=synthetic_features(demo_task))
    with pytest.raises(ValueError, match="statistic='skew'.*valid values"):
        select("activation-rank", context, 3, statistic="skew")
    with pytest.raises(ValueError, match="2 features match"):
        select("activation-rank", context, 3, statistic="mean")
    with pytest.raises(ValueError, match="Unknown order"):
        select("activation-rank", context, 3, statistic="max_abs", order="up")


def test_activation_rank_needs_features(demo_task):
    with pytest.raises(ValueError, match="pass features"):
        select("activation-rank", SelectionContext(None, demo_task), 3, statistic="mean")


def test_oracle_returns_top_utilities(demo_task):
    rng = np.random.default_rng(0)
    uids = [e.uid for e in demo_task.pool]
    value = rng.normal(size=len(uids))
    utility = UtilityResult(uids, value, np.zeros(len(uids)), np.stack([value, value]), "one_shot", "accuracy")
    context = SelectionContext(None, demo_task, utility=utility)
    assert select("oracle", context, 5) == [uids[i] for i in np.argsort(-value)[:5]]
    partial = SelectionContext(None, demo_task, utility=utility.take(uids[:10]))
    with pytest.raises(ValueError, match="does not cover the candidate pool"):
        select("oracle", partial, 5)


# --- model-based: embeddings and uncertainty on the tiny model --------------------------------------------------

def test_mean_pooled_embeddings_match_unpadded_runs(tiny_llama, tiny_task):
    from actsel.prompts import PromptBuilder

    examples = tiny_task.pool[:5]
    batched = mean_pooled_embeddings(tiny_llama, tiny_task, examples, batch_size=5)
    builder = PromptBuilder(tiny_task, tiny_llama.tokenizer)
    name = f"blocks.{tiny_llama.cfg.n_layers - 1}.hook_resid_post"
    for row, example in enumerate(examples):
        tokens = torch.from_numpy(builder.build([], example).input_ids)[None]
        _, cache = tiny_llama.run_with_cache(tokens, names_filter=name)
        expected = cache[name][0, 1:].double().mean(dim=0).numpy()
        np.testing.assert_allclose(batched[row], expected, rtol=1e-4, atol=1e-5)


def test_uncertainty_entropy_matches_direct_run(tiny_llama, tiny_task):
    from actsel.prompts import PromptBuilder

    queries = tiny_task.pool[:4]
    demos = [tiny_task.pool[10], tiny_task.pool[11]]
    got = prediction_entropy(tiny_llama, tiny_task, [demos] * 4, queries, batch_size=4)
    builder = PromptBuilder(tiny_task, tiny_llama.tokenizer)
    label_ids = tiny_task.label_token_ids(tiny_llama.tokenizer)
    for row, query in enumerate(queries):
        prompt = builder.build(demos, query)
        logits = tiny_llama(torch.from_numpy(prompt.input_ids)[None])[0, prompt.score_positions[0]]
        expected = entropy(softmax(logits[label_ids].double().numpy()))
        assert got[row] == pytest.approx(expected, rel=1e-4)


def test_uncertainty_picks_highest_entropy(tiny_llama, tiny_task):
    context = SelectionContext(tiny_llama, tiny_task)
    picked = select("uncertainty", context, 4)
    values = prediction_entropy(tiny_llama, tiny_task, [[]] * len(tiny_task.pool), tiny_task.pool)
    threshold = np.sort(values)[-4]
    by_uid = dict(zip((e.uid for e in tiny_task.pool), values))
    assert all(by_uid[uid] >= threshold - 1e-12 for uid in picked)


def test_uncertainty_reuses_memo(tiny_llama, tiny_task):
    context = SelectionContext(tiny_llama, tiny_task)
    first = select("uncertainty", context, 3)
    assert len(context.memo[("uncertainty", ())]) == len(tiny_task.pool)
    assert select("uncertainty", context.with_selected([]), 3) == first


def test_votek_selector_on_tiny_model(tiny_llama, tiny_task):
    context = SelectionContext(tiny_llama, tiny_task, k=2)
    picked = select("votek", context, 12, graph_k=5)
    assert len(set(picked)) == 12
    # budget // 10 = 1 greedy pick comes first, the same as fast vote-k's first pick.
    assert picked[0] == select("fast-votek", context, 1, graph_k=5)[0]


@pytest.mark.slow
def test_smollm2_embeddings_match_unpadded(smollm2, data_dir):
    from actsel.prompts import PromptBuilder

    task = load_task("sst2", data_dir).subsample(n_pool=3, n_eval=1, seed=0)
    embeddings = mean_pooled_embeddings(smollm2, task, task.pool, batch_size=3)
    builder = PromptBuilder(task, smollm2.tokenizer)
    name = f"blocks.{smollm2.cfg.n_layers - 1}.hook_resid_post"
    for row, example in enumerate(task.pool):
        tokens = torch.from_numpy(builder.build([], example).input_ids)[None]
        _, cache = smollm2.run_with_cache(tokens, names_filter=name)
        activations = cache[name][0].double()
        np.testing.assert_allclose(embeddings[row], activations[1:].mean(dim=0).numpy(), rtol=1e-3, atol=1e-3)
        # BOS (about 4.4e3 in one dimension at the last block) would shift the mean visibly.
        assert np.abs(embeddings[row] - activations.mean(dim=0).numpy()).max() > 1.0
