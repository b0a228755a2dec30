"""reclaim's decisions without a kernel: which chunks are all zeros, how candidates batch, which
volumes it refuses, and what a kill leaves for recovery (the lab test runs the real thing)."""

import dataclasses

from tests.fakes import FakeLvm
from tests.unit.test_recovery import RO, entry, lv
from thinstack import reclaim, recovery
from thinstack.recovery import Action, Undo, apply, plan

C = 4096


def test_zero_chunks_are_found_by_volume_offset_and_a_partial_chunk_never_is():
    data = bytearray(8 * C + 100)
    data[2 * C + 7] = 1  # chunk 2 holds data
    data[5 * C:6 * C] = b"\xff" * C  # and chunk 5
    base = 100  # the read landed 100 bytes into the buffer
    buf = bytes(base) + bytes(data[:6 * C]) + bytes(C // 2)
    found = list(reclaim.zero_chunks(buf, base, 6 * C + C // 2, 1 << 20, C))
    assert found == [(1 << 20) + i * C for i in (0, 1, 3, 4)]


def test_candidates_run_together_and_batch_to_a_bound():
    chunks = [0, C, 2 * C, 5 * C, 6 * C, 9 * C]
    assert reclaim.ranges(chunks, C) == [(0, 3 * C), (5 * C, 2 * C), (9 * C, C)]
    assert reclaim.batches(chunks, C, 4 * C) == [chunks[:4], chunks[4:]]
    assert reclaim.batches(chunks, C, 1) == [[c] for c in chunks]  # never an empty batch


def test_volumes_nothing_may_write_or_that_read_an_origin_are_refused():
    ok = [lv("vm"), lv("snap", origin="vm")]
    for volume in ok:
        assert reclaim.refusal(volume, ok) is None
    plain = dataclasses.replace(lv("base", attr="-ri-a-----"), segtype="linear", thin_id=None)
    cases = {
        "gold master": (lv("g", tags={"ts_gold"}, attr=RO), []),
        "read-only": (lv("r", attr=RO), []),
        "not a thin volume": (dataclasses.replace(lv("l", attr="-wi-a-----"), segtype="linear"),
                              []),
        "external origin": (lv("c", origin="base"), [plain]),
        "imported live": (lv("live", tags={"ts_live"}), []),
    }
    for why, (volume, others) in cases.items():
        assert why in (reclaim.refusal(volume, [volume, *others]) or ""), why
    outside = lv("o", tags={"ts_ext_origin=/dev/sdz", "ts_ext_size=4096"})
    assert "external origin" in reclaim.refusal(outside, [outside])


def test_a_killed_reclaim_resumes_the_volume_and_removes_only_its_own_device():
    e = entry("reclaim", ["suspend:vg-vm LVM-u1"], name="vm", private_device="vg-vm-reclaim",
              private_uuid="TS-RECLAIM-vg-vm")
    assert recovery.resumes([e]) == [Action(Undo.RESUME, "vg-vm", "LVM-u1")]
    remove = Action(Undo.REMOVE_DEVICE, "vg-vm-reclaim", "TS-RECLAIM-vg-vm")
    assert plan([e], [lv("vm")]) == [remove]
    assert plan([entry("reclaim", ["committed"], name="vm", private_device="x",
                       private_uuid="y")], [lv("vm")]) == []
    fake = FakeLvm()
    info = "dmsetup info -c --noheadings --separator / -o name,major,minor,open,events,attr,uuid"
    for uuid, removed in (("TS-RECLAIM-vg-vm", True), ("LVM-someone-else", False)):
        fake.runner.on(info.split(), f"vg-vm-reclaim/253/9/0/0/L--w/{uuid}\n")
        apply([remove], fake)
        assert (fake.runner.argvs[-1][:2] == ["dmsetup", "remove"]) == removed, uuid
