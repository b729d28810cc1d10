import json

import datasets
import pytest

from sapo_bench import data
from sapo_bench.data import (
    DATASETS, BadRow, eval_split, load_eval, load_split, load_train_mix, read_jsonl,
)

GOOD = {"id": "q1", "question": "who?", "golden_answers": ["Ann", "Anne"], "metadata": {"hops": 1}}


def write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines))
    return path


@pytest.mark.parametrize("bad,message", [
    ("{not json\n", r"invalid JSON"),
    ({"id": "x", "golden_answers": ["a"]}, r"'question' is missing"),
    ({"question": "  ", "golden_answers": ["a"]}, r"'question' is missing or not a non-empty string"),
    ({"question": "q"}, r"'golden_answers' is missing"),
    ({"question": "q", "golden_answers": []}, r"'golden_answers' is missing or not a non-empty list"),
    ({"question": "q", "golden_answers": "a"}, r"'golden_answers' is missing or not a non-empty list"),
    ({"question": "q", "golden_answers": ["a", 3]}, r"'golden_answers' holds a non-string"),
    ({"question": 5, "golden_answers": ["a"]}, r"'question' is missing or not a non-empty string"),
    ({"question": "q", "golden_answers": ["a"], "metadata": [1]}, r"'metadata' must be an object"),
    ("[1, 2]\n", r"expected a JSON object"),
])
def test_a_bad_row_names_file_and_line(tmp_path, bad, message):
    path = write(tmp_path / "nq" / "test.jsonl", [GOOD, "\n", bad, GOOD])
    with pytest.raises(BadRow, match=rf"^{path}:3: {message}"):
        read_jsonl(path)
    rows, skipped = read_jsonl(path, skip_bad=True)
    assert skipped == 1 and len(rows) == 2


def test_skipping_is_counted_and_logged(tmp_path, caplog):
    path = write(tmp_path / "nq" / "test.jsonl", [GOOD, {"question": "q"}, "oops\n"])
    rows, skipped = read_jsonl(path, skip_bad=True)
    assert (len(rows), skipped) == (1, 2)
    assert "skipped 2 bad row(s)" in caplog.text
    ds = load_split(tmp_path, "nq", "test", skip_bad=True)
    assert len(ds) == 1
    with pytest.raises(BadRow, match=r"test\.jsonl:2:"):
        load_split(tmp_path, "nq", "test")


def test_missing_ids_are_made_from_file_and_line(tmp_path):
    path = write(tmp_path / "nq" / "dev.jsonl", [{"question": "q", "golden_answers": ["a"]}])
    rows, _ = read_jsonl(path)
    assert rows[0]["id"] == "nq-dev-1" and rows[0]["metadata"] == {}


def test_split_rule_and_loaders_on_the_micro_world(micro_world):
    assert [eval_split(micro_world, d) for d in DATASETS] == ["test", "test", "test", "dev", "dev", "dev", "test"]
    ev = load_eval(micro_world)
    assert list(ev) == list(DATASETS) and len(ev["bamboogle"]) == 125
    row = ev["musique"][0]
    assert set(row) == {"id", "question", "golden_answers", "metadata", "data_source"}
    assert row["data_source"] == "musique" and json.loads(row["metadata"])["hops"] == 2
    mix = load_train_mix(micro_world, seed=1)
    sources = mix["data_source"]
    assert set(sources) == {"nq", "hotpotqa"} and len(mix) == sources.count("nq") + sources.count("hotpotqa")
    assert sources[:50] != sorted(sources[:50])  # shuffled, not nq then hotpotqa
    assert load_train_mix(micro_world, seed=1)["id"][:20] == mix["id"][:20]


def test_unknown_dataset_and_missing_split_are_clear(micro_world, tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'squad'; valid: nq, triviaqa, popqa"):
        load_split(micro_world, "squad", "test")
    with pytest.raises(FileNotFoundError, match=r"hotpotqa/test\.jsonl does not exist; splits of hotpotqa here: dev, train"):
        load_split(micro_world, "hotpotqa", "test")
    write(tmp_path / "nq" / "train.jsonl", [GOOD])
    with pytest.raises(FileNotFoundError, match="nq has neither a test nor a dev split"):
        eval_split(tmp_path, "nq")


def test_hub_rows_are_validated_like_files(monkeypatch):
    calls = []

    def fake_load_dataset(hub_id, config, split):
        calls.append((hub_id, config, split))
        return datasets.Dataset.from_list([GOOD, {**GOOD, "golden_answers": []}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(BadRow, match=r"RUC-NLPIR/FlashRAG_datasets/nq/test row 1: 'golden_answers'"):
        load_split(data.FLASHRAG_HUB_ID, "nq", "test")
    ds = load_split(data.FLASHRAG_HUB_ID, "nq", "test", skip_bad=True)
    assert len(ds) == 1 and calls[-1] == ("RUC-NLPIR/FlashRAG_datasets", "nq", "test")
