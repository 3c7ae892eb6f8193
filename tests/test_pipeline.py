"""The pipeline behind `actsel run`: config validation, CLI errors, resumable stages."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actsel.cli.main import main
from actsel.pipeline.config import ConfigError, config_from_dict, dump_toml, read_config_file

TINY_RUN = [
    "--model", "tiny-llama", "--task", "demo", "--quiet",
    "--set", "features.chunk_size=4", "--set", "features.layers=[0,1]",
    "--set", "utility.chunk_size=4",
    "--strategies", "random,fast-votek,activation-rank", "--budgets", "4", "--seeds", "0",
    "--set", 'selection.rank_feature={"hook": "blocks.1.hook_mlp_out", "statistic": "kurtosis", "mask": "causal", "span": "example"}',
    "--set", "correlation.n_bootstrap=200",
]


def test_config_round_trip(tmp_path):
    config = config_from_dict({"task": {"name": "sst2", "n_pool": 50}, "features": {"layers": [3, 4]}})
    path = tmp_path / "run.toml"
    path.write_text(dump_toml(config))
    again = config_from_dict(read_config_file(path))
    assert again == config


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"task": {"nmae": "sst2"}}, "Unknown key task.nmae"),
        ({"task": {"n_pool": "many"}}, "wrong type"),
        ({"features": {"masks": ["causl"]}}, "valid: \\['causal'"),
        ({"utility": {"estimator": "shapley"}}, "valid: \\['one_shot'"),
        ({"selection": {"strategies": ["best"]}}, "selection.strategies"),
        ({"selection": {"budgets": [2], "k": 4}}, "smaller than k=4"),
        ({"task": {"name": "sst3"}}, "not a built-in task"),
        ({"outputs": "x"}, "Unknown top-level key"),
    ],
)
def test_config_rejects(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_yaml_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("task:\n  name: trec\n  n_eval: 10\nselection:\n  budgets: [8]\n")
    config = config_from_dict(read_config_file(path))
    assert config.task.name == "trec"
    assert config.selection.budgets == [8]


def test_files_task_clears_default_name():
    config = config_from_dict({"task": {"files": ["a.csv"]}})
    assert config.task.name is None


def test_cli_error_is_one_line(capsys):
    code = main(["run", "--task", "nope", "--quiet"])
    captured = capsys.readouterr()
    assert code == 1
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("actsel: error: task.name 'nope'")


def test_cli_missing_stage_input(tmp_path, capsys):
    code = main(["correlate", "--model", "tiny-llama", "--output", str(tmp_path / "empty"), "--quiet"])
    assert code == 1
    assert "run `actsel extract`" in capsys.readouterr().err


def _actsel(args, **kwargs):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "actsel", *args], env=env, **kwargs)


def test_run_writes_every_output(tmp_path):
    output = tmp_path / "run"
    assert main(["run", *TINY_RUN, "--output", str(output)]) == 0
    for name in ("config.toml", "versions.json", "features.parquet", "utility.parquet", "correlations.csv",
                 "max_abs_rho.csv", "reliability.json", "selection.csv", "report.html",
                 "figures/heatmap_by_mask.html", "figures/learning_curves.html"):
        assert (output / name).is_file(), name
    header = (output / "correlations.csv").read_text().splitlines()[0].split(",")
    for column in ("hook", "layer", "statistic", "mask", "rho", "ci_low", "ci_high", "p_value", "q_value", "n"):
        assert column in header
    report = (output / "report.html").read_text()
    assert "Largest |Spearman rho|" in report
    assert "Selection of demonstrations" in report
    assert "<script src=\"http" not in report
    assert len(report) > 1_000_000, "plotly.js should be inlined"
    curves = (output / "figures" / "learning_curves.html").read_text()
    assert "Selective annotation on demo: accuracy against budget" in curves
    # A second run finds every chunk cached and must still name the task and the metric.
    assert main(["run", *TINY_RUN, "--output", str(output)]) == 0
    curves = (output / "figures" / "learning_curves.html").read_text()
    assert "Selective annotation on demo: accuracy against budget" in curves


def test_sigkill_resume_is_identical(tmp_path):
    """A run killed with SIGKILL mid-extraction resumes without redoing chunks and ends identical."""
    reference = tmp_path / "reference"
    assert main(["run", *TINY_RUN, "--output", str(reference)]) == 0

    resumed = tmp_path / "resumed"
    process = _actsel(["run", *TINY_RUN, "--output", str(resumed)])
    deadline = time.monotonic() + 300
    chunks: list[Path] = []
    while time.monotonic() < deadline and process.poll() is None:
        chunks = list((resumed / "cache").glob("features-*/chunk-*.parquet")) if (resumed / "cache").exists() else []
        if chunks:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed; use smaller chunks"
    process.send_signal(signal.SIGKILL)
    process.wait()
    # A chunk is finished once its parquet file exists, because the side file is written first. An unfinished
    # chunk may be recomputed, which the next assertion would misread as wasted work.
    finished = list((resumed / "cache").glob("*/chunk-*.parquet"))
    before = {path: path.stat().st_mtime_ns for chunk in finished for path in (chunk, Path(f"{chunk}.json"))}
    assert before

    assert main(["run", *TINY_RUN, "--output", str(resumed)]) == 0
    for path, mtime in before.items():
        assert path.stat().st_mtime_ns == mtime, f"{path.name} was recomputed"
    assert (resumed / "correlations.csv").read_bytes() == (reference / "correlations.csv").read_bytes()
    assert (resumed / "selection.csv").read_bytes() == (reference / "selection.csv").read_bytes()
