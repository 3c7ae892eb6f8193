"""Plots: values drawn match the inputs, hover text is escaped, HTML is self-contained and written atomically."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from scipy import stats

from actsel.activations.table import FeatureTable
from actsel.analysis import (
    correlate,
    correlation_heatmap,
    feature_scatter,
    massive_activation_map,
    moment_distributions,
    save_html,
    token_dimension_map,
)
from actsel.utility.result import UtilityResult

PAYLOAD = "<img src=x onerror=alert(1)>"
ESCAPED_PAYLOAD = "&lt;img src=x onerror=alert(1)&gt;"


@pytest.fixture(scope="module")
def table() -> FeatureTable:
    rng = np.random.default_rng(0)
    rows = [
        {"mask": mask, "hook": f"blocks.{layer}.{hook}", "layer": layer, "span": "example", "statistic": statistic}
        for mask in ("causal", "isolated")
        for hook in ("hook_resid_post", "hook_mlp_out")
        for layer in range(3)
        for statistic in ("mean", "kurtosis")
    ]
    n = 30
    values = rng.normal(size=(n, len(rows)))
    values[0, 1] = np.nan
    labels = ["<b>pos</b>" if i % 2 else "neg" for i in range(n)]
    return FeatureTable(values, pd.DataFrame(rows), [f"ex{i}" for i in range(n)], labels, {"task": "demo"})


@pytest.fixture(scope="module")
def utility(table) -> UtilityResult:
    rng = np.random.default_rng(1)
    value = table.values[:, 2] + rng.normal(size=table.n_examples)
    halves = np.stack([value + rng.normal(size=len(value)), value + rng.normal(size=len(value))])
    return UtilityResult(list(table.uids), value, np.linspace(0.05, 0.2, len(value)), halves, "one_shot", "accuracy")


@pytest.fixture(scope="module")
def correlations(table, utility) -> pd.DataFrame:
    return correlate(table, utility, n_bootstrap=100)


def test_heatmap_cells_equal_rho(correlations):
    fig = correlation_heatmap(correlations, facet="mask")
    assert len(fig.data) == 2
    for trace, mask in zip(fig.data, ("causal", "isolated")):
        assert list(trace.x) == [0, 1, 2]
        assert list(trace.y) == [
            "hook_resid_post / mean", "hook_resid_post / kurtosis", "hook_mlp_out / mean", "hook_mlp_out / kurtosis"
        ]
        z = np.asarray(trace.z, dtype=float)
        for i, row in enumerate(trace.y):
            hook, statistic = row.split(" / ")
            for j, layer in enumerate(trace.x):
                match = correlations[
                    (correlations["mask"] == mask)
                    & (correlations["hook"] == f"blocks.{layer}.{hook}")
                    & (correlations["statistic"] == statistic)
                ].iloc[0]
                assert z[i, j] == pytest.approx(match.rho)
                assert trace.customdata[i][j][0] == pytest.approx(match.ci_low)
                assert trace.customdata[i][j][2] == pytest.approx(match.q_value)
                assert trace.customdata[i][j][3] == match.n


def test_heatmap_colour_scale_fixed(correlations):
    fig = correlation_heatmap(correlations)
    assert fig.layout.coloraxis.cmin == -1.0
    assert fig.layout.coloraxis.cmax == 1.0
    colours = fig.layout.coloraxis.colorscale
    assert colours[0][1] != colours[-1][1]
    template = fig.data[0].hovertemplate
    for part in ("rho", "95% CI", "q =", "n ="):
        assert part in template


def test_heatmap_hook_facet_and_marks(correlations):
    marked = correlations.copy()
    marked["q_value"] = 0.5
    marked.loc[0, "q_value"] = 0.01  # causal, layer 0, resid_post, mean
    fig = correlation_heatmap(marked, facet="hook")
    assert [annotation.text for annotation in fig.layout.annotations] == ["hook = hook_resid_post", "hook = hook_mlp_out"]
    text = np.asarray(fig.data[0].text)
    assert text[0, 0] == "*"
    assert (text == "*").sum() == 1
    assert fig.data[0].y[0] == "causal / mean"


def test_heatmap_rejects_bad_input(correlations):
    with pytest.raises(ValueError, match="facet"):
        correlation_heatmap(correlations, facet="layer")
    with pytest.raises(ValueError, match="no column"):
        correlation_heatmap(correlations.drop(columns=["q_value"]))
    duplicated = pd.concat([correlations, correlations.assign(hook=correlations["hook"].str.replace(r"^blocks\.\d+\.", "", regex=True))])
    with pytest.raises(ValueError, match="share the cell"):
        correlation_heatmap(duplicated)


def test_save_html_offline_and_atomic(tmp_path, correlations):
    path = tmp_path / "figures" / "heatmap.html"
    assert save_html(correlation_heatmap(correlations), path) == path
    page = path.read_text(encoding="utf-8")
    assert "<html>" in page
    assert "cdn.plot.ly" not in page.split("<script")[0]
    assert 'src="https://cdn' not in page
    assert len(page) > 1_000_000  # plotly.js is inlined
    assert [p.name for p in path.parent.iterdir()] == ["heatmap.html"]
    with pytest.raises(TypeError, match="Figure"):
        save_html({"data": []}, tmp_path / "bad.html")
    assert not (tmp_path / "bad.html").exists()


def test_scatter_escapes_dataset_text(tmp_path, table, utility):
    texts = {uid: f"{PAYLOAD} review {i}" for i, uid in enumerate(table.uids)}
    fig = feature_scatter(table, utility, texts=texts, mask="causal", hook="blocks.1.hook_resid_post", layer=1,
                          span="example", statistic="mean")
    path = save_html(fig, tmp_path / "scatter.html")
    page = path.read_text(encoding="utf-8")
    assert ESCAPED_PAYLOAD in page
    assert "<img src=x" not in page
    assert "\\u003cimg src=x" not in page
    assert "&lt;b&gt;pos&lt;\\u002fb&gt;" in page
    assert "\\u003cb\\u003epos" not in page


def test_scatter_aligns_utility_by_uid(table, utility):
    order = np.random.default_rng(3).permutation(table.n_examples)
    shuffled = utility.take([table.uids[i] for i in order])
    key = dict(mask="isolated", hook="blocks.2.hook_mlp_out", layer=2, span="example", statistic="kurtosis")
    fig = feature_scatter(table, shuffled, **key)
    x = table.column(**key)
    for trace in fig.data:
        rows = [table.uids.index(custom[0]) for custom in trace.customdata]
        np.testing.assert_allclose(trace.x, x[rows])
        np.testing.assert_allclose(trace.y, utility.value[rows])
        np.testing.assert_allclose(trace.error_y.array, utility.stderr[rows])
    expected = stats.spearmanr(x, utility.value).statistic
    assert f"rho = {expected:.3f}" in fig.layout.title.text
    assert sum(len(trace.x) for trace in fig.data) == table.n_examples


def test_scatter_rejects_bad_input(table, utility):
    with pytest.raises(ValueError, match="features match"):
        feature_scatter(table, utility, statistic="mean")
    with pytest.raises(ValueError, match="texts has"):
        feature_scatter(table, utility, texts=["a"], mask="causal", hook="blocks.0.hook_mlp_out", layer=0,
                        span="example", statistic="mean")


def test_moment_distributions_values(table):
    fig = moment_distributions(table, statistic="mean", hook="hook_resid_post", mask="isolated")
    assert len(fig.data) == 1
    assert fig.layout.title.text.endswith("examples: isolated / hook_resid_post / example")
    assert sorted(set(fig.data[0].x)) == [0, 1, 2]
    fig = moment_distributions(table, statistic="mean", hook="blocks.0.hook_resid_post")
    assert sorted(set(fig.data[0].x)) == [0]
    fig = moment_distributions(table, statistic="mean", mask="causal")
    assert [trace.name for trace in fig.data] == ["causal / hook_resid_post / example", "causal / hook_mlp_out / example"]
    trace = fig.data[0]
    for layer in range(3):
        expected = table.column(mask="causal", hook=f"blocks.{layer}.hook_resid_post", layer=layer, span="example",
                                statistic="mean")
        drawn = np.asarray(trace.y)[np.asarray(trace.x) == layer]
        np.testing.assert_allclose(drawn, expected[np.isfinite(expected)])
    assert len(trace.y) == 3 * table.n_examples
    with_nan = moment_distributions(table, statistic="kurtosis", mask="causal").data[0]
    assert len(with_nan.y) == 3 * table.n_examples - 1  # the NaN of example 0 is left out
    violin = moment_distributions(table, statistic="kurtosis", kind="violin", log_y=False)
    assert isinstance(violin.data[0], go.Violin)
    assert len(violin.data) == 4


def test_moment_distributions_rejects_bad_input(table):
    with pytest.raises(ValueError, match="statistic"):
        moment_distributions(table, statistic="skew")
    with pytest.raises(ValueError, match="kind"):
        moment_distributions(table, kind="strip")
    with pytest.raises(ValueError, match="valid hooks"):
        moment_distributions(table, hook="hook_attn_out")


def test_massive_map_cells():
    massive = pd.DataFrame(
        {
            "layer": [11, 12, 12, 12, 13],
            "prompt": [0, 0, 1, 2, 0],
            "position": [0, 0, 0, 0, 3],
            "token": ["<|im_start|>", "<|im_start|>", "<|im_start|>", PAYLOAD, "\n"],
            "dimension": [507, 507, 507, 507, 138],
            "value": [2.2e4, -2.1e4, 1.0e3, 5.0e3, 300.0],
        }
    )
    fig = massive_activation_map(massive, n_layers=30)
    trace = fig.data[0]
    z = np.asarray(trace.z, dtype=float)
    assert z.shape == (30, 2)
    assert list(trace.x) == ["d138", "d507"]
    assert z[12, 1] == pytest.approx(np.log10(2.1e4))
    assert z[13, 0] == pytest.approx(np.log10(300.0))
    assert np.isnan(z[0]).all()
    assert trace.customdata[12][1][1] == "3"
    assert trace.customdata[12][1][4] == "&lt;|im_start|&gt;"
    linear = massive_activation_map(massive, log_color=False)
    assert np.asarray(linear.data[0].z, dtype=float).shape == (14, 2)
    assert np.asarray(linear.data[0].z, dtype=float)[11, 1] == pytest.approx(2.2e4)


def test_massive_map_hook_filter():
    massive = pd.DataFrame(
        {
            "hook": ["blocks.2.hook_resid_post", "blocks.2.hook_mlp_out"],
            "layer": [2, 2],
            "dimension": [5, 5],
            "value": [400.0, 9000.0],
        }
    )
    with pytest.raises(ValueError, match="several hooks"):
        massive_activation_map(massive)
    fig = massive_activation_map(massive, hook="hook_resid_post", log_color=False)
    assert np.asarray(fig.data[0].z, dtype=float)[2, 0] == pytest.approx(400.0)
    with pytest.raises(ValueError, match="hooks present"):
        massive_activation_map(massive, hook="hook_attn_out")


def test_massive_map_empty_and_bad_columns():
    empty = massive_activation_map(pd.DataFrame(columns=["layer", "prompt", "position", "token", "dimension", "value"]))
    assert "No massive activations" in empty.layout.annotations[0].text
    with pytest.raises(ValueError, match="dimension"):
        massive_activation_map(pd.DataFrame({"layer": [1], "value": [200.0]}))


def test_token_dimension_map():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(4, 10))
    values[0, 7] = -2.2e4
    tokens = ["<|im_start|>", "the", "the", PAYLOAD]
    fig = token_dimension_map(values, tokens, top_dims=3)
    trace = fig.data[0]
    assert list(trace.y) == ["0: &lt;|im_start|&gt;", "1: the", "2: the", "3: &lt;img src=x onerror=…"]
    peak = np.abs(values).max(axis=0)
    expected_dims = np.sort(np.argsort(-peak)[:3])
    assert list(trace.x) == [f"d{d}" for d in expected_dims]
    column = list(expected_dims).index(7)
    assert np.asarray(trace.z)[0, column] == pytest.approx(np.log10(2.2e4))
    assert np.asarray(trace.customdata)[0, column] == pytest.approx(-2.2e4)
    with pytest.raises(ValueError, match="tokens"):
        token_dimension_map(values, tokens[:2])
    with pytest.raises(ValueError, match="Invalid dims"):
        token_dimension_map(values, tokens, dims=[10])
