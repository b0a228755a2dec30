"""Fixtures every lab test module shares."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.labtools import sh


@pytest.fixture(autouse=True)
def state_dirs(tmp_path, monkeypatch) -> Path:
    """The journal and locks of this test only; returns the state folder."""
    monkeypatch.setenv("THINSTACK_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("THINSTACK_RUN_DIR", str(tmp_path / "run"))
    return tmp_path / "state"


@pytest.fixture
def vg(lab_disks) -> str:
    """vg0 on the first disk with a 512 MiB thin pool tagged as thinstack's."""
    sh("pvcreate", "-q", lab_disks[0])
    sh("vgcreate", "-q", "vg0", lab_disks[0])
    sh("lvcreate", "-q", "--type", "thin-pool", "-L", "512M", "-Zy", "-n", "pool",
       "--addtag", "ts_pool", "vg0")
    return "vg0"
