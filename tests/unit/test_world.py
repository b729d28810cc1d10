import json
import os
import subprocess
import sys
import time
from collections import Counter

import pytest

from sapo_bench.data import DATASETS, MULTI_HOP
from sapo_bench.world import SPLITS, WorldConfig, write_world


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def corpus(world):
    return {r["id"]: r["contents"] for r in read(world / "corpus.jsonl")}


def test_same_seed_gives_byte_identical_files_whatever_the_hash_seed(tmp_path):
    outs = []
    for i, hash_seed in enumerate(["1", "2"]):
        out = tmp_path / f"w{i}"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-m", "sapo_bench.world", "--out", str(out), "--seed", "7", "--scale", "0.1"],
                       check=True, env=env, capture_output=True)
        outs.append(out)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*.jsonl"))
    assert len(files) == 15
    for f in files:
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f


def test_different_seeds_give_different_worlds(tmp_path):
    a = write_world(tmp_path / "a", WorldConfig(seed=1, scale=0.1))
    b = write_world(tmp_path / "b", WorldConfig(seed=2, scale=0.1))
    assert a["files"]["corpus.jsonl"]["sha256"] != b["files"]["corpus.jsonl"]["sha256"]
    assert a["files"]["nq/test.jsonl"]["sha256"] != b["files"]["nq/test.jsonl"]["sha256"]


def test_default_world_sizes_and_time(tmp_path):
    start = time.perf_counter()
    manifest = write_world(tmp_path, WorldConfig(seed=3))
    assert time.perf_counter() - start < 30
    assert 5_000 <= manifest["passages"] <= 50_000
    lines = {k: v["lines"] for k, v in manifest["files"].items()}
    assert lines["nq/train.jsonl"] >= 5000 and lines["hotpotqa/train.jsonl"] >= 5000
    assert lines["bamboogle/test.jsonl"] == 125
    for d in DATASETS:
        split = "test" if "test" in SPLITS[d] else "dev"
        if d != "bamboogle":
            assert 300 <= lines[f"{d}/{split}.jsonl"] <= 1000
    # the splits that exist mirror the real datasets
    assert sorted(k for k in lines if k.startswith("hotpotqa/")) == ["hotpotqa/dev.jsonl", "hotpotqa/train.jsonl"]
    assert sorted(k for k in lines if k.startswith("popqa/")) == ["popqa/test.jsonl"]


def test_every_question_is_answerable_from_its_chain(micro_world):
    passages = corpus(micro_world)
    for d, splits in SPLITS.items():
        for split in splits:
            for row in read(micro_world / d / f"{split}.jsonl"):
                meta = row["metadata"]
                assert meta["hops"] == len(meta["chain"]) >= 1
                assert all(pid in passages for pid in meta["chain"]), row["id"]
                for ev in meta["evidence"]:
                    assert ev["passage"] in meta["chain"] and ev["text"] in passages[ev["passage"]], row["id"]
                golds = row["golden_answers"]
                if golds not in (["yes"], ["no"]):
                    text = " ".join(passages[p] for p in meta["chain"])
                    assert golds[0] in text, row["id"]


def test_question_kinds_mirror_the_benchmarks(micro_world):
    hops = {}
    for d in DATASETS:
        split = "test" if d in ("nq", "triviaqa", "popqa", "bamboogle") else "dev"
        rows = read(micro_world / d / f"{split}.jsonl")
        hops[d] = Counter(r["metadata"]["hops"] for r in rows)
        assert {r["metadata"]["template"].split("/")[0] for r in rows} == {d}
    assert set(hops["nq"]) == set(hops["triviaqa"]) == set(hops["popqa"]) == {1}
    assert set(hops["musique"]) == {3}
    for d in MULTI_HOP:
        assert min(hops[d]) >= 2
    types = Counter(r["metadata"]["type"] for r in read(micro_world / "hotpotqa" / "dev.jsonl"))
    assert types["bridge"] > 0 and types["comparison"] > 0
    answers = Counter(r["golden_answers"][0] for r in read(micro_world / "hotpotqa" / "train.jsonl"))
    assert answers["yes"] > 100 and answers["no"] > 100


def test_eval_subjects_never_start_a_training_question(micro_world):
    def subjects(d, split):
        return {r["metadata"]["chain"][0] for r in read(micro_world / d / f"{split}.jsonl")}
    train = set().union(*(subjects(d, s) for d, sp in SPLITS.items() for s in sp if s == "train"))
    for d, splits in SPLITS.items():
        for split in splits:
            if split != "train":
                assert not subjects(d, split) & train, (d, split)


def test_questions_are_unique_across_all_files(micro_world):
    seen = Counter(r["question"] for d, sp in SPLITS.items() for s in sp for r in read(micro_world / d / f"{s}.jsonl"))
    assert seen.most_common(1)[0][1] == 1


def test_bamboogle_question_forms_never_occur_in_training(micro_world):
    titles = {pid: c.split("\n", 1)[0].lower() for pid, c in corpus(micro_world).items()}

    def forms(d, split):
        out = set()
        for r in read(micro_world / d / f"{split}.jsonl"):
            q = r["question"].lower()
            for pid in r["metadata"]["chain"]:
                q = q.replace(titles[pid], "X")
            out.add(q)
        return out
    bamboogle = forms("bamboogle", "test")
    train = forms("nq", "train") | forms("hotpotqa", "train")
    assert 3 <= len(bamboogle) <= 10 and 5 <= len(train) <= 20  # names removed: only the templates remain
    assert not bamboogle & train


def test_aliases_and_distractors(micro_world):
    rows = read(micro_world / "nq" / "test.jsonl")
    assert sum(len(r["golden_answers"]) > 1 for r in rows) > len(rows) / 2
    titles = [c.split("\n", 1)[0] for c in corpus(micro_world).values()]
    people = [t for t in titles if t.count(" ") == 1 and not t.startswith(("Port ", "Lake ", "Saint ", "The "))]
    surnames = Counter(t.split(" ")[1] for t in people)
    assert surnames.most_common(1)[0][1] >= 5  # families share surnames
    by_surname = {}
    for t in people:
        by_surname.setdefault(t.split(" ")[1], []).append(t.split(" ")[0])
    near = sum(1 for firsts in by_surname.values() for a in firsts for b in firsts
               if a < b and len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1)
    assert near >= 100  # near-namesakes: one letter apart, same surname


@pytest.mark.parametrize("bad", [["--scale", "-1"], ["--out"]])
def test_cli_rejects_bad_arguments(tmp_path, bad):
    args = ["--out", str(tmp_path)] + bad if bad[0] != "--out" else bad
    proc = subprocess.run([sys.executable, "-m", "sapo_bench.world", *args], capture_output=True, text=True)
    assert proc.returncode == 2
