"""Built-in tasks and user tasks: loading, verbalizers, splits, bad input."""

from __future__ import annotations

import json

import pytest

from actsel.tasks import list_tasks, load_task, load_task_from_files
from actsel.tasks.builtin import parse_bio_line

EXPECTED_SIZES = {
    "sst2": (6920, 1821),
    "trec": (5452, 500),
    "cb": (250, 56),
    "rte": (2490, 277),
    "lama-P19": (800, 200),
    "lama-P36": (283, 70),
    "lama-P176": (800, 200),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_SIZES))
def test_builtin_sizes(name, data_dir):
    task = load_task(name, data_dir=data_dir)
    assert (len(task.pool), len(task.eval)) == EXPECTED_SIZES[name]


def test_sst2_labels(data_dir):
    task = load_task("sst2", data_dir=data_dir)
    first = task.pool[0]
    assert first.label == "positive"
    assert first.fields["text"].startswith("a stirring , funny")
    assert task.render_input(first).startswith("Review: a stirring")
    assert task.answer_text(first) == " positive"


def test_trec_coarse_labels(data_dir):
    task = load_task("trec", data_dir=data_dir)
    assert {ex.label for ex in task.pool} == set(task.labels)
    assert len(task.labels) == 6


def test_agnews_split_disjoint_and_seeded(data_dir):
    first = load_task("agnews", data_dir=data_dir)
    second = load_task("agnews", data_dir=data_dir)
    pool_ids = {ex.uid for ex in first.pool}
    eval_ids = {ex.uid for ex in first.eval}
    assert not pool_ids & eval_ids
    assert len(pool_ids) + len(eval_ids) == 7600
    assert [ex.uid for ex in first.pool] == [ex.uid for ex in second.pool]
    assert "\\" not in first.pool[0].fields["description"]


def test_mit_movies_answers(data_dir):
    task = load_task("mit-movies", data_dir=data_dir)
    assert task.kind == "generation"
    assert all(ex.label for ex in task.pool)
    director = load_task("mit-movies:Director", data_dir=data_dir)
    assert director.name == "mit-movies-director"


def test_parse_bio_line_first_span():
    line = "what:O 1968:B-Year british:B-Genre horror:I-Genre film:O drama:B-Genre <=> <NULL>"
    sentence, answer = parse_bio_line(line, "Genre")
    assert sentence == "what 1968 british horror film drama"
    assert answer == "british horror"


def test_lama_answers(data_dir):
    task = load_task("lama-P36", data_dir=data_dir)
    assert task.render_input(task.pool[0]).startswith("The capital of ")
    assert task.kind == "generation"


def test_demo_needs_no_data_dir(monkeypatch):
    monkeypatch.delenv("ACTSEL_DATA_DIR", raising=False)
    task = load_task("demo")
    assert len(task.pool) == 24
    assert len(task.eval) == 16
    assert {ex.label for ex in task.pool} == {"positive", "negative"}


def test_verbalizers_have_distinct_first_tokens(smollm2, data_dir):
    for name in list_tasks():
        task = load_task(name, data_dir=data_dir)
        if task.kind == "classification":
            ids = task.label_token_ids(smollm2.tokenizer)
            assert len(set(ids)) == len(ids), name


def test_verbalizer_collision_rejected(smollm2):
    task = load_task("demo")
    task.verbalizer = {"negative": "bad", "positive": "badness"}
    with pytest.raises(ValueError, match="same token"):
        task.label_token_ids(smollm2.tokenizer)


def test_unknown_task_lists_names():
    with pytest.raises(ValueError, match="Valid tasks") as info:
        load_task("sst-2")
    assert "sst2" in str(info.value)


def test_missing_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task("sst2", data_dir=tmp_path / "nowhere")


def test_missing_file(tmp_path):
    (tmp_path / "sst2").mkdir()
    with pytest.raises(FileNotFoundError, match="stsa.binary.train"):
        load_task("sst2", data_dir=tmp_path)


def test_user_jsonl_task(tmp_path):
    path = tmp_path / "reviews.jsonl"
    rows = [{"review": f"text {i}", "stars": "good" if i % 2 else "bad"} for i in range(10)]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    task = load_task_from_files(path, text_columns=["review"], label_column="stars",
                                input_template="Review: {review}\nVerdict:", eval_fraction=0.3)
    assert len(task.pool) == 7
    assert len(task.eval) == 3
    assert not {ex.uid for ex in task.pool} & {ex.uid for ex in task.eval}
    assert task.verbalizer == {"bad": "bad", "good": "good"}


def test_user_csv_missing_column(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("sentence,label\nhello,a\nworld,b\n")
    with pytest.raises(KeyError, match="'text'"):
        load_task_from_files(path, text_columns=["text"], label_column="label")


def test_label_outside_verbalizer(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label\nhello,a\nworld,b\nagain,c\nmore,a\n")
    with pytest.raises(ValueError, match="not in the verbalizer"):
        load_task_from_files(path, verbalizer={"a": "yes", "b": "no"}, eval_fraction=0.5)


def test_user_parquet_task(tmp_path):
    import pandas as pd

    path = tmp_path / "facts.parquet"
    pd.DataFrame({"subject": [f"s{i}" for i in range(6)], "object": [f"o{i}" for i in range(6)]}).to_parquet(path)
    task = load_task_from_files(path, kind="generation", text_columns=["subject"], label_column="object",
                                input_template="{subject} is")
    assert task.kind == "generation"
    assert task.answer_text(task.pool[0]).startswith(" o")


def test_hub_id_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="Could not load the dataset"):
        load_task_from_files("someone/not-a-cached-dataset")


def test_subsample_is_seeded(data_dir):
    task = load_task("sst2", data_dir=data_dir)
    first = task.subsample(n_pool=50, n_eval=20, seed=1)
    second = task.subsample(n_pool=50, n_eval=20, seed=1)
    assert [ex.uid for ex in first.pool] == [ex.uid for ex in second.pool]
    assert len(first.eval) == 20
