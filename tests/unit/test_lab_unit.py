"""The lab's host-side decisions, without booting anything."""

import subprocess
from pathlib import Path

import pytest

from thinstack import lab


def test_job_script_carries_env_cwd_and_argv_exactly(tmp_path):
    spec = lab.LabSpec(command=["printf", "%s|", "a b", "it's", "$HOME"], cwd=tmp_path,
                       env={"ODD": "x'y \"z\" $w", "PATH": "/usr/bin:/bin", "1BAD": "skipped"})
    script = tmp_path / "job.sh"
    script.write_text(lab.job_script(spec))
    out = subprocess.run(["sh", str(script)], capture_output=True, text=True, env={})
    assert out.stdout == "a b|it's|$HOME|"
    check = lab.LabSpec(command=["sh", "-c", 'printf "%s" "$ODD"; pwd; echo "$THINSTACK_IN_LAB"'],
                        cwd=tmp_path, env=spec.env)
    script.write_text(lab.job_script(check))
    out = subprocess.run(["sh", str(script)], capture_output=True, text=True, env={"STRAY": "1"})
    assert out.stdout == f"x'y \"z\" $w{tmp_path}\n1\n"


def test_binds_are_callers_paths_never_system_ones(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    spec = lab.LabSpec(command=["cp", str(data / "new-file"), "/etc/passwd", "/dev/ubdb"],
                       cwd=Path("/"), writable=[tmp_path])
    binds = lab.binds_for(spec, job)
    assert Path("/") not in binds and Path("/etc") not in binds and Path("/dev") not in binds
    assert Path("/tmp") in binds and job.resolve() in binds and data.resolve() in binds
    assert binds == sorted(binds, key=lambda p: len(p.parts))  # parents first


def test_disk_names():
    assert [lab.disk_path(i) for i in range(3)] == ["/dev/ubdb", "/dev/ubdc", "/dev/ubdd"]


def test_mirror_from_deb822_skips_security(tmp_path):
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "debian.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\nSigned-By: /k1.gpg\n\n"
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian\nSuites: bookworm\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    assert lab.debian_mirror(tmp_path) == ("http://mirror.example/debian",
                                          "/usr/share/keyrings/debian-archive-keyring.gpg")


def test_mirror_from_one_line_sources(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "deb http://security.debian.org/debian-security bookworm-security main\n"
        "deb [signed-by=/k.gpg arch=amd64] http://ftp.example/debian bookworm main\n")
    assert lab.debian_mirror(tmp_path) == ("http://ftp.example/debian", "/k.gpg")


def test_no_source_is_a_clear_error(tmp_path):
    with pytest.raises(lab.LabError, match="no Debian apt source"):
        lab.debian_mirror(tmp_path)


def test_missing_kernel_names_the_fix(tmp_path):
    with pytest.raises(lab.LabError, match="lab setup") as e:
        lab.Kernel.find(tmp_path)
    assert e.value.exit_status == lab.EXIT_NO_KERNEL


def test_outcome_reports_boot_failures(tmp_path):
    (tmp_path / "console.log").write_text("booting\nKernel panic - not syncing: no init\n")
    with pytest.raises(lab.LabError, match="did not boot.*Kernel panic") as e:
        lab._outcome(tmp_path, -6)
    assert e.value.exit_status == lab.EXIT_BOOT_FAILED
    (tmp_path / "boot-error").write_text("cannot mount the overlay root\n")
    with pytest.raises(lab.LabError, match="overlay"):
        lab._outcome(tmp_path, 0)
    (tmp_path / "status").write_text("42\n")
    assert lab._outcome(tmp_path, 0) == 42
