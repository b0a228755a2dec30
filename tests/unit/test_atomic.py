"""The file every exporter writes through, in a folder others may write to: modes (finding 6),
the temporary file's name and how it is made (finding 7), the format attribute (finding 3)."""

import os
import stat

import pytest

from thinstack import exports
from thinstack.errors import ThinstackError
from thinstack.exporters import ExportError, driver
from thinstack.exporters.atomic import AtomicFile, kept_mode, partial_name, remove_partial

FORMATS = ["raw", "vhd", "vhd-fixed", "qcow2", "gow1", "gow2", "gow3"]


def write_image(format, dest, partial=None):
    writer = driver(format).create(dest, 1 << 20, format=format, partial=partial)
    writer.write(0, b"disk" * 1024)
    writer.mark_zero(4096, (1 << 20) - 4096)
    writer.close()


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def loose_umask():
    old = os.umask(0o022)  # what a shell or cron gives: files 0644 unless made otherwise
    yield
    os.umask(old)


@pytest.mark.parametrize("format", FORMATS)
def test_a_new_image_is_readable_by_its_owner_only(tmp_path, loose_umask, format):
    write_image(format, tmp_path / "new.img")
    assert mode(tmp_path / "new.img") == 0o600


def test_an_image_keeps_the_mode_of_the_file_it_replaces(tmp_path, loose_umask):
    dest = tmp_path / "d.raw"
    for before in (0o600, 0o640, 0o644):
        dest.write_bytes(b"old")
        os.chmod(dest, before)
        write_image("raw", dest)
        assert mode(dest) == before


def test_the_mode_kept_is_only_that_of_our_own_regular_file():
    def st(mode, uid=0):
        return os.stat_result((mode, 1, 1, 1, uid, 0, 0, 0, 0, 0))

    assert kept_mode(None, 0) == 0o600
    assert kept_mode(st(stat.S_IFREG | 0o640), 0) == 0o640
    assert kept_mode(st(stat.S_IFREG | 0o4755), 0) == 0o755  # never set-id bits
    assert kept_mode(st(stat.S_IFREG | 0o666, uid=1000), 0) == 0o600  # planted by someone else
    assert kept_mode(st(stat.S_IFLNK | 0o777), 0) == 0o600


def test_the_temporary_name_is_random_and_hidden(tmp_path):
    names = {partial_name(tmp_path / "d.vhd") for _ in range(100)}
    assert len(names) == 100
    assert all(n.startswith(".d.vhd.partial-") and len(n) > len(".d.vhd.partial-") + 12
               for n in names)


def test_no_planted_symlink_is_followed(tmp_path, loose_umask):
    """Finding 7: symlinks at the old predictable name and at the chosen name point outside the
    folder; the export writes neither target, and its image replaces DEST itself."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"precious")
    folder = tmp_path / "backups"
    folder.mkdir()
    dest = folder / "d.raw"
    os.symlink(victim, folder / f".d.raw.partial-{os.getpid()}")  # the old name
    chosen = partial_name(dest)
    os.symlink(victim, folder / chosen)
    # Not the operator's mistake: a failure (exit 1), not a usage error.
    with pytest.raises(ThinstackError, match="already exists") as raised:
        write_image("raw", dest, partial=chosen)
    assert not isinstance(raised.value, ExportError) and raised.value.exit_status == 1
    assert os.path.islink(folder / chosen)  # left as it was
    write_image("raw", dest)
    assert victim.read_bytes() == b"precious" and mode(victim) == 0o644
    # A symlink at DEST is replaced, not written through.
    os.unlink(dest)
    os.symlink(victim, dest)
    write_image("raw", dest)
    assert not dest.is_symlink() and victim.read_bytes() == b"precious"
    assert mode(dest) == 0o600


def test_a_file_planted_at_the_chosen_name_fails_the_export_and_stays(tmp_path):
    dest = tmp_path / "d.qcow2"
    chosen = partial_name(dest)
    (tmp_path / chosen).write_bytes(b"not ours")
    with pytest.raises(ThinstackError, match="already exists") as raised:
        write_image("qcow2", dest, partial=chosen)
    assert raised.value.exit_status == 1
    assert (tmp_path / chosen).read_bytes() == b"not ours" and not dest.exists()


def test_the_folder_is_named_once(tmp_path):
    """Names are resolved against the descriptor taken at the start: moving another folder to
    the path meanwhile does not redirect the image there."""
    folder = tmp_path / "b"
    folder.mkdir()
    file = AtomicFile(folder / "d.raw")
    file.pwrite(b"x", 0)
    os.rename(folder, tmp_path / "moved")
    os.symlink(tmp_path / "elsewhere", folder)
    (tmp_path / "elsewhere").mkdir()
    file.commit()
    assert (tmp_path / "moved" / "d.raw").read_bytes() == b"x"
    assert os.listdir(tmp_path / "elsewhere") == []


def test_discard_removes_only_its_own_file(tmp_path):
    file = AtomicFile(tmp_path / "d.raw")
    os.rename(file.tmp, tmp_path / "moved")
    (file.tmp).write_bytes(b"someone else's")
    file.discard()
    assert file.tmp.read_bytes() == b"someone else's"


def test_recovery_removes_a_temporary_file_but_never_through_a_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / ".d.raw.partial-0123456789abcdef"
    os.symlink(victim, link)
    remove_partial(link)
    assert victim.read_bytes() == b"precious" and link.is_symlink()
    real = tmp_path / ".d.raw.partial-fedcba9876543210"
    real.write_bytes(b"half")
    remove_partial(real)
    assert not real.exists()
    remove_partial(victim)  # not a temporary file's name: a journal entry cannot name anything
    assert victim.exists()
    remove_partial(tmp_path / "gone" / ".x.partial-1")  # its folder gone: nothing to do


def test_every_image_says_its_format(tmp_path):
    dest = tmp_path / "d.vhd"
    writer = driver("vhd").create(dest, 1 << 20, format="vhd")
    writer.file.set_xattr(exports.FORMAT_XATTR, "vhd")
    writer.close()
    try:
        assert os.getxattr(dest, exports.FORMAT_XATTR) == b"vhd"
    except OSError:
        pytest.skip("this file system keeps no user attributes")
