"""Readers for the built-in tasks, in the file layout of the few-shot-learning data folder.

Each reader takes the data folder and returns a ``Task``. The folder comes from
the ``data_dir`` argument, then ``$ACTSEL_DATA_DIR``, then a ``shared/data``
folder beside the source checkout. The demo task ships inside the package and
needs no folder.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from pathlib import Path

from actsel.tasks.base import Example, Task

logger = logging.getLogger(__name__)

DEMO_FILE = Path(__file__).parent / "data" / "demo.jsonl"

# Templates and verbalizers follow common practice for small causal LMs. Each
# verbalizer has one word per class, and a prompt builder checks that their first tokens differ.
SST2_VERBALIZER = {"negative": "negative", "positive": "positive"}
TREC_VERBALIZER = {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "person",
    "LOC": "location",
    "NUM": "number",
}
AGNEWS_VERBALIZER = {"World": "world", "Sports": "sports", "Business": "business", "Sci/Tech": "technology"}
CB_VERBALIZER = {"entailment": "true", "contradiction": "false", "neutral": "neither"}
RTE_VERBALIZER = {"entailment": "true", "not_entailment": "false"}
LAMA_TEMPLATES = {
    "P19": "{subject} was born in",
    "P36": "The capital of {subject} is",
    "P176": "{subject} is produced by",
}
MIT_MOVIES_SLOTS = ("Actor", "Award", "Character_Name", "Director", "Genre", "Opinion", "Origin", "Plot",
                    "Quote", "Relationship", "Soundtrack", "Year")
AGNEWS_POOL_FRACTION = 0.5
AGNEWS_SPLIT_SEED = 0


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """Return the data folder: the argument, then ``$ACTSEL_DATA_DIR``, then ``shared/data`` beside the checkout."""
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        origin = "the data_dir argument"
    elif os.environ.get("ACTSEL_DATA_DIR"):
        folder = Path(os.environ["ACTSEL_DATA_DIR"]).expanduser()
        origin = "ACTSEL_DATA_DIR"
    else:
        folder = Path(__file__).resolve().parents[3] / "shared" / "data"
        origin = "the default location beside the source checkout"
        if not folder.is_dir():
            raise FileNotFoundError(
                "No data folder given. Pass data_dir=..., or set ACTSEL_DATA_DIR to a folder laid out like "
                "the few-shot-learning data (sst2/, trec/, agnews/, ...). The demo task needs no folder."
            )
    if not folder.is_dir():
        raise FileNotFoundError(f"Data folder {folder} (from {origin}) does not exist.")
    return folder


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"Missing data file {path}; check the data folder layout.")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    with open(_require(path), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_demo() -> Task:
    rows = _read_jsonl(DEMO_FILE)
    examples = [Example({"text": row["text"]}, row["label"], f"demo/{i}") for i, row in enumerate(rows)]
    pool = [ex for ex, row in zip(examples, rows) if row["split"] == "pool"]
    evaluation = [ex for ex, row in zip(examples, rows) if row["split"] == "eval"]
    return Task(
        name="demo",
        kind="classification",
        pool=pool,
        eval=evaluation,
        input_template="Review: {text}\nSentiment:",
        verbalizer=dict(SST2_VERBALIZER),
        description="Short product and film reviews written for actsel, shipped in the package.",
    )


def load_sst2(data_dir: Path) -> Task:
    def read(split: str) -> list[Example]:
        examples = []
        with open(_require(data_dir / "sst2" / f"stsa.binary.{split}"), encoding="utf-8") as handle:
            for i, line in enumerate(handle):
                line = line.rstrip("\n")
                if not line:
                    continue
                label, text = line[0], line[2:]
                examples.append(Example({"text": text}, "positive" if label == "1" else "negative", f"sst2/{split}/{i}"))
        return examples

    return Task(
        name="sst2",
        kind="classification",
        pool=read("train"),
        eval=read("test"),
        input_template="Review: {text}\nSentiment:",
        verbalizer=dict(SST2_VERBALIZER),
        description="SST-2 (binary, lower-cased and tokenised); pool: train split, eval: test split.",
    )


def load_trec(data_dir: Path) -> Task:
    def read(file_name: str, split: str) -> list[Example]:
        examples = []
        with open(_require(data_dir / "trec" / file_name), encoding="latin-1") as handle:
            for i, line in enumerate(handle):
                line = line.strip()
                if not line:
                    continue
                tag, question = line.split(" ", 1)
                examples.append(Example({"text": question}, tag.split(":")[0], f"trec/{split}/{i}"))
        return examples

    return Task(
        name="trec",
        kind="classification",
        pool=read("train.txt", "train"),
        eval=read("test.txt", "test"),
        input_template="Question: {text}\nAnswer type:",
        verbalizer=dict(TREC_VERBALIZER),
        description="TREC question classification, 6 coarse classes; pool: train, eval: test.",
    )


def _clean_agnews(text: str) -> str:
    # The CSV escapes line breaks as backslashes and some characters as HTML
    # entities without the ampersand.
    text = text.replace("\\", " ").replace("#36;", "$").replace("#39;", "'").replace("quot;", '"')
    return " ".join(text.split())


def load_agnews(data_dir: Path) -> Task:
    names = {"1": "World", "2": "Sports", "3": "Business", "4": "Sci/Tech"}
    examples = []
    with open(_require(data_dir / "agnews" / "test.csv"), encoding="utf-8", newline="") as handle:
        for i, row in enumerate(csv.DictReader(handle)):
            fields = {"title": _clean_agnews(row["Title"]), "description": _clean_agnews(row["Description"])}
            examples.append(Example(fields, names[row["Class Index"]], f"agnews/test/{i}"))
    order = list(range(len(examples)))
    random.Random(AGNEWS_SPLIT_SEED).shuffle(order)
    cut = int(len(order) * AGNEWS_POOL_FRACTION)
    pool = [examples[i] for i in sorted(order[:cut])]
    evaluation = [examples[i] for i in sorted(order[cut:])]
    return Task(
        name="agnews",
        kind="classification",
        pool=pool,
        eval=evaluation,
        input_template="Article: {title}. {description}\nTopic:",
        verbalizer=dict(AGNEWS_VERBALIZER),
        description=(
            f"AG News test split (the only one in the folder), shuffled with seed {AGNEWS_SPLIT_SEED} and cut "
            f"into a pool ({AGNEWS_POOL_FRACTION:.0%}) and a disjoint evaluation set."
        ),
    )


def _load_nli(data_dir: Path, name: str, verbalizer: dict[str, str], template: str) -> Task:
    def read(split: str) -> list[Example]:
        rows = _read_jsonl(data_dir / name / f"{split}.jsonl")
        return [
            Example({"premise": row["premise"], "hypothesis": row["hypothesis"]}, row["label"], f"{name}/{split}/{i}")
            for i, row in enumerate(rows)
        ]

    return Task(
        name=name,
        kind="classification",
        pool=read("train"),
        eval=read("val"),
        input_template=template,
        verbalizer=dict(verbalizer),
        description=f"{name.upper()} (SuperGLUE); pool: train, eval: validation.",
    )


def load_cb(data_dir: Path) -> Task:
    return _load_nli(data_dir, "cb", CB_VERBALIZER, "{premise}\nQuestion: {hypothesis}. True, False, or Neither?\nAnswer:")


def load_rte(data_dir: Path) -> Task:
    return _load_nli(data_dir, "rte", RTE_VERBALIZER, "{premise}\nQuestion: {hypothesis} True or False?\nAnswer:")


def parse_bio_line(line: str, slot: str) -> tuple[str, str]:
    """Return (sentence, words of the first span tagged ``slot``) for one MIT Movies line."""
    tagged = line.split("<=>")[0].split()
    words, answer, in_span, done = [], [], False, False
    for item in tagged:
        word, _, tag = item.rpartition(":")
        words.append(word)
        if done:
            continue
        if tag == f"B-{slot}" and not in_span:
            in_span = True
            answer.append(word)
        elif tag == f"I-{slot}" and in_span:
            answer.append(word)
        elif in_span:
            done = True
    return " ".join(words), " ".join(answer)


def load_mit_movies(data_dir: Path, slot: str = "Genre") -> Task:
    if slot not in MIT_MOVIES_SLOTS:
        raise ValueError(f"Unknown MIT Movies slot {slot!r}; valid slots: {list(MIT_MOVIES_SLOTS)}.")

    def read(split: str) -> list[Example]:
        examples, skipped = [], 0
        with open(_require(data_dir / "slot-movies" / split), encoding="utf-8") as handle:
            for i, line in enumerate(handle):
                if not line.strip():
                    continue
                sentence, answer = parse_bio_line(line, slot)
                if not answer:
                    skipped += 1
                    continue
                examples.append(Example({"text": sentence}, answer, f"mit-movies-{slot.lower()}/{split}/{i}"))
        logger.info("MIT Movies %s: kept %d lines with a %s span, skipped %d without one", split, len(examples), slot, skipped)
        return examples

    label = slot.replace("_", " ").lower()
    return Task(
        name=f"mit-movies-{slot.lower()}",
        kind="generation",
        pool=read("train"),
        eval=read("test"),
        input_template="Sentence: {text}\n" + label.capitalize() + ":",
        description=(
            f"MIT Movies slot filling, slot {slot}: the answer is the words of the first {slot} span. "
            f"Lines without a {slot} span are skipped. Pool: train, eval: test."
        ),
        metadata={"slot": slot},
    )


def load_lama(data_dir: Path, relation: str) -> Task:
    if relation not in LAMA_TEMPLATES:
        raise ValueError(f"Unknown LAMA relation {relation!r}; valid: {sorted(LAMA_TEMPLATES)}.")

    def read(split: str) -> list[Example]:
        rows = _read_jsonl(data_dir / "lama" / "original_rob" / relation / f"{split}.jsonl")
        return [Example({"subject": row["sub_label"]}, row["obj_label"], f"lama-{relation}/{split}/{i}") for i, row in enumerate(rows)]

    return Task(
        name=f"lama-{relation}",
        kind="generation",
        pool=read("train"),
        eval=read("dev"),
        input_template=LAMA_TEMPLATES[relation],
        description=f"LAMA T-REx relation {relation}; the answer is the object label. Pool: train, eval: dev.",
    )
