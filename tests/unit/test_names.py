"""Finding 5: the names thinstack gives its own volumes are not an operator's to give."""

import pytest

from thinstack import cli, imports
from thinstack.lvm import BadName, VolumeRef, check_name, check_user_name


@pytest.mark.parametrize("name", ["db.last-export", "db.export-0123456789ab", "db.export-x",
                                  "db.importing"])
def test_thinstacks_own_names_are_refused_from_the_operator(name):
    with pytest.raises(BadName, match="thinstack's own"):
        VolumeRef.parse(f"vg0/{name}")
    with pytest.raises(BadName):
        check_user_name(name, "snapshot name")
    done = cli.build_parser()
    with pytest.raises(SystemExit) as e:
        done.parse_args(["create", f"vg0/{name}", "--size", "1M"])
    assert e.value.code == 2


@pytest.mark.parametrize("name", ["db", "db.last", "db-export", "db.exported", "last-export",
                                  "db.importing2"])
def test_ordinary_names_stay_allowed(name):
    assert VolumeRef.parse(f"vg0/{name}").name == name


def test_thinstack_still_builds_its_own_names():
    assert check_name("db.importing") == "db.importing"
    assert imports.temp_ref(VolumeRef("vg0", "db")) == VolumeRef("vg0", "db.importing")
