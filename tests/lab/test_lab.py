"""The lab itself, checked from the host (boots real kernels) and from inside."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
THINSTACK = [sys.executable, "-m", "thinstack.cli"]
IN_LAB = os.environ.get("THINSTACK_IN_LAB") == "1"
host_only = pytest.mark.skipif(IN_LAB, reason="boots its own lab from the host")


def lab(*args, **kw):
    return subprocess.run([*THINSTACK, "lab", "run", *args], capture_output=True, text=True,
                          timeout=120, **kw)


@host_only
def test_targets_listed_with_dm_thin_and_snapshot_loaded():
    done = lab("--disks", "2", "--", "dmsetup", "targets")
    assert done.returncode == 0, done.stderr
    names = {line.split()[0] for line in done.stdout.splitlines()}
    assert {"thin-pool", "thin", "snapshot", "snapshot-origin"} <= names


@host_only
def test_process_substitution_and_dev_stdin_work_as_on_a_real_system():
    done = lab("--", "bash", "-c", "cat <(echo substituted); echo piped | cat /dev/stdin")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "substituted\npiped\n"


@host_only
def test_streams_and_exit_status_are_the_commands(tmp_path):
    done = subprocess.run([*THINSTACK, "lab", "run", "--", "sh", "-c",
                           "printf 'out\\r\\n\\001\\n'; echo err >&2; exit 7"],
                          capture_output=True, timeout=120)
    assert done.returncode == 7
    assert done.stdout == b"out\r\n\x01\n"  # raw: bytes pass unchanged, no \n -> \r\n
    assert done.stderr == b"err\n"


@host_only
def test_env_and_cwd_are_the_callers(tmp_path):
    done = lab("--", "sh", "-c", "echo $LAB_PROBE; pwd; touch made-here",
               env={**os.environ, "LAB_PROBE": "from-host"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["from-host", str(tmp_path)]
    assert (tmp_path / "made-here").exists()  # the caller's paths are writable through


@host_only
def test_host_files_stay_as_they_were(tmp_path):
    marker = Path("/etc/thinstack-lab-probe")
    done = lab("--disks", "1", "--", "sh", "-c",
               f"touch {marker} && pvcreate -q /dev/ubdb && vgcreate -q probevg /dev/ubdb")
    assert done.returncode == 0, done.stderr
    assert not marker.exists()
    assert not Path("/etc/lvm/backup/probevg").exists()


@host_only
def test_state_dir_keeps_disks_between_runs(tmp_path):
    state = tmp_path / "state"
    first = lab("--disks", "1", "--state", str(state), "--", "sh", "-c",
                "pvcreate -q /dev/ubdb && vgcreate -q keptvg /dev/ubdb")
    assert first.returncode == 0, first.stderr
    second = lab("--disks", "1", "--state", str(state), "--", "vgs", "--noheadings", "-o",
                 "vg_name")
    assert second.returncode == 0, second.stderr
    assert second.stdout.split() == ["keptvg"]


@host_only
def test_scratch_disks_are_removed_without_state():
    # Other labs may run at once (scripts/test runs tests in parallel): find this one's job
    # folder by a token in its command, while it runs.
    token = f"probe-{os.getpid()}-{time.monotonic_ns()}"
    run = subprocess.Popen([*THINSTACK, "lab", "run", "--disks", "2", "--", "sh", "-c",
                            f"sleep 3 # {token}"], stderr=subprocess.PIPE, text=True)
    disks: list[Path] = []
    while not disks and run.poll() is None:
        time.sleep(0.05)
        for script in Path("/tmp").glob("thinstack-lab-*/job.sh"):
            if token in script.read_text(errors="replace"):
                disks = list(script.parent.glob("**/disk*.img"))
    _, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert len(disks) == 2
    assert not any(d.exists() for d in disks) and not disks[0].parent.exists()


@host_only
def test_timeout_kills_the_lab_with_its_own_status():
    nap = f"60.{os.getpid()}{time.monotonic_ns() % 10**6}"  # its own, among parallel tests
    done = lab("--timeout", "5", "--", "sleep", nap)
    assert done.returncode == 124
    assert "timed out" in done.stderr
    left = subprocess.run(["pgrep", "-f", f"sleep {nap}"], capture_output=True)
    assert left.returncode == 1  # nothing left running


@host_only
def test_missing_command_and_missing_kernel_are_clear(tmp_path):
    done = lab("--", "no-such-command-here")
    assert done.returncode == 127 and "command not found" in done.stderr
    done = lab("--", "true", env={**os.environ, "THINSTACK_CACHE": str(tmp_path)})
    assert done.returncode == 123 and "lab setup" in done.stderr


@pytest.mark.lab(disks=2, disk_size="64M")
def test_inside_the_lab(lab_disks):
    """What a lab test sees: root, a real kernel with dm and udev, blank disks."""
    assert os.geteuid() == 0
    assert lab_disks == ["/dev/ubdb", "/dev/ubdc"]
    for d in lab_disks:
        with open(d, "rb") as f:
            assert f.read(4096) == bytes(4096)
        size = subprocess.run(["blockdev", "--getsize64", d], capture_output=True, text=True)
        assert int(size.stdout) == 64 << 20
    targets = subprocess.run(["dmsetup", "targets"], capture_output=True, text=True, check=True)
    assert "thin-pool" in targets.stdout
    subprocess.run(["modprobe", "dm-clone"], check=True)
    subprocess.run(["modprobe", "raid1"], check=True)
    assert Path("/run/udev/control").exists()
