"""Every kind of the hostile-image corpus (tests/hostile.py) is refused on the host: opening it
with a default policy, mapping it and reading it whole through the copy loop ends in an
ImageError of one line, within bounded memory and time, and no file outside the image's folder
is ever opened (an inotify tripwire on the folder of files the images reach for)."""

from __future__ import annotations

import collections
import os

import pytest

from tests import hostile, tripwire
from tests.imagetools import content
from thinstack.importers import Policy, open_image


def test_corpus_covers_every_family():
    counts = collections.Counter(k.family for k in hostile.KINDS.values())
    assert len(hostile.KINDS) >= 100
    assert set(counts) == set(hostile.FAMILIES), counts
    assert all(n >= 5 for n in counts.values()), counts
    # The ways out of the folder, each tried on every format that can name a file.
    for family in ("qcow2", "vmdk-text", "qed"):
        for how in hostile.ROUTES:
            assert any(k.family == family and k.name.endswith(how) for k in
                       hostile.KINDS.values()), (family, how)
    # Finding 3: every format that names files is refused under --format auto.
    auto = {k.family for k in hostile.KINDS.values() if "auto" in k.name}
    assert {"qcow2", "vhd", "vmdk-text", "vmdk-binary", "vmdk-split", "qed", "qcow1"} <= auto


@pytest.mark.parametrize("name", list(hostile.KINDS))
def test_kind_is_refused(name, tmp_path):
    case, outside = hostile.build(tmp_path, name)
    with tripwire.watch([outside]) as wire:
        result = hostile.bounded(lambda: hostile.import_on_host(case))
    opened = sorted({str(p) for p in wire.opened})
    assert result["status"] == "refused", (
        f"{name} ({case.description}): {result['status']}: {result.get('message')}"
        f"{result.get('traceback', '')}")
    assert "\n" not in result["message"], result["message"]
    assert not opened, f"{name} ({case.description}) opened {opened}: {result['message']}"


def test_raw_backup_with_a_qcow2_header_imports_as_bytes(tmp_path):
    """The positive side of finding 3: with --format raw the backup's bytes are the disk,
    whatever header a guest wrote into them; the file its header names is never opened."""
    folder, outside = tmp_path / "img", tmp_path / "out"
    folder.mkdir()
    path = hostile.raw_backup_holding_qcow2(folder, outside)
    with tripwire.watch([outside]) as wire:
        image = open_image(path, Policy(), "raw")
        try:
            assert image.virtual_size == path.stat().st_size
            assert content(image) == path.read_bytes()
        finally:
            image.close()
    assert wire.opened == []


def test_bounded_reports_a_timeout_and_a_memory_bomb(tmp_path):
    """The harness itself: a hang and an allocation past the limit are caught, not waited on,
    and the tripwire sees an open by the forked child and by a program it runs."""
    import subprocess
    import time

    trip = hostile.plant(tmp_path)[0]
    with tripwire.watch([tmp_path]) as wire:
        hostile.bounded(lambda: {"n": len(trip.open("rb").read(1))})
    assert wire.opened == [trip]
    with tripwire.watch([tmp_path]) as wire:
        hostile.bounded(lambda: {"n": subprocess.run(["qemu-img", "info", str(trip)],
                                                     capture_output=True).returncode})
    assert trip in wire.opened
    assert hostile.bounded(lambda: time.sleep(60) or {}, timeout=0.5)["status"] == "timeout"
    result = hostile.bounded(lambda: {"n": len(bytearray(2 << 30))}, memory=256 << 20)
    assert result["status"] == "memory", result


def test_builders_make_valid_images(tmp_path):
    """The structures the kinds corrupt are valid before they are corrupted (so each kind fails
    for its own reason): qemu-img agrees, and thinstack reads them."""
    import subprocess

    from thinstack.importers import detect

    q = hostile.qcow2_image(tmp_path / "a.qcow2")
    packed = hostile.qcow2_image(tmp_path / "c.qcow2", data={},
                                 compressed={0: hostile._deflate(hostile.pattern(65536))})
    v = hostile.vhd_image(tmp_path / "a.vhd")
    g = tmp_path / "a.gow"
    hostile.gow_image(g, version=3)
    k = hostile.kdmv(tmp_path)
    for path in (q.path, packed.path):
        subprocess.run(["qemu-img", "check", str(path)], check=True, capture_output=True)
    for path in (q.path, packed.path, v.path, g, k):
        image = open_image(path, Policy(), detect(path))
        try:
            data = content(image)
        finally:
            image.close()
        assert len(data) == hostile.SIZE and os.path.exists(path)
