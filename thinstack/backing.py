"""File-backed VGs: the sparse file, the loop device over it, and the registry that finds the file
before any LVM tag can be read (one symlink per VG under the state folder,
`backing-files/VG -> PATH`)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from thinstack.dm.command import RUNNER, CommandError, Runner
from thinstack.errors import Exists
from thinstack.journal import sync_dir
from thinstack.state import state_dir

# --- the registry ------------------------------------------------------------------------------


def _registry_dir() -> Path:
    return state_dir() / "backing-files"


def registered() -> dict[str, Path]:
    """VG -> its backing file, for every file-backed VG thinstack made."""
    folder = _registry_dir()
    if not folder.is_dir():
        return {}
    return {link.name: Path(os.readlink(link)) for link in folder.iterdir() if link.is_symlink()}


def register(vg: str, file: Path) -> None:
    folder = _registry_dir()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{vg}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(file, tmp)
    os.rename(tmp, folder / vg)  # atomic: the entry is either absent or whole
    sync_dir(folder)


def unregister(vg: str) -> None:
    folder = _registry_dir()
    (folder / vg).unlink(missing_ok=True)
    if folder.is_dir():
        sync_dir(folder)


# --- the file ----------------------------------------------------------------------------------

def check_new_file(vg: str, file: Path, runner: Runner = RUNNER) -> bool:
    """thinstack creates the backing file itself: an existing one is refused unless it is this
    VG's own (per the registry) and holds nothing, as an interrupted creation may leave it.
    Whether that file is there to be reused."""
    if not os.path.lexists(file):
        return False
    if registered().get(vg) == file and signature(file, runner) is None:
        return True
    raise Exists(f"{file} already exists; thinstack creates the backing file itself "
                 "(choose a new path, or remove it if it is not needed)")


def signature(path: Path, runner: Runner = RUNNER) -> str | None:
    """What blkid recognises in a file or device (e.g. LVM2_member), or None."""
    try:
        return runner.run(["blkid", "-p", "-o", "value", "-s", "TYPE", str(path)]).strip() or None
    except CommandError as e:
        if e.exit_status == 2:  # nothing recognised
            return None
        raise


def make_sparse_file(file: Path, size: int, reuse: bool = False) -> str:
    """The backing file: new, never one planted under its name (O_EXCL, O_NOFOLLOW), or with
    `reuse` the blank one an interrupted creation of this VG left (check_new_file). Returns its
    identity, DEV:INO, for a rollback to check."""
    file.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(file, flags if reuse else flags | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Exists(f"{file} is not a regular file")
        os.ftruncate(fd, 0)
        os.ftruncate(fd, size)  # a hole of `size` bytes: the file takes space as the pool fills
        os.fsync(fd)
    finally:
        os.close(fd)
    sync_dir(file.parent)
    return f"{st.st_dev}:{st.st_ino}"


def remove_file(path: Path, identity: str) -> None:
    """Unlink the file only if the name still leads to the file of `identity` (DEV:INO): looked
    up and unlinked relative to its folder's descriptor, never following a link."""
    try:
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        st = os.stat(path.name, dir_fd=folder, follow_symlinks=False)
        if f"{st.st_dev}:{st.st_ino}" == identity and stat.S_ISREG(st.st_mode):
            os.unlink(path.name, dir_fd=folder)
            os.fsync(folder)
    except FileNotFoundError:
        pass
    finally:
        os.close(folder)


# --- the loop device ---------------------------------------------------------------------------

def attach_loop(file: Path, runner: Runner = RUNNER) -> str:
    """A loop device over `file`, with direct I/O where the file's filesystem supports it: the
    pool's data is then cached once (above the loop device), not twice, and a flush from above
    reaches the file without a second round through the page cache."""
    found = runner.run(["losetup", "--list", "--noheadings", "--output", "NAME",
                        "--associated", str(file)]).split()
    if found:
        return found[0]
    try:
        device = runner.run(["losetup", "--find", "--show", "--direct-io=on", str(file)]).strip()
    except CommandError as e:
        if "Invalid argument" not in e.stderr:
            raise
        # The file's filesystem cannot do O_DIRECT (tmpfs before 6.6, some network and FUSE
        # filesystems): buffered I/O through its page cache is still correct.
        device = runner.run(["losetup", "--find", "--show", str(file)]).strip()
    runner.run(["udevadm", "settle"])  # LVM finds devices through udev
    return device


def detach_loops(identity: str, runner: Runner = RUNNER) -> None:
    """Detach the loop devices over the file of `identity` (DEV:INO), whatever its name now."""
    listing = runner.run(["losetup", "--list", "--json", "--output", "NAME,BACK-MAJ:MIN,BACK-INO"])
    for name in loops_by_identity(listing, identity):
        runner.run(["losetup", "--detach", name])


def loops_by_identity(listing: str, identity: str) -> list[str]:
    """The loop devices, in `losetup --list --json` output, whose backing file is DEV:INO."""
    found = []
    for loop in json.loads(listing or "{}").get("loopdevices", []):
        major, _, minor = str(loop.get("back-maj:min") or "").strip().partition(":")
        ino = str(loop.get("back-ino") or "").strip()
        if major.isdigit() and minor.isdigit() and \
                f"{os.makedev(int(major), int(minor))}:{ino}" == identity:
            found.append(loop["name"])
    return found
