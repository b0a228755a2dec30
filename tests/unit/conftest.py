import pytest


@pytest.fixture(autouse=True)
def own_state(tmp_path, monkeypatch):
    """No unit test reads or writes the host's journal, locks and run files (/var/lib/thinstack,
    /run/thinstack): one that did left pending entries for vg0 there, which then made every
    `thinstack pool create vg0 DEVICE` on that host try to recover a VG that did not exist."""
    monkeypatch.setenv("THINSTACK_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("THINSTACK_RUN_DIR", str(tmp_path / "run"))
