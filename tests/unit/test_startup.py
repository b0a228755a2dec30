"""What a command imports before it does anything. In the lab a process pays about 0.45 ms for
every page it touches, and each module touches some: `list` imported hashlib (for a random temp
name), uuid and expat without using them, 310 pages of its 3,000 (bench/reports/ops.md)."""

import subprocess
import sys

# What list, info, create, snapshot, clone, gold, delete and pool status import (cli.py imports
# per command); export and import add their own.
EVERY_COMMAND = "import thinstack.cli; from thinstack import lvm, poolstatus, volumes"


def imported(code: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", f"{code}; import sys; print(*sys.modules)"],
                          capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def test_help_needs_neither_blivet_nor_pyudev_nor_sh():
    mods = imported("import thinstack.cli")
    assert not {m for m in mods if m.split(".")[0] in ("blivet", "pyudev", "sh", "gi")}


def test_the_commands_on_volumes_import_only_what_they_use():
    mods = imported(EVERY_COMMAND)
    assert not {m for m in mods if m.split(".")[0] in ("blivet", "pyudev", "sh", "gi")}
    # hashlib loads OpenSSL; uuid loads platform; expat is for thin_dump and thin_delta only.
    assert not mods & {"hashlib", "_hashlib", "secrets", "random", "uuid", "pyexpat"}

