import bz2
import lzma
import os
import shutil
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from _pytest.reports import TestReport

from thinstack import lab
from thinstack.sizes import parse_size

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"


@pytest.fixture
def corpus(tmp_path):
    """corpus("d2v-zerofilled.vhd") -> path of the decompressed real-world image in tmp_path."""

    def get(name: str) -> Path:
        for ext, opener in ((".bz2", bz2.open), (".xz", lzma.open)):
            packed = CORPUS / (name + ext)
            if packed.exists():
                out = tmp_path / name
                with opener(packed) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                return out
        raise FileNotFoundError(f"{name} is not in {CORPUS}")

    return get


# --- Lab tests -------------------------------------------------------------------------------
# A test marked @pytest.mark.lab(disks=N, disk_size="1G", mem="768M", timeout=300) runs inside a
# freshly booted lab kernel: on the host, this plugin replaces the test's whole run protocol by
# `thinstack lab run -- python -m pytest NODEID` and reports the inner result as the test's own.
# Inside the lab (THINSTACK_IN_LAB=1) tests run normally. A lab that cannot boot fails the test
# with the lab's error: lab tests are never skipped silently.

IN_LAB = os.environ.get("THINSTACK_IN_LAB") == "1"


def _lab_options(item) -> dict:
    marker = item.get_closest_marker("lab")
    return dict(marker.kwargs) if marker else {}


@pytest.fixture
def lab_disks(request) -> list[str]:
    """The blank scratch disks a lab test asked for, as guest device paths."""
    assert IN_LAB, "lab_disks is only meaningful inside the lab"
    return [lab.disk_path(i) for i in range(_lab_options(request.node).get("disks", 0))]


def _run_in_lab(item) -> tuple[str, object, float]:
    opts = _lab_options(item)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="lab-result-") as d:
        junit = os.path.join(d, "result.xml")
        spec = lab.LabSpec(
            command=[sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--color=no",
                     f"--junitxml={junit}", f"--rootdir={ROOT}", item.nodeid],
            disks=opts.get("disks", 0),
            disk_size=parse_size(opts.get("disk_size", "1G")),
            mem=parse_size(opts.get("mem", "768M")),
            timeout=opts.get("timeout", 300),
            cwd=ROOT)
        with open(os.path.join(d, "output"), "w+") as out:
            try:
                status = lab.run_lab(spec, stdout=out, stderr=out)
            except lab.LabError as e:
                status = e.exit_status
                print(e, file=out)
            out.seek(0)
            output = out.read().strip()
        outcome, detail = _junit_outcome(junit)
    duration = time.time() - start
    if outcome is None:
        return "failed", f"lab run exited {status} without a test result:\n{output}", duration
    if outcome == "skipped":
        return "skipped", (str(item.path), item.location[1] or 0, f"Skipped: {detail}"), duration
    if outcome == "failed":
        return "failed", f"{detail}\n--- lab output ---\n{output}", duration
    return "passed", None, duration


def _junit_outcome(path: str):
    try:
        case = ET.parse(path).find(".//testcase")
    except (OSError, ET.ParseError):
        return None, None
    if case is None:
        return None, None
    for tag in ("failure", "error"):
        el = case.find(tag)
        if el is not None:
            return "failed", (el.text or el.get("message") or "").strip()
    el = case.find("skipped")
    if el is not None:
        return "skipped", el.get("message", "")
    return "passed", None


def pytest_collection_modifyitems(items):
    """Lab tests first, the longest (by their timeout) first, host tests last: the workers that
    scripts/test starts (pytest-xdist) then end on short tests, not one on a ten-minute one."""
    if not IN_LAB:
        items.sort(key=lambda item: -_lab_options(item).get("timeout", 300)
                   if item.get_closest_marker("lab") else 0)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    if IN_LAB or item.get_closest_marker("lab") is None:
        return None
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    outcome, longrepr, duration = _run_in_lab(item)
    now = time.time()
    keywords = {k: 1 for k in item.keywords}
    if outcome == "skipped":  # pytest reports skips from the setup phase
        phases = [("setup", outcome, longrepr, duration)]
    else:
        phases = [("setup", "passed", None, 0.0), ("call", outcome, longrepr, duration)]
    for when, out, rep, dur in phases + [("teardown", "passed", None, 0.0)]:
        report = TestReport(item.nodeid, item.location, keywords, out, rep, when,
                            duration=dur, start=now - dur, stop=now)
        item.ihook.pytest_runtest_logreport(report=report)
    # What runtestprotocol's teardown does: finish module and package fixtures that the next
    # item does not share, so a host test after lab tests starts from a clean setup state.
    item.session._setupstate.teardown_exact(nextitem)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True
