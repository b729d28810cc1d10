"""Each logger on a (tiny) micro_smoke run, beside metrics.jsonl: its files are written, with the
names of docs/metrics.md, the values metrics.jsonl has, and the run's config; the run is killed
after step 2's checkpoint and resumed, as a sweep's runs may be. A logger whose package is not
installed is skipped (`make install` installs them all: they are in the dev extra)."""

import importlib.util
import json
import re
import struct
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from sapo_bench.train import train

from metric_names import documented
from test_faults import Crash, crash_after_save
from test_training import CONF, lines, tiny_overrides

INSTALLED = [name for name in ("tensorboard", "wandb", "mlflow") if importlib.util.find_spec(name)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The run folder and its metrics.jsonl lines: micro_smoke, sized down, every logger at once."""
    tmp = tmp_path_factory.mktemp("loggers")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=micro_smoke", *tiny_overrides(tmp, steps=3),
                                                       f"logger=[csv,{','.join(INSTALLED)}]"])
    with pytest.MonkeyPatch.context() as m:
        crash_after_save(m, 2)
        with pytest.raises(Crash):
            train(cfg)
    train(cfg)
    run_dir = Path(cfg.run_dir)
    assert [m["train/step"] for m in lines(run_dir) if "train/reward_mean" in m] == [1.0, 2.0, 3.0]
    return run_dir, lines(run_dir)


def names(jsonl) -> set[str]:
    """What every logger gets: metrics.jsonl's names but its own `optimizer_step`, the step itself."""
    return {k for m in jsonl for k in m} - {"optimizer_step"}


def series(jsonl, name) -> list[tuple[int, float]]:
    return [(m["optimizer_step"], m[name]) for m in jsonl if name in m]


def same_points(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> bool:
    """The same steps, and values equal to float32's precision (TensorBoard stores float32)."""
    return [s for s, _ in got] == [s for s, _ in want] and [v for _, v in got] == pytest.approx([v for _, v in want])


def test_metrics_jsonl_names_are_documented(run):
    _, jsonl = run
    assert {"train/reward_mean", "val/em", "test/em", "test/em/nq"} <= names(jsonl)
    assert all(documented(k) for k in names(jsonl)), [k for k in names(jsonl) if not documented(k)]


def test_tensorboard_event_files(run):
    pytest.importorskip("tensorboard", reason="logger=tensorboard needs pip install -e '.[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, jsonl = run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()  # both starts' event files
    assert set(events.Tags()["scalars"]) == names(jsonl)
    for name in ("train/reward_mean", "loss/policy", "val/em", "test/em/nq"):
        assert same_points([(e.step, e.value) for e in events.Scalars(name)], series(jsonl, name)), name
    hparams = yaml.safe_load((run_dir / "tensorboard" / "hparams.yaml").read_text())
    assert hparams["train"]["group_size"] == 3 and hparams["run_dir"] == str(run_dir)


def wandb_records(path: Path):
    """The records of an offline W&B run's transaction log (run-<id>.wandb): a 7-byte header, then
    LevelDB's log format, 32 KiB blocks of chunks (crc32, length, type: 1 full, 2 first, 3 middle,
    4 last), each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data, pos, record = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        record += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            parsed = wandb_internal_pb2.Record()
            parsed.ParseFromString(record)
            yield parsed
            record = b""


def test_wandb_offline_runs(run):
    pytest.importorskip("wandb", reason="logger=wandb needs pip install -e '.[wandb]'")
    run_dir, jsonl = run
    starts = sorted((run_dir / "wandb").glob("offline-run-*"))  # offline: nothing was sent
    assert len(starts) == 2  # killed, then resumed: a W&B run for each start, each finished
    history, exits = [], []
    for start in starts:
        for record in wandb_records(next(start.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                assert (record.run.display_name, record.run.project, record.run.run_group) == (
                    "qwen2-micro-1m/grpo/seed0", "sapo-bench", "micro/default")
            elif kind == "config":
                config = {u.key: json.loads(u.value_json) for u in record.config.update}
                assert config["train"]["group_size"] == 3 and config["run_dir"] == str(run_dir)
            elif kind == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
            elif kind == "exit":
                exits.append(record.exit.exit_code)
    assert exits == [1, 0]
    assert {k for h in history for k in h} == names(jsonl) | {"trainer/global_step", "_step", "_runtime", "_timestamp"}
    for name in ("train/reward_mean", "val/em", "test/em/nq"):
        assert same_points([(h["trainer/global_step"], h[name]) for h in history if name in h],
                           series(jsonl, name)), name


def test_mlflow_file_store(run):
    pytest.importorskip("mlflow", reason="logger=mlflow needs pip install -e '.[mlflow]'")
    run_dir, jsonl = run
    store = run_dir / "mlruns"
    experiment = next(p for p in store.iterdir() if (p / "meta.yaml").exists() and p.name not in ("0", ".trash"))
    assert yaml.safe_load((experiment / "meta.yaml").read_text())["name"] == "micro/default"
    runs = [p for p in experiment.iterdir() if p.is_dir()]
    metas = [yaml.safe_load((p / "meta.yaml").read_text()) for p in runs]
    assert sorted(m["status"] for m in metas) == [3, 4]  # one FINISHED, the killed start FAILED
    assert {m["run_name"] for m in metas} == {"qwen2-micro-1m/grpo/seed0"}
    values: dict[str, list] = {}
    for r in runs:
        assert (r / "params" / "train" / "group_size").read_text() == "3"
        for f in (r / "metrics").rglob("*"):
            if f.is_file():  # one line per point: timestamp value step
                values.setdefault(f.relative_to(r / "metrics").as_posix(), []).extend(
                    (int(step), float(value)) for _, value, step in map(str.split, f.read_text().splitlines()))
    # the file store's one rename: an average cannot be a file where its datasets need a folder
    assert set(values) == {re.sub(r"^((?:val|test)/em)$", r"\1/avg", k) for k in names(jsonl)}
    for name, stored in (("train/reward_mean", "train/reward_mean"), ("val/em", "val/em/avg"),
                         ("test/em/nq", "test/em/nq")):
        assert same_points(sorted(values[stored]), sorted(series(jsonl, name))), name


def test_csv(run):
    import pandas as pd

    run_dir, jsonl = run
    frames = [pd.read_csv(p) for p in sorted((run_dir / "csv").glob("version_*/metrics.csv"))]
    assert len(frames) == 2  # a version per start
    assert set().union(*(f.columns for f in frames)) == names(jsonl) | {"step"}
