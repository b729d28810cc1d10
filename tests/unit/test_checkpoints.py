"""Checkpoint files: published by rename with the previous one kept; damaged ones found and skipped."""

import logging
import zipfile

import pytest
import torch

from sapo_bench.checkpoints import (LAST, PREVIOUS, CheckpointError, checkpoint_problem, publish,
                                    resume_checkpoint)


def save(path, value):
    torch.save({"step": value, "w": torch.arange(1000.0)}, path)
    return path


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zero_fill(path):
    path.write_bytes(bytes(path.stat().st_size))


def test_publish_renames_into_place_and_keeps_the_previous_one(tmp_path):
    last = tmp_path / LAST
    for step in (1, 2, 3):
        publish(save(tmp_path / "last.ckpt.tmp", step), last)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST, PREVIOUS]
    assert torch.load(last)["step"] == 3 and torch.load(tmp_path / PREVIOUS)["step"] == 2


def test_publish_of_a_sharded_folder_replaces_the_folders(tmp_path):
    last = tmp_path / LAST
    for step in (1, 2, 3):
        shard = tmp_path / "last.ckpt.tmp"
        shard.mkdir()
        (shard / "rank0.pt").write_text(str(step))
        publish(shard, last)
    assert (last / "rank0.pt").read_text() == "3" and (tmp_path / PREVIOUS / "rank0.pt").read_text() == "2"


@pytest.mark.parametrize("damage, says", [
    (truncate, "truncated or corrupt"),
    (zero_fill, "truncated or corrupt"),
    (lambda p: p.write_bytes(b""), "empty (0 bytes)"),
    (lambda p: p.write_bytes(b"not a checkpoint"), "truncated or corrupt"),
])
def test_damaged_checkpoints_are_named_as_such(tmp_path, damage, says):
    path = save(tmp_path / LAST, 1)
    assert checkpoint_problem(path) is None
    damage(path)
    assert says in checkpoint_problem(path)


def test_a_flipped_byte_fails_the_crc_check_that_torch_load_skips(tmp_path):
    path = save(tmp_path / LAST, 1)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    data[info.header_offset + 200] ^= 0xFF  # inside the tensor's bytes, past the member's header
    path.write_bytes(bytes(data))
    assert "fails its CRC check" in checkpoint_problem(path)


def test_a_zip_that_is_not_a_torch_checkpoint(tmp_path):
    path = tmp_path / LAST
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello.txt", "hi")
    assert "not a torch checkpoint" in checkpoint_problem(path)


def test_resume_prefers_the_latest_then_the_previous_then_none(tmp_path):
    assert resume_checkpoint(tmp_path / "missing") is None
    assert resume_checkpoint(tmp_path) is None
    save(tmp_path / PREVIOUS, 1)  # a kill between publish's two renames leaves only this one
    assert resume_checkpoint(tmp_path) == tmp_path / PREVIOUS
    save(tmp_path / LAST, 2)
    assert resume_checkpoint(tmp_path) == tmp_path / LAST


@pytest.mark.parametrize("damage", [truncate, zero_fill])
def test_a_damaged_latest_is_logged_moved_aside_and_the_previous_one_used(tmp_path, caplog, damage):
    save(tmp_path / PREVIOUS, 1)
    damage(save(tmp_path / LAST, 2))
    with caplog.at_level(logging.WARNING, logger="sapo_bench"):
        assert resume_checkpoint(tmp_path) == tmp_path / PREVIOUS
    assert f"checkpoint {tmp_path / LAST} is unusable (it is truncated or corrupt" in caplog.text
    assert f"resuming from the previous one, {tmp_path / PREVIOUS}" in caplog.text
    # Kept for a look, but out of the way: the next save must not rotate it over the good one.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt.bad", PREVIOUS]


def test_without_move_bad_nothing_is_renamed(tmp_path):
    save(tmp_path / PREVIOUS, 1)
    truncate(save(tmp_path / LAST, 2))
    assert resume_checkpoint(tmp_path, move_bad=False) == tmp_path / PREVIOUS
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST, PREVIOUS]


def test_no_usable_checkpoint_is_an_error_that_names_each_file_and_the_way_out(tmp_path):
    zero_fill(save(tmp_path / PREVIOUS, 1))
    truncate(save(tmp_path / LAST, 2))
    with pytest.raises(CheckpointError) as e:
        resume_checkpoint(tmp_path)
    msg = str(e.value)
    assert f"{tmp_path / LAST}: it is truncated" in msg and f"{tmp_path / PREVIOUS}: it is truncated" in msg
    assert f"mv {tmp_path} {tmp_path}.broken" in msg and "restart the run from step 0" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST, PREVIOUS]  # nothing moved: the user decides
