"""Selection protocol: retrieval from the selected set only, evaluation, summary statistics, curves, errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import actsel.utility.scoring as scoring
from actsel.selection import (
    EmbeddingCache,
    SelectionResults,
    Strategy,
    evaluate_selection,
    learning_curves,
    retrieve_similar,
    run_selection,
)
from actsel.tasks import load_task


@pytest.fixture(scope="module")
def tiny_task():
    task = load_task("demo")
    task.answer_prefix = ""  # the byte-level tokenizer would give every label word the same first token
    return task


def random_vectors(examples, seed=0, d=6):
    rng = np.random.default_rng(seed)
    table = {}
    for example in examples:
        table[example.uid] = rng.normal(size=d)
    return table


# --- retrieval ----------------------------------------------------------------------------------------------------

def test_retrieve_similar_orders_most_similar_last():
    candidates = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0]])
    query = np.array([[1.0, 0.1]])
    assert retrieve_similar(query, ["q"], candidates, ["a", "b", "c", "d"], 3) == [[1, 2, 0]]


def test_retrieve_similar_never_returns_query():
    vectors = np.random.default_rng(0).normal(size=(8, 4))
    uids = [f"u{i}" for i in range(8)]
    retrieved = retrieve_similar(vectors[:3], uids[:3], vectors, uids, 4)
    for row, indices in enumerate(retrieved):
        assert row not in indices  # identical vector, similarity 1, still excluded
        assert len(indices) == 4
    with pytest.raises(ValueError, match="fewer than k=8"):
        retrieve_similar(vectors[:1], uids[:1], vectors, uids, 8)


def test_similar_evaluation_uses_only_selected(tiny_llama, tiny_task, monkeypatch):
    vectors = random_vectors(tiny_task.pool + tiny_task.eval)
    cache = EmbeddingCache(lambda examples: np.stack([vectors[e.uid] for e in examples]))
    selected = [e.uid for e in tiny_task.pool[:6]]
    # Queries include pool examples that are themselves selected: they must never see themselves.
    queries = tiny_task.pool[:3] + tiny_task.eval[:3]
    seen = {}

    def fake_score_prompts(model, task, demos_per_query, queries, metric, **kwargs):
        seen["demos"] = demos_per_query
        seen["queries"] = queries
        return np.zeros(len(queries))

    monkeypatch.setattr(scoring, "score_prompts", fake_score_prompts)
    evaluate_selection(tiny_llama, tiny_task, selected, queries, k=3, retrieval="similar", seed=0,
                       metric="accuracy", embeddings=cache)
    for demos, query in zip(seen["demos"], seen["queries"]):
        uids = [demo.uid for demo in demos]
        assert len(uids) == 3
        assert set(uids) <= set(selected)
        assert query.uid not in uids
        similarity = [np.dot(vectors[uid], vectors[query.uid]) / np.linalg.norm(vectors[uid]) for uid in uids]
        assert similarity == sorted(similarity)  # most similar last


def test_fixed_evaluation_matches_direct_scoring(tiny_llama, tiny_task):
    selected = [e.uid for e in tiny_task.pool[:5]]
    queries = tiny_task.eval[:6]
    got = evaluate_selection(tiny_llama, tiny_task, selected, queries, k=3, retrieval="fixed", seed=7,
                             metric="label_logprob")
    rng = np.random.default_rng(7)
    demos = [tiny_task.pool[i] for i in rng.choice(5, size=3, replace=False)]
    expected = scoring.score_prompts(tiny_llama, tiny_task, [demos] * len(queries), queries, "label_logprob")
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_fixed_evaluation_averages_prompts(tiny_llama, tiny_task):
    selected = [e.uid for e in tiny_task.pool[:5]]
    queries = tiny_task.eval[:4]
    got = evaluate_selection(tiny_llama, tiny_task, selected, queries, k=2, retrieval="fixed", seed=3,
                             metric="label_logprob", n_prompts=3)
    rng = np.random.default_rng(3)
    expected = []
    for _ in range(3):
        demos = [tiny_task.pool[i] for i in rng.choice(5, size=2, replace=False)]
        expected.append(scoring.score_prompts(tiny_llama, tiny_task, [demos] * 4, queries, "label_logprob"))
    np.testing.assert_allclose(got, np.mean(expected, axis=0), rtol=1e-4, atol=1e-5)


def test_evaluation_rejects_k_above_selected(tiny_llama, tiny_task):
    with pytest.raises(ValueError, match="k=4 is larger than the 3 selected"):
        evaluate_selection(tiny_llama, tiny_task, [e.uid for e in tiny_task.pool[:3]], tiny_task.eval[:2], k=4,
                           retrieval="fixed", seed=0, metric="accuracy")


# --- summary table --------------------------------------------------------------------------------------------------

def synthetic_results() -> SelectionResults:
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(6):
        for budget in (4, 8):
            base = 0.5 + 0.05 * rng.normal()
            for strategy, shift in (("random", 0.0), ("votek", 0.05), ("same", 0.0), ("offset", 0.05)):
                score = base + shift + (0.02 * rng.normal() if strategy == "votek" else 0.0)
                rows.append({"strategy": strategy, "selector": strategy, "retrieval": "fixed", "budget": budget,
                             "seed": seed, "score": score, "metric": "accuracy", "n_eval": 10, "rounds": 1,
                             "selected": "[]", "select_seconds": 0.0, "eval_seconds": 0.0})
    return SelectionResults(pd.DataFrame(rows), "accuracy", {"task": "synthetic"})


def test_table_statistics_match_scipy():
    results = synthetic_results()
    table = results.table().set_index(["strategy", "budget"])
    raw = results.raw
    for budget in (4, 8):
        votek = raw[(raw.strategy == "votek") & (raw.budget == budget)].sort_values("seed")["score"].to_numpy()
        random = raw[(raw.strategy == "random") & (raw.budget == budget)].sort_values("seed")["score"].to_numpy()
        row = table.loc[("votek", budget)]
        assert row["mean"] == pytest.approx(votek.mean())
        assert row["std"] == pytest.approx(votek.std(ddof=1))
        assert row["n_seeds"] == 6
        assert row["diff_vs_random"] == pytest.approx((votek - random).mean())
        assert row["p_value"] == pytest.approx(stats.ttest_rel(votek, random).pvalue)
        assert row["p_wilcoxon"] == pytest.approx(stats.wilcoxon(votek - random).pvalue)
        assert np.isnan(table.loc[("random", budget), "p_value"])
        # Identical scores: zero difference, no test.
        assert table.loc[("same", budget), "diff_vs_random"] == 0.0
        assert np.isnan(table.loc[("same", budget), "p_value"])
        # A constant non-zero difference has no variance, so no t-test (scipy would give p = 0).
        assert table.loc[("offset", budget), "diff_vs_random"] == pytest.approx(0.05)
        assert np.isnan(table.loc[("offset", budget), "p_value"])


def test_learning_curves_band(tmp_path):
    results = synthetic_results()
    figure = learning_curves(results)
    table = results.table()
    votek = table[table.strategy == "votek"].sort_values("budget")
    band, line = [trace for trace in figure.data if trace.legendgroup == "votek"]
    assert band.mode == "lines"  # plotly's default would mark the band's corners as points
    assert f"on {results.metadata['task']}:" in figure.layout.title.text
    np.testing.assert_allclose(line.y, votek["mean"])
    upper = np.asarray(band.y[:2])
    lower = np.asarray(band.y[2:])[::-1]
    np.testing.assert_allclose(upper, votek["mean"] + votek["std"])
    np.testing.assert_allclose(lower, votek["mean"] - votek["std"])
    results.save(tmp_path / "out")
    html = (tmp_path / "out" / "learning_curves.html").read_text()
    assert 'src="https://cdn.plot.ly' not in html  # plotly.js is embedded, so the file works offline
    assert len(html) > 1_000_000
    loaded = SelectionResults.load(tmp_path / "out")
    pd.testing.assert_frame_equal(loaded.table(), results.table())


# --- end to end on the tiny model -------------------------------------------------------------------------------

def test_run_selection_end_to_end(tiny_llama, tiny_task):
    results = run_selection(tiny_llama, tiny_task, ["random", "kate", Strategy("fast-votek", {"graph_k": 5})],
                            budgets=[4, 6], seeds=[0, 1], k=2, n_eval=8, progress=False)
    raw = results.raw
    assert len(raw) == 3 * 2 * 2
    pool = {e.uid for e in tiny_task.pool}
    for _, row in raw.iterrows():
        picked = json.loads(row["selected"])
        assert len(picked) == row["budget"]
        assert len(set(picked)) == row["budget"]
        assert set(picked) <= pool
        assert 0.0 <= row["score"] <= 1.0
    assert set(raw[raw.strategy == "kate"]["retrieval"]) == {"similar"}
    # kate annotates the same random sample, so only the retrieval differs.
    for budget in (4, 6):
        for seed in (0, 1):
            pick = raw[(raw.budget == budget) & (raw.seed == seed)].set_index("strategy")["selected"]
            assert pick["kate"] == pick["random"]
    table = results.table()
    assert set(table.columns) >= {"strategy", "budget", "mean", "std", "n_seeds", "diff_vs_random", "p_value"}
    assert len(table) == 6


def test_run_selection_rounds(tiny_llama, tiny_task):
    results = run_selection(tiny_llama, tiny_task, ["uncertainty"], budgets=[4], seeds=[0], k=2, n_eval=4,
                            rounds=2, progress=False)
    picked = json.loads(results.raw.loc[0, "selected"])
    assert len(set(picked)) == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budgets": [25]}, "budget 25 is invalid.*from 1 to 24"),
        ({"budgets": [0]}, "budget 0 is invalid"),
        ({"budgets": [4], "k": 5}, "k=5 is invalid.*smallest budget, 4"),
        ({"budgets": [4], "rounds": 5}, "rounds=5 is invalid"),
        ({"budgets": [4], "strategies": ["nope"]}, "Unknown selector 'nope'"),
        ({"budgets": [4], "strategies": ["random", "random"]}, "must be unique"),
        ({"budgets": [4], "metric": "bleu"}, "Unknown metric 'bleu'"),
        ({"budgets": [4], "retrieval": "bm25"}, "Unknown retrieval 'bm25'"),
    ],
)
def test_run_selection_rejects_bad_input(tiny_llama, tiny_task, kwargs, message):
    arguments = {"strategies": ["random"], "seeds": [0], "k": 2, "progress": False}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        run_selection(tiny_llama, tiny_task, **arguments)
