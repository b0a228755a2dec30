"""dm/ioctl.py's struct packing and parsing, against linux/dm-ioctl.h's layout, without a kernel
(tests/lab/test_dm_devices.py compares the real replies with dmsetup's)."""

import struct

import pytest

from thinstack.dm import ioctl
from thinstack.dm.errors import DmError, ParseError


def test_the_header_is_struct_dm_ioctl():
    # version[3] data_size data_start target_count open_count flags event_nr padding: 40 bytes,
    # dev at 40, name[128] at 48, uuid[129] at 176, data[7] at 305.
    assert ioctl.HEADER.size == 312
    assert ioctl.SPEC.size == 40
    # _IOWR(0xfd, 7, struct dm_ioctl), as the C macro computes it.
    assert ioctl.request_code(ioctl.Cmd.DEV_STATUS) == 0xC138FD07
    assert ioctl.request_code(ioctl.Cmd.TARGET_MSG) == 0xC138FD0E


def test_a_request_carries_version_sizes_name_flags_and_payload():
    buf = ioctl.pack(name="vg-pool-tpool", flags=ioctl.Flag.STATUS_TABLE,
                     payload=ioctl.message_payload(0, "reserve_metadata_snap"), size=1024)
    assert len(buf) == 1024
    assert struct.unpack_from("=3IIIIiII", buf) == (4, 0, 0, 1024, 312, 0, 0, 1 << 4, 0)
    assert buf[48:48 + 14] == b"vg-pool-tpool\0"
    assert struct.unpack_from("=Q", buf, 312) == (0,)
    assert buf[320:320 + 22] == b"reserve_metadata_snap\0"


def test_a_payload_larger_than_the_buffer_grows_it():
    assert len(ioctl.pack(payload=bytes(100), size=64)) == 412


def test_names_the_kernel_cannot_hold_are_refused():
    with pytest.raises(DmError, match="not a device-mapper name"):
        ioctl.pack(name="x" * 128)


@pytest.mark.parametrize(("major", "minor"), [(254, 3), (8, 17), (259, 300), (4095, 1 << 19)])
def test_device_numbers_as_the_kernel_encodes_them(major, minor):
    dev = ioctl.encode_dev(major, minor)
    assert ioctl.decode_dev(dev) == (major, minor)
    if minor < 256:
        assert dev == (major << 8) | minor  # old_encode_dev's layout for small numbers


def reply(*, flags=0, count=0, open_count=0, event_nr=0, dev=0, name=b"", uuid=b"",
          data=b"", size=4096):
    buf = bytearray(size)
    data_size = 312 + len(data) if data else 305
    ioctl.HEADER.pack_into(buf, 0, 4, 48, 0, data_size, 312, count, open_count, flags, event_nr,
                           0, dev, name, uuid, b"")
    buf[312:312 + len(data)] = data
    return buf


def test_a_reply_header():
    r = ioctl.unpack(reply(flags=ioctl.Flag.ACTIVE_PRESENT | ioctl.Flag.SUSPEND, open_count=2,
                           event_nr=5, dev=ioctl.encode_dev(254, 1), name=b"thin",
                           uuid=b"LVM-abc"))
    assert (r.name, r.uuid, r.major, r.minor, r.open_count, r.event_nr) == \
        ("thin", "LVM-abc", 254, 1, 2, 5)
    assert r.has(ioctl.Flag.SUSPEND) and not r.has(ioctl.Flag.READONLY)
    assert r.data == b""  # data_size 305: no data


def test_a_reply_claiming_more_than_its_buffer_is_refused():
    buf = reply()
    struct.pack_into("=I", buf, 12, 1 << 20)
    with pytest.raises(ParseError):
        ioctl.unpack(buf)


def spec(start, length, type_name, params, following):
    return ioctl.SPEC.pack(start, length, 0, following, type_name) + params


def test_table_status_specs_chain_by_offsets_from_the_first():
    first = spec(0, 100, b"linear", b"8:16 8".ljust(16, b"\0"), 56)
    second = spec(100, 28, b"zero", b"\0" * 8, 0)
    data = ioctl.unpack(reply(count=2, data=first + second)).data
    assert ioctl.parse_specs(data, 2) == [ioctl.Spec(0, 100, "linear", "8:16 8"),
                                          ioctl.Spec(100, 28, "zero", "")]
    assert [s.render() for s in ioctl.parse_specs(data, 2)] == ["0 100 linear 8:16 8",
                                                                "100 28 zero"]


def test_truncated_or_looping_specs_are_parse_errors():
    with pytest.raises(ParseError):
        ioctl.parse_specs(spec(0, 8, b"zero", b"\0", 0)[:30], 1)
    with pytest.raises(ParseError):
        ioctl.parse_specs(spec(0, 8, b"zero", b"\0" * 8, 0) * 2, 2)


def name_record(dev, name, following):
    record = ioctl.NAME_LIST.pack(dev, following) + name + b"\0"
    return record + bytes(-len(record) % 8) + bytes(8)  # event_nr, flags


def test_the_device_list_follows_next_from_each_record():
    a = name_record(ioctl.encode_dev(254, 0), b"vg-pool_tmeta", 0)
    a = name_record(ioctl.encode_dev(254, 0), b"vg-pool_tmeta", len(a))
    b = name_record(ioctl.encode_dev(254, 7), b"vg-vm", 0)
    assert ioctl.parse_name_list(a + b) == [ioctl.Listed("vg-pool_tmeta", 254, 0),
                                            ioctl.Listed("vg-vm", 254, 7)]
    assert ioctl.parse_name_list(b"") == []
    assert ioctl.parse_name_list(bytes(16)) == []  # dev 0: no devices


def test_target_versions_as_dmsetup_targets_prints_them():
    first = ioctl.VERSIONS.pack(32, 1, 23, 0) + b"thin-pool\0" + bytes(6)
    data = first + ioctl.VERSIONS.pack(0, 1, 4, 0) + b"linear\0"
    assert ioctl.parse_versions(data) == {"thin-pool": "v1.23.0", "linear": "v1.4.0"}


def test_a_missing_control_node_is_one_clear_error(tmp_path):
    with pytest.raises(DmError, match="is device-mapper loaded"):
        ioctl.Control(str(tmp_path / "control")).status("x")


def test_a_path_that_is_no_block_device_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(DmError, match="not a block device"):
        ioctl.Control(str(tmp_path / "control")).status(str(tmp_path / "f"))
