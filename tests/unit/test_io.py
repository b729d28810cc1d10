import json

import pytest

from sapo_bench.io import atomic_write_json, atomic_write_text


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
