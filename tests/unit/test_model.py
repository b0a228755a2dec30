"""The model of the CLI (tests/model.py) that the lab's state machine checks thinstack against:
its rules, as the README states them, without a kernel."""

from tests import model
from tests.model import BLOCK, EPERM, MiB, Vol


def listing(vols: model.Vols) -> list[dict]:
    """What `thinstack list --json` shows when it agrees with the model (plus fields it
    ignores)."""
    return [dict(name=n, thin_id=i, mapped_bytes=0, **model.row(vols, n))
            for i, n in enumerate(vols)]


def test_snapshots_and_clones_copy_their_origins_content_and_then_diverge():
    vols = model.create({}, "a", 16 * MiB).after
    vols = model.write(vols, "a", [0, BLOCK], "one").after
    vols = model.snapshot(vols, "a", "s").after
    vols = model.write(vols, "a", [0], "two").after
    assert vols["s"].seed_at(0) == "one" and vols["a"].seed_at(0) == "two"
    assert vols["s"].seed_at(BLOCK) == "one" and vols["s"].seed_at(2 * BLOCK) is None
    assert model.kind(vols, "s") == "snapshot" and model.kind(vols, "a") == "thin"
    vols = model.gold(vols, "a").after
    # A snapshot of a volume made gold later is a clone of it, as `list` calls it.
    assert model.kind(vols, "s") == "clone" and model.kind(vols, "a") == "gold"
    vols = model.clone(vols, "a", "c").after
    assert vols["c"] == Vol(16 * MiB, "a", blocks=((0, "two"), (BLOCK, "one")))
    assert model.row(vols, "a")["dependants"] == ["c", "s"]


def test_refusals_say_why_and_change_nothing():
    vols = model.create({}, "a", 16 * MiB).after
    vols = model.create(vols, "g", 16 * MiB).after
    vols = model.clone(model.gold(vols, "g").after, "g", "c").after
    cases = [
        (model.create(vols, "a", MiB), 4, "already exists"),
        (model.snapshot(vols, "nosuch", "x"), 3, "no such volume"),
        (model.snapshot(vols, "a", "g"), 4, "already exists"),
        (model.clone(vols, "a", "x"), 5, "not a gold master"),
        (model.delete(vols, "g"), 5, "dependants"),
        (model.resize(vols, "g", 32 * MiB, True), 5, "gold master"),
        (model.resize(vols, "a", 8 * MiB, False), 5, "--yes"),
        (model.import_(vols, "c", MiB, {}), 4, "already exists"),
        (model.export(vols, "nosuch"), 3, "no such volume"),
    ]
    for outcome, status, says in cases:
        assert (outcome.status, outcome.says, outcome.after) == (status, says, vols)
    assert model.write(vols, "g", [0], "x") == model.Outcome(EPERM, vols)
    assert model.delete(model.delete(vols, "c").after, "g").status == 0


def test_a_shrink_drops_the_tail_for_good():
    vols = model.write(model.create({}, "a", 16 * MiB).after, "a", [0, 200 * BLOCK], "w").after
    small = model.resize(vols, "a", 8 * MiB, True).after
    again = model.resize(small, "a", 16 * MiB, False).after
    assert again["a"] == Vol(16 * MiB, blocks=((0, "w"),))
    assert model.probes(small["a"], {0, 200 * BLOCK}) == [0]
    assert model.probes(again["a"], {0, 200 * BLOCK}) == [0, 200 * BLOCK]


def test_mismatches_name_each_difference():
    vols = model.snapshot(model.create({}, "a", 16 * MiB).after, "a", "s").after
    assert model.mismatches(vols, listing(vols)) == []
    shown = listing(vols)
    shown[0]["size"] = 8 * MiB
    shown.append(dict(name="extra"))
    assert model.mismatches(vols, shown) == [
        "extra: should not exist", f"a: size is {8 * MiB}, should be {16 * MiB}"]
    assert model.mismatches(vols, shown[1:2]) == ["a: missing"]


def test_an_interrupted_command_resolves_to_done_or_undone_only():
    before = model.create({}, "a", 16 * MiB).after
    done = model.snapshot(before, "a", "s").after
    assert model.resolve([before, done], listing(done)) is done
    assert model.resolve([before, done], listing(before)) is before
    half = listing(done)
    half[1]["kind"] = "thin"  # a snapshot that lost its origin is neither
    assert model.resolve([before, done], half) is None
