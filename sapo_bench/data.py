"""The seven QA benchmarks, in FlashRAG format, from a local folder or the hub.

A row is {id, question, golden_answers, metadata}. The same loaders read the micro world that
`sapo-world` writes and the real FlashRAG datasets (hub id `RUC-NLPIR/FlashRAG_datasets`, one
config per dataset), so the micro and paper paths share everything after this file.

Split rules follow Search-R1: evaluate on `test` where a dataset has one, else on `dev`; train on
the NQ + HotpotQA train splits mixed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

SINGLE_HOP = ("nq", "triviaqa", "popqa")
MULTI_HOP = ("hotpotqa", "2wikimultihopqa", "musique", "bamboogle")
DATASETS = SINGLE_HOP + MULTI_HOP
TRAIN_MIX = ("nq", "hotpotqa")
FLASHRAG_HUB_ID = "RUC-NLPIR/FlashRAG_datasets"

# Column headers in tables, as the papers print them.
DISPLAY = {"nq": "NQ", "triviaqa": "TriviaQA", "popqa": "PopQA", "hotpotqa": "HotpotQA",
           "2wikimultihopqa": "2Wiki", "musique": "Musique", "bamboogle": "Bamboogle"}

log = logging.getLogger(__name__)


class BadRow(ValueError):
    """A malformed question row; the message starts with "<file>:<line>: "."""


def check_row(row, where: str) -> dict:
    """Validate one FlashRAG row; return it with metadata defaulted to {}."""
    if not isinstance(row, dict):
        raise BadRow(f"{where}: expected a JSON object, got {type(row).__name__}")
    q = row.get("question")
    if not isinstance(q, str) or not q.strip():
        raise BadRow(f"{where}: 'question' is missing or not a non-empty string")
    golds = row.get("golden_answers")
    if not isinstance(golds, list) or not golds:
        raise BadRow(f"{where}: 'golden_answers' is missing or not a non-empty list")
    if not all(isinstance(g, str) for g in golds):
        raise BadRow(f"{where}: 'golden_answers' holds a non-string: {golds!r}")
    if "id" in row and not isinstance(row["id"], (str, int)):
        raise BadRow(f"{where}: 'id' must be a string or an integer")
    meta = row.get("metadata") or {}
    if not isinstance(meta, dict):
        raise BadRow(f"{where}: 'metadata' must be an object")
    return {"id": str(row.get("id", "")), "question": q, "golden_answers": golds, "metadata": meta}


def read_jsonl(path: str | Path, *, skip_bad: bool = False) -> tuple[list[dict], int]:
    """Read and validate a FlashRAG JSONL file. Returns (rows, number of bad rows skipped).

    A bad row raises BadRow naming the file and line, unless skip_bad, in which case it is
    skipped, counted and logged: never dropped silently.
    """
    path = Path(path)
    rows, skipped = [], 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BadRow(f"{where}: invalid JSON ({e.msg})") from None
                row = check_row(obj, where)
            except BadRow as e:
                if not skip_bad:
                    raise
                skipped += 1
                log.warning("skipped %s", e)
                continue
            row["id"] = row["id"] or f"{path.parent.name}-{path.stem}-{lineno}"
            rows.append(row)
    if skipped:
        log.warning("%s: skipped %d bad row(s), kept %d", path, skipped, len(rows))
    return rows, skipped


def _is_local(source: str | Path) -> bool:
    return Path(source).is_dir()


def available_splits(source: str | Path, dataset: str) -> list[str]:
    _check_dataset(dataset)
    if _is_local(source):
        return sorted(p.stem for p in (Path(source) / dataset).glob("*.jsonl"))
    import datasets

    return list(datasets.get_dataset_split_names(str(source), dataset))


def eval_split(source: str | Path, dataset: str) -> str:
    """Search-R1's rule: the test split where there is one, else dev."""
    splits = available_splits(source, dataset)
    for split in ("test", "dev"):
        if split in splits:
            return split
    raise FileNotFoundError(f"{source}: {dataset} has neither a test nor a dev split (found: {', '.join(splits) or 'none'})")


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")


def load_split(source: str | Path, dataset: str, split: str, *, skip_bad: bool = False, limit: int | None = None):
    """One split as a `datasets.Dataset` with columns id, question, golden_answers, metadata, data_source.

    source: a folder holding <dataset>/<split>.jsonl (the micro world, or FlashRAG files on disk),
    or a hub id (the paper path; needs network the first time, then the HF cache).
    """
    import datasets

    _check_dataset(dataset)
    if _is_local(source):
        path = Path(source) / dataset / f"{split}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; splits of {dataset} here: "
                                    f"{', '.join(available_splits(source, dataset)) or 'none'}")
        rows, _ = read_jsonl(path, skip_bad=skip_bad)
    else:
        hub = datasets.load_dataset(str(source), dataset, split=split)
        rows, skipped = [], 0
        for i, obj in enumerate(hub):
            try:
                rows.append(check_row(dict(obj), f"{source}/{dataset}/{split} row {i}"))
            except BadRow as e:
                if not skip_bad:
                    raise
                skipped += 1
                log.warning("skipped %s", e)
        if skipped:
            log.warning("%s/%s/%s: skipped %d bad row(s)", source, dataset, split, skipped)
    if limit is not None:
        rows = rows[:limit]
    for r in rows:
        r["data_source"] = dataset
        # metadata differs between datasets; JSON text keeps one arrow schema across the mix.
        r["metadata"] = json.dumps(r["metadata"], sort_keys=True)
    return datasets.Dataset.from_list(rows)


def load_eval(source: str | Path, names: tuple[str, ...] = DATASETS, **kwargs) -> dict:
    """{dataset: its eval split} for the seven test sets (Search-R1's split rule)."""
    return {d: load_split(source, d, eval_split(source, d), **kwargs) for d in names}


def load_train_mix(source: str | Path, names: tuple[str, ...] = TRAIN_MIX, *, seed: int = 0, **kwargs):
    """The NQ + HotpotQA train splits, concatenated and shuffled with `seed`."""
    import datasets

    parts = [load_split(source, d, "train", **kwargs) for d in names]
    return datasets.concatenate_datasets(parts).shuffle(seed=seed)


def load_train_and_validation(source: str | Path, names: tuple[str, ...] = TRAIN_MIX, *, n_val: int = 200,
                              seed: int = 0, **kwargs):
    """The train mix and a validation set per train dataset, disjoint from every eval split.

    A dataset whose eval split is `test` validates on its `dev` split. One whose eval split *is*
    `dev` (HotpotQA) validates on `n_val` questions held out of its train split, and those never
    reach training (the SAPO paper validated on test/dev items; this does not).
    """
    import datasets

    train_parts, val = [], {}
    for d in names:
        train = load_split(source, d, "train", **kwargs)
        if eval_split(source, d) == "test" and "dev" in available_splits(source, d):
            val[d] = load_split(source, d, "dev", limit=n_val, **kwargs)
        else:
            held = train.shuffle(seed=seed).select(range(min(n_val, len(train) // 10)))
            held_ids = set(held["id"])
            val[d] = held
            train = train.select([i for i, rid in enumerate(train["id"]) if rid not in held_ids])
        train_parts.append(train)
    return datasets.concatenate_datasets(train_parts).shuffle(seed=seed), val
