"""kagglecls.atomic: the one way outputs are written, whole or not at all."""

import os

import pytest

from kagglecls import atomic


@pytest.mark.parametrize("sync", [False, True])
def test_write_file_moves_the_temporary_into_place(tmp_path, sync):
    path = tmp_path / "new" / "figures.npz"
    with atomic.write_file(path, sync=sync) as temporary:
        assert temporary.parent == path.parent and temporary.name.startswith(".")
        assert temporary.suffix == ".npz"  # numpy and matplotlib choose the format by the suffix
        temporary.write_text("whole")
    assert path.read_text() == "whole"
    assert sorted(item.name for item in path.parent.iterdir()) == ["figures.npz"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with pytest.raises(KeyError, match="stopped"), atomic.write_file(path) as temporary:
        temporary.write_text("half")
        raise KeyError("stopped")
    assert path.read_text() == "old"
    assert sorted(item.name for item in tmp_path.iterdir()) == ["metrics.json"]


def test_remove_temporaries_deletes_only_what_a_killed_write_left(tmp_path):
    (tmp_path / "kept.jpg").write_text("an output")
    (tmp_path / ".hidden").write_text("someone else's")
    stale = tmp_path / f".kept.jpg.999{atomic.TEMPORARY_MARK}.jpg"
    stale.write_text("half")
    assert atomic.remove_temporaries(tmp_path) == [stale]
    assert sorted(item.name for item in tmp_path.iterdir()) == [".hidden", "kept.jpg"]
    assert atomic.remove_temporaries(tmp_path / "missing") == []


def test_building_folder_replaces_the_old_folder_whole(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic.building_folder(dest) as work:
        (work / "new.txt").write_text("half")
        raise RuntimeError
    assert sorted(item.name for item in dest.iterdir()) == ["old.txt"]
    with atomic.building_folder(dest) as work:
        (work / "new.txt").write_text("new")
    assert sorted(item.name for item in dest.iterdir()) == ["new.txt"]
    assert sorted(item.name for item in tmp_path.iterdir()) == ["out"]


def test_replace_folder_puts_the_old_folder_back_when_the_move_fails(tmp_path, monkeypatch):
    source, dest = tmp_path / "source", tmp_path / "dest"
    source.mkdir()
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    replace = os.replace

    def fail_onto_dest(from_path, to_path):
        if from_path == source:
            raise OSError("disk full")
        replace(from_path, to_path)

    monkeypatch.setattr(atomic.os, "replace", fail_onto_dest)
    with pytest.raises(OSError, match="disk full"):
        atomic.replace_folder(source, dest)
    assert (dest / "old.txt").read_text() == "old"
    assert sorted(item.name for item in tmp_path.iterdir()) == ["dest", "source"]
