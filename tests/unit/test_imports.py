"""Import decisions without a kernel: sizes, capacity, policy, which journal entry to work
under, when a failed import is kept for --resume; and the progress line."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tests.fakes import FakeRunner
from thinstack import imports, lvm
from thinstack.dm.command import CommandError
from thinstack.errors import NoSpace, NotFound, Refused, ThinstackError
from thinstack.importers import ImageError
from thinstack.journal import Entry, Journal
from thinstack.lvm import BadName, Lvm, VolumeRef
from thinstack.progress import Bar, line

GiB, MiB = 1 << 30, 1 << 20
REF = VolumeRef("vg0", "disk")


def test_the_volume_takes_the_image_size_or_a_larger_one_asked_for():
    assert imports.volume_size(10 * GiB, None) == 10 * GiB
    assert imports.volume_size(10 * GiB, 20 * GiB) == 20 * GiB
    with pytest.raises(ThinstackError, match="smaller than the image's virtual size"):
        imports.volume_size(10 * GiB, 5 * GiB)
    with pytest.raises(ThinstackError, match="empty"):
        imports.volume_size(0, None)


def test_only_data_must_fit_counting_what_growth_can_add():
    imports.check_capacity(0, 1 * MiB, 0)  # a 127 GB empty image into a tiny pool is fine
    imports.check_capacity(3 * GiB, 1 * GiB, 2 * GiB)
    with pytest.raises(NoSpace, match="holds 3GiB of data; the pool has 1GiB free"):
        imports.check_capacity(3 * GiB, 1 * GiB, 2 * GiB - 1)


def test_the_policy_takes_allowed_folders_and_a_size_limit_from_the_environment():
    p = imports.policy((Path("/srv/images"),), env={})
    assert p.allowed_dirs == (Path("/srv/images"),)
    assert p.max_virtual_size == imports.DEFAULT_MAX_VIRTUAL_SIZE == 16 << 40
    assert imports.policy((), env={imports.MAX_VIRTUAL_SIZE_ENV: "2T"}).max_virtual_size == 2 << 40
    with pytest.raises(ThinstackError, match=imports.MAX_VIRTUAL_SIZE_ENV):
        imports.policy((), env={imports.MAX_VIRTUAL_SIZE_ENV: "lots"})


def test_the_temporary_volume_is_named_after_the_target_and_must_be_a_valid_name():
    assert imports.temp_ref(REF) == VolumeRef("vg0", "disk.importing")
    with pytest.raises(BadName):
        imports.temp_ref(VolumeRef("vg0", "x" * 127))


def entry(*steps: str, **args) -> Entry:
    return Entry(id="abc", op="import", vg="vg0", args={"name": "disk", **args},
                 steps=list(steps))


def test_the_copy_position_is_the_last_journalled_one():
    assert imports.copied(entry()) == 0
    assert imports.copied(entry("created:disk.importing", "copied:134217728")) == 134217728


def test_a_failure_is_kept_for_resume_only_once_the_volume_exists_and_the_image_is_sound():
    made = entry("created:disk.importing")
    assert imports.resumable(KeyboardInterrupt(), made)
    assert imports.resumable(OSError(28, "No space left on device"), made)
    assert not imports.resumable(ImageError("/x.qcow2", "corrupt compressed cluster"), made)
    assert not imports.resumable(NoSpace("full"), entry())
    assert not imports.resumable(KeyboardInterrupt(), entry())


def test_a_source_is_the_same_only_if_nothing_about_it_changed():
    before = {"size": 1, "mtime_ns": 2, "inode": 3, "device": 4, "format": "vhd",
              "virtual_size": 5}
    assert imports.changed(before, dict(before)) == []
    assert imports.changed(before, {**before, "mtime_ns": 9, "inode": 8}) == ["inode", "mtime_ns"]


IDENT = {"size": 1, "mtime_ns": 2, "inode": 3, "device": 4, "format": "raw", "virtual_size": 1}


def _entry(journal, *args, resume, pool_name=None):
    """imports._entry's entry as operation() begins it: the interrupted one, or a new one."""
    found = imports._entry(journal, *args, resume, pool_name)
    return found if isinstance(found, Entry) else journal.begin("import", REF.vg, **found)


def test_a_new_import_begins_a_journal_entry(tmp_path):
    journal = Journal(tmp_path)
    e = _entry(journal, REF, Path("/img.raw"), IDENT, 4096, resume=False)
    assert (e.op, e.vg, e.args) == ("import", "vg0", {"name": "disk", "size": 4096,
                                                      "path": "/img.raw", "source": IDENT,
                                                      "pool": None})
    assert [p.id for p in journal.pending("vg0")] == [e.id]


def test_the_pool_is_journalled_and_a_resume_keeps_the_first_runs(tmp_path):
    """`--pool` goes in the entry's args: a resumed run (which may not name it) continues in
    the pool the first run chose."""
    journal = Journal(tmp_path)
    first = _entry(journal, REF, Path("/img.raw"), IDENT, 4096, resume=False, pool_name="t1")
    assert first.args["pool"] == "t1"
    again = _entry(journal, REF, Path("/img.raw"), IDENT, 0, resume=True)
    assert again.id == first.id and again.args["pool"] == "t1"


