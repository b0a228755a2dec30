"""File-backed VGs: the sparse file, its removal by identity, the registry, loop devices."""

from __future__ import annotations

import os

import pytest

from thinstack import backing

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def test_remove_file_unlinks_only_the_file_the_creation_made(tmp_path):
    made = tmp_path / "pool.img"
    ident = backing.make_sparse_file(made, GiB)
    assert made.stat().st_size == GiB and made.stat().st_mode & 0o777 == 0o600
    made.rename(tmp_path / "moved.img")
    made.write_bytes(b"someone else's")  # the name given to another file
    backing.remove_file(made, ident)
    assert made.read_bytes() == b"someone else's"
    made.unlink()
    made.symlink_to(tmp_path / "target")
    (tmp_path / "target").write_bytes(b"kept")
    backing.remove_file(made, ident)
    assert (tmp_path / "target").read_bytes() == b"kept" and made.is_symlink()
    made.unlink()
    ident = backing.make_sparse_file(made, MiB)
    backing.remove_file(made, ident)
    assert not made.exists()
    backing.remove_file(made, ident)  # gone already: fine


def test_the_backing_file_is_never_one_planted_under_its_name(tmp_path):
    planted = tmp_path / "pool.img"
    planted.symlink_to(tmp_path / "victim")
    with pytest.raises(FileExistsError):
        backing.make_sparse_file(planted, GiB)
    assert not (tmp_path / "victim").exists()
    planted.unlink()
    planted.write_bytes(b"data")
    with pytest.raises(FileExistsError):
        backing.make_sparse_file(planted, GiB)
    assert planted.read_bytes() == b"data"
    backing.make_sparse_file(planted, MiB, reuse=True)  # the interrupted creation's own
    assert planted.stat().st_size == MiB and planted.read_bytes()[:4] == bytes(4)


def test_registry_round_trip(tmp_path):
    assert backing.registered() == {}
    backing.register("vg0", tmp_path / "a.img")
    backing.register("vg1", tmp_path / "b.img")
    backing.register("vg0", tmp_path / "c.img")  # replaced atomically
    assert backing.registered() == {"vg0": tmp_path / "c.img", "vg1": tmp_path / "b.img"}
    backing.unregister("vg0")
    backing.unregister("vg0")
    assert backing.registered() == {"vg1": tmp_path / "b.img"}


def test_loops_are_found_by_their_backing_files_identity():
    listing = """{"loopdevices": [
        {"name": "/dev/loop0", "back-maj:min": "       0:18 ", "back-ino": 2152684},
        {"name": "/dev/loop1", "back-maj:min": "8:1", "back-ino": "2152684"},
        {"name": "/dev/loop2", "back-maj:min": null, "back-ino": null}]}"""
    assert backing.loops_by_identity(listing, "18:2152684") == ["/dev/loop0"]
    assert backing.loops_by_identity(listing, f"{os.makedev(8, 1)}:2152684") == ["/dev/loop1"]
    assert backing.loops_by_identity("", "18:1") == []
