"""The micro world is searchable: BM25 with the question as the query finds the answer."""

import json

from sapo_bench.retrieval import BM25Retriever

# Measured on the default world (seed 0): 1.000 on nq, triviaqa and popqa (questions name their
# entity exactly; the difficulty of the micro world is in the hops, not in single-hop retrieval).
# A retriever, tokenisation or world change that loses answers fails here.
RECALL_FLOOR = 0.95


def test_bm25_answer_recall_at_3_on_single_hop_test_questions(micro_world):
    retriever = BM25Retriever(micro_world / "corpus.jsonl")
    for dataset in ("nq", "triviaqa", "popqa"):
        rows = [json.loads(line) for line in (micro_world / dataset / "test.jsonl").read_text().splitlines()]
        hits = retriever.search([r["question"] for r in rows], k=3)
        found = sum(any(g in p.contents for p in ps for g in r["golden_answers"]) for r, ps in zip(rows, hits))
        gold = sum(any(p.id == r["metadata"]["chain"][0] for p in ps) for r, ps in zip(rows, hits))
        recall = found / len(rows)
        print(f"{dataset}: answer recall@3 {recall:.3f}, gold passage@3 {gold / len(rows):.3f}")
        assert recall >= RECALL_FLOOR, (dataset, recall)
