"""`pool attach`: after boot, file-backed VGs back on their loop devices, their volumes active,
and clones of devices outside the VG up over their origins (LVM's activation skips those)."""

from __future__ import annotations

from thinstack import backing, extorigin, tags
from thinstack.dm.command import CommandError
from thinstack.errors import NotFound, ThinstackError
from thinstack.lock import vg_lock
from thinstack.lvm import Lvm, default_lvm


def attach(vg: str | None = None, lvm: Lvm | None = None) -> list[str]:
    """Attach the backing files of file-backed VGs (all registered ones and those with clones of
    outside devices, or just `vg`) to loop devices and activate their volumes; for another VG,
    just activate it. Returns the VGs activated. Tries every VG (and every such clone) before
    reporting failures, so one bad VG does not keep the others down at boot."""
    lvm = lvm or default_lvm()
    files = backing.registered()
    # At boot (no VG named), also every VG with clones of outside devices: LVM's own activation
    # leaves those down, by design.
    names = [vg] if vg else sorted(set(files) | {lv.vg for lv in lvm.lvs()
                                                 if extorigin.is_outside_clone(lv)
                                                 or tags.LIVE in lv.tags})
    failed = []
    for name in names:
        try:
            with vg_lock(name):
                if name in files:
                    if not files[name].exists():
                        raise NotFound(f"{name}: backing file {files[name]} is missing")
                    backing.attach_loop(files[name], lvm.runner)
                if not lvm.vgs(name):
                    raise NotFound(f"volume group {name} not found")
                down = _activate(name, lvm)
                lvs = lvm.lvs(name)
                if any(extorigin.is_outside_clone(lv) for lv in lvs):
                    errors = extorigin.activate_all(lvs)
                    if len(errors) == 1:
                        raise errors[0]
                    if errors:
                        raise ThinstackError("; ".join(map(str, errors)))
                if any(tags.LIVE in lv.tags for lv in lvs):  # live imports: server, clone
                    from thinstack import live

                    failures = live.restart(name, lvm)
                    if failures:
                        raise ThinstackError("; ".join(failures))
                if down:
                    raise down
        except CommandError as e:  # losetup, udevadm, dmsetup
            if vg:
                raise ThinstackError(str(e)) from e
            failed.append(str(e))
        except ThinstackError as e:
            if vg:
                raise
            failed.append(str(e))
    if failed:
        raise ThinstackError("; ".join(failed))
    return names


def _activate(vg: str, lvm: Lvm) -> ThinstackError | None:
    """vgchange -ay; when it fails, which volumes stayed down and why, returned rather than
    raised: LVM activates every volume it can (a power cut between LVM's commit and the pool's
    may leave one whose thin device the pool lacks), and the clones of outside devices and live
    imports must come up all the same."""
    try:
        lvm.run("vgchange", "-q", "-ay", vg)
        return None
    except ThinstackError as e:
        down = [lv.name for lv in lvm.lvs(vg)
                if lv.is_thin and not lv.active and not lv.skip_activation]
        if not down:
            raise
        return ThinstackError(f"{vg}: {', '.join(down)} not activated: {e}")