def test_a_new_import_is_refused_while_an_interrupted_one_waits(tmp_path):
    journal = Journal(tmp_path)
    _entry(journal, REF, Path("/img.raw"), IDENT, 4096, resume=False)
    with pytest.raises(Refused, match="--resume.*thinstack recover vg0"):
        _entry(journal, REF, Path("/img.raw"), IDENT, 4096, resume=False)
    # Another name in the same VG is not in the way.
    _entry(journal, VolumeRef("vg0", "other"), Path("/img.raw"), IDENT, 4096,
                   resume=False)


def test_resume_continues_the_interrupted_entry_of_the_same_source(tmp_path):
    journal = Journal(tmp_path)
    first = _entry(journal, REF, Path("/img.raw"), IDENT, 4096, resume=False)
    journal.step(first, "copied:65536")
    again = _entry(journal, REF, Path("/other/path/to/img.raw"), IDENT, 0, resume=True)
    assert again.id == first.id and imports.copied(again) == 65536
    assert len(journal.pending("vg0")) == 1


def test_resume_refuses_a_changed_source_and_needs_something_to_resume(tmp_path):
    journal = Journal(tmp_path)
    with pytest.raises(NotFound, match="no interrupted import"):
        _entry(journal, REF, Path("/img.raw"), IDENT, 4096, resume=True)
    _entry(journal, REF, Path("/img.raw"), IDENT, 4096, resume=False)
    with pytest.raises(Refused, match=r"\(mtime_ns, size changed\)"):
        _entry(journal, REF, Path("/img.raw"), {**IDENT, "size": 7, "mtime_ns": 0},
                       4096, resume=True)


def test_a_committed_entry_is_not_an_interrupted_import(tmp_path):
    journal = Journal(tmp_path)
    done = _entry(journal, REF, Path("/img.raw"), IDENT, 4096, resume=False)
    journal.step(done, "committed")
    with pytest.raises(NotFound):
        _entry(journal, REF, Path("/img.raw"), IDENT, 4096, resume=True)


def test_the_summary_has_the_documented_keys():
    s = imports.Summary(format="vhd", virtual_size=1, bytes_read=2, bytes_written=3,
                        chunks_allocated=4, seconds=0.5, path="/dev/vg0/disk")
    assert set(s.to_json()) == {"format", "virtual_size", "bytes_read", "bytes_written",
                                "chunks_allocated", "seconds", "path"}


def test_the_progress_line_shows_bytes_percent_rate_and_eta():
    assert line("import vg0/d", 256 * MiB, GiB, 2.0) == (
        "import vg0/d [######..................]  25% 256MiB/1GiB 128MiB/s ETA 00:06")
    assert line("x", 0, GiB, 0.0).endswith("0B/s ETA --:--")
    assert line("x", GiB, GiB, 4.0).endswith("done")
    assert line("x", 0, 0, 1.0).endswith("done")  # nothing to copy: an empty image
    assert line("x", 36000, 72000, 36000.0).endswith("ETA 10:00:00")


def test_the_bar_redraws_at_most_every_interval_and_ends_its_line():
    now = [0.0]
    out = io.StringIO()
    bar = Bar("x", 100, stream=out, clock=lambda: now[0], interval=1.0)
    bar.update(10)
    now[0] = 0.5
    bar.update(20)  # too soon: not drawn
    now[0] = 1.5
    bar.update(30)
    bar.finish(100)
    frames = out.getvalue().split("\r")[1:]
    assert len(frames) == 3
    assert " 10% " in frames[0] and " 30% " in frames[1] and frames[2].endswith("\n")
    assert frames[2].rstrip().endswith("done")


class _Direct:
    def convert_into(self, device: str) -> None: ...


def test_images_that_write_themselves_need_a_pool_that_zeroes_new_chunks():
    """qemu-img writes partial chunks: only a zeroing pool keeps stale bytes from showing."""
    assert imports.direct(_Direct(), "twi-aotz--") is True
    assert imports.direct(object(), "twi-aot---") is False  # thinstack's copy loop: any pool
    with pytest.raises(Refused, match="zeroes new chunks; pool vg0/pool .*lvchange -Zy"):
        imports.direct(_Direct(), "twi-aot---", "vg0/pool")


def test_a_volume_udev_still_probes_is_deactivated_after_udev_settles(monkeypatch):
    in_use = CommandError(["lvm", "lvchange"], 5, "  Logical volume vg0/disk.importing in use.\n")
    runner = FakeRunner().on(["lvm", "lvchange"], in_use, "")
    monkeypatch.setattr(lvm, "LVM", Lvm(runner))
    imports._deactivate_written(imports.temp_ref(REF))
    off = ["lvm", "lvchange", "-q", "-an", "vg0/disk.importing"]
    assert runner.argvs == [off, ["udevadm", "settle", "--timeout=120"], off]
    runner.on(["lvm", "lvchange"], in_use)  # still open after udev is done: the user's, say so
    with pytest.raises(Refused, match="in use"):
        imports._deactivate_written(imports.temp_ref(REF))
