import errno
import json
import os

import pytest

from sapo_bench import io
from sapo_bench.io import append_line, atomic_write_json, atomic_write_text


def test_atomic_write_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "sub" / "result.json"
    atomic_write_json(path, {"em": 0.5})
    atomic_write_json(path, {"em": 0.75})
    assert json.loads(path.read_text()) == {"em": 0.75}
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "result.json"
    atomic_write_text(path, "old")
    with pytest.raises(ValueError):
        atomic_write_json(path, {"em": float("nan")})  # NaN is not JSON: refused, not half-written
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def disk_full():
    return OSError(errno.ENOSPC, "No space left on device")


def test_a_write_that_runs_out_of_disk_leaves_the_old_result_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    atomic_write_json(path, {"em": 0.5})
    real_fdopen = os.fdopen

    class HalfThenFull:  # writes half of what it is given, then the disk is full
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise disk_full()

    monkeypatch.setattr(io.os, "fdopen", lambda *a, **k: HalfThenFull(real_fdopen(*a, **k)))
    with pytest.raises(OSError, match="No space left"):
        atomic_write_json(path, {"em": 0.75, "test": {"nq": {"em": 0.75}}})
    assert json.loads(path.read_text()) == {"em": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def short_write_then_full(monkeypatch, target):
    """os.write on `target` writes half its bytes, then fails: what a filling disk does."""
    real_write = os.write
    calls = []

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}") != str(target):
            return real_write(fd, data)
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise disk_full()

    monkeypatch.setattr(io.os, "write", write)
    return calls


def test_append_line_is_all_or_nothing(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    append_line(path, json.dumps({"train/step": 1}))
    with monkeypatch.context() as m:
        calls = short_write_then_full(m, path)
        with pytest.raises(OSError, match="No space left"):
            append_line(path, json.dumps({"train/step": 2, "loss/policy": 0.125}))
        assert len(calls) == 2  # half of the line did reach the file before it was cut back
    assert path.read_text() == '{"train/step": 1}\n'
    append_line(path, json.dumps({"train/step": 2}))  # space again: appends go on as if nothing happened
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"train/step": 1}, {"train/step": 2}]
    with pytest.raises(ValueError, match="one line"):
        append_line(path, "a\nb")


def test_a_folder_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "export"
    with pytest.raises(RuntimeError):
        with io.atomic_folder(out) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("killed while writing the weights")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary
    with io.atomic_folder(out) as tmp:
        (tmp / "config.json").write_text("{}")
        assert not out.exists()  # not before the block has filled it
    assert [p.name for p in out.iterdir()] == ["config.json"]
    with pytest.raises(FileExistsError, match="export exists"):
        with io.atomic_folder(out):
            pass
    with pytest.raises(RuntimeError):
        with io.atomic_folder(out, replace=True) as tmp:
            raise RuntimeError("killed")
    assert [p.name for p in out.iterdir()] == ["config.json"]  # the old one, untouched
    with io.atomic_folder(out, replace=True) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # the old one is gone, nothing left beside
