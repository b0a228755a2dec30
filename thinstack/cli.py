"""The `thinstack` command line. Each subcommand parses its arguments, calls one function of the
library, prints the result (a table, or one JSON document with --json), and turns errors into one
line on stderr and a documented exit status:

  0 ok · 1 failed (rolled back) · 2 usage · 3 not found · 4 exists · 5 refused (dependants, open,
  protected) · 6 no space · 7 monitor alert · 8 bad image (malformed, hostile, missing parent)
  · 123/124/125 lab: no kernel / timeout / boot failed
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from thinstack.sizes import format_size, parse_size


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _ref(text: str):
    from thinstack.lvm import BadName, VolumeRef

    try:
        return VolumeRef.parse(text)
    except BadName as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _pool_ref(text: str):
    """VG, or VG/POOL."""
    from thinstack.lvm import BadName, PoolRef

    try:
        return PoolRef.parse(text)
    except BadName as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _limit(text: str) -> int | None:
    """A size, or `none`: no limit."""
    return None if text == "none" else _size(text)


def _ratio(text: str) -> float | None:
    if text == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: a ratio, such as 1.5, or none") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"{text}: a positive ratio")
    return value


def _pool_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pool", metavar="POOL", help="the pool of the VG the new volume goes "
                        "in (needed when the VG has several)")


def _origin(text: str):
    """VG/NAME, or a device given by its absolute path."""
    return text if text.startswith("/") else _ref(text)


def _pct(text: str) -> float:
    value = float(text)
    if not 0 < value < 100:
        raise argparse.ArgumentTypeError(f"{text}: a percentage between 0 and 100")
    return value


class Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, as every other thinstack failure: scripts log stderr, people read it.
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="thinstack", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_pool_parser, _volume_parsers, _list_parsers, _reclaim_parser, _cow_parser,
                _monitor_parser, _recover_parser, _import_parser, _export_parser, _mount_parsers,
                _lab_parser):
        add(sub)
    return p


def _pool_parser(sub) -> None:
    pool = sub.add_parser("pool", help="thin pools: create, attach, status, list, check, extend, "
                          "repair")
    pool.set_defaults(run=cmd_pool)
    ps = pool.add_subparsers(dest="pool_command", required=True, metavar="SUBCOMMAND")
    c = ps.add_parser("create", help="make a VG on devices (or a file) and a thin pool in it; "
                      "with neither, the pool goes into the free space of the existing VG")
    c.add_argument("vg")
    c.add_argument("devices", nargs="*", metavar="DEVICE")
    c.add_argument("--file", type=Path, help="back the VG with a sparse file on a loop device")
    c.add_argument("--raid1", action="store_true", help="mirror two devices with md raid1 first")
    c.add_argument("--size", type=_size, help="initial pool data size (default: most of the "
                   "VG); with --file, the size of the file")
    c.add_argument("--chunk", type=_size, default=64 << 10, help="pool chunk size (default 64K)")
    c.add_argument("--grow-threshold", type=_pct, default=70.0, metavar="PCT")
    c.add_argument("--grow-step", type=_size, default=256 << 20, metavar="SIZE")
    c.add_argument("--name", default="pool", metavar="POOL",
                   help="the pool's name (default pool); a VG may hold several pools")
    c.add_argument("--limit", type=_size, metavar="SIZE",
                   help="the pool's data never grows past SIZE: at it, its writers get ENOSPC "
                   "and the VG's other pools write on")
    c.add_argument("--overcommit", type=_ratio, metavar="R",
                   help="refuse volumes whose sizes would add up to more than R x the limit")
    st = ps.add_parser("set", help="change a pool's --limit and --overcommit (none: remove)")
    st.add_argument("pool", type=_pool_ref, metavar="VG[/POOL]")
    st.add_argument("--limit", type=_limit, default=argparse.SUPPRESS, metavar="SIZE|none")
    st.add_argument("--overcommit", type=_ratio, default=argparse.SUPPRESS, metavar="R|none")
    st.add_argument("--json", action="store_true")
    a = ps.add_parser("attach", help="re-attach file-backed pools and activate (boot time)")
    a.add_argument("vg", nargs="?")
    s = ps.add_parser("status", help="usage, limits, mode and growth settings of pools")
    s.add_argument("pool", nargs="?", type=_pool_ref, metavar="VG[/POOL]")
    s.add_argument("--json", action="store_true")
    ps.add_parser("list", help="the thin pools thinstack knows").add_argument(
        "--json", action="store_true")
    ps.add_parser("check", help="thin_check the pool's metadata (on a metadata snapshot)"
                  ).add_argument("pool", type=_pool_ref, metavar="VG[/POOL]")
    ex = ps.add_parser("extend", help="grow the pool's data by SIZE")
    ex.add_argument("pool", type=_pool_ref, metavar="VG[/POOL]")
    ex.add_argument("size", type=_size)
    r = ps.add_parser("repair", help="fresh metadata for a damaged pool (lvconvert --repair); "
                      "the old is kept as an LV")
    r.add_argument("pool", type=_pool_ref, metavar="VG[/POOL]")
    r.add_argument("--json", action="store_true")


def _volume_parsers(sub) -> None:
    def volume(name: str, help: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help)
        parser.set_defaults(run=cmd_volume)
        return parser

    c = volume("create", "a new thin volume")
    c.add_argument("ref", type=_ref, metavar="VG/NAME")
    c.add_argument("--size", type=_size, required=True)
    _pool_option(c)
    s = volume("snapshot", "a thin snapshot, active and writable unless --readonly")
    s.add_argument("ref", type=_ref, metavar="VG/NAME")
    s.add_argument("snapname", metavar="SNAPNAME")
    s.add_argument("--readonly", action="store_true")
    volume("gold", "make a volume a read-only gold master, protected while cloned").add_argument(
        "ref", type=_ref, metavar="VG/NAME")
    c = volume("clone", "a writable clone of a gold master, a read-only LV or a read-only block "
               "device (/dev/...), O(1)")
    c.add_argument("origin", type=_origin, metavar="ORIGIN")
    c.add_argument("ref", type=_ref, metavar="VG/NAME")
    _pool_option(c)
    r = volume("resize", "grow online; shrinking needs --yes")
    r.add_argument("ref", type=_ref, metavar="VG/NAME")
    r.add_argument("size", type=_size)
    r.add_argument("--yes", action="store_true", help="allow shrinking (discards the tail)")
    volume("delete", "remove a volume (refused while others depend on it)").add_argument(
        "ref", type=_ref, metavar="VG/NAME")


def _list_parsers(sub) -> None:
    lst = sub.add_parser("list", help="volumes with size, kind, usage and dependants")
    lst.set_defaults(run=cmd_list)
    lst.add_argument("where", nargs="?", type=_pool_ref, metavar="VG[/POOL]",
                     help="one VG's volumes, or one pool's")
    lst.add_argument("--json", action="store_true")
    lst.add_argument("--sort", choices=["name", "size", "mapped", "exclusive"], default="name",
                     help="order (the byte keys biggest first)")
    i = sub.add_parser("info", help="one volume in detail")
    i.set_defaults(run=cmd_info)
    i.add_argument("ref", type=_ref, metavar="VG/NAME")
    i.add_argument("--json", action="store_true")


def _reclaim_parser(sub) -> None:
    r = sub.add_parser("reclaim", help="give a volume's all-zero chunks back to the pool, live")
    r.set_defaults(run=cmd_reclaim)
    r.add_argument("ref", type=_ref, metavar="VG/NAME")
    r.add_argument("--json", action="store_true", help="print one summary object")


def cmd_reclaim(args) -> int:
    from thinstack import reclaim

    s = reclaim.reclaim(args.ref)
    if args.json:
        print(json.dumps(s.to_json(), sort_keys=True))
    else:
        print(f"{s.volume}: discarded {s.discarded_chunks} all-zero chunks "
              f"({format_size(s.bytes_discarded)}); pool used {format_size(s.pool_used_before)}"
              f" -> {format_size(s.pool_used_after)}")
    return 0


def _cow_parser(sub) -> None:
    c = sub.add_parser("cow", help="an old-style dm-snapshot volume over a read-only origin")
    c.set_defaults(run=cmd_volume)
    c.add_argument("origin", type=_ref, metavar="ORIGIN")
    c.add_argument("ref", type=_ref, metavar="VG/NAME")
    c.add_argument("--store", type=_size, required=True, help="initial COW store size")


def _monitor_parser(sub) -> None:
    m = sub.add_parser("monitor", help="grow pools and CoW stores before they fill")
    m.set_defaults(run=cmd_monitor)
    m.add_argument("--once", action="store_true", help="one pass; exit 7 if a pool is in alert")
    m.add_argument("--interval", type=float, default=5.0, metavar="S")


def _recover_parser(sub) -> None:
    rc = sub.add_parser("recover", help="complete or roll back interrupted operations")
    rc.set_defaults(run=cmd_recover)
    rc.add_argument("vg", nargs="?")


def _progress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar (default: on a terminal)")


def _import_parser(sub) -> None:
    im = sub.add_parser("import", help="bring a disk image (vhd, qcow2, gow, raw, ...) into a "
                        "volume")
    im.set_defaults(run=cmd_import)
    # Both optional only for --status [VG/NAME] and --live --abort VG/NAME (checked in
    # cmd_import); a string, since an NBD URL is no path.
    im.add_argument("source", nargs="?", metavar="SOURCE")
    im.add_argument("ref", nargs="?", type=_ref, metavar="VG/NAME")
    im.add_argument("--format", default="auto",
                    choices=["auto", "raw", "vhd", "qcow2", "gow", "qemu"])
    im.add_argument("--size", type=_size, help="volume size, if larger than the image's")
    im.add_argument("--allow-dir", type=Path, action="append", default=[], metavar="DIR",
                    help="a folder parent/backing images may also come from")
    im.add_argument("--resume", action="store_true", help="continue an interrupted import")
    _pool_option(im)
    im.add_argument("--rate", type=_size, metavar="SIZE", help="with --live: the background copy "
                    "reads at most SIZE bytes/s (e.g. 50M); the guest's own I/O is not bounded")
    im.add_argument("--live", action="store_true", help="the volume at once; the kernel copies "
                    "the image underneath (also nbd:// and nbd+unix:// sources)")
    im.add_argument("--wait", action="store_true", help="with --live: block until the copy has "
                    "finished and the volume is an ordinary thin volume")
    im.add_argument("--status", action="store_true", help="show live imports [of VG/NAME]")
    im.add_argument("--abort", action="store_true", help="with --live VG/NAME: remove the live "
                    "import's volume")
    im.add_argument("--force", action="store_true", help="with --abort: even while it is open")
    im.add_argument("--json", action="store_true", help="print one summary object")
    _progress_option(im)


def _export_parser(sub) -> None:
    ex = sub.add_parser("export", help="write a volume to an image file, consistently and "
                        "sparsely")
    ex.set_defaults(run=cmd_export)
    ex.add_argument("ref", type=_ref, metavar="VG/NAME")
    ex.add_argument("dest", type=Path, metavar="DEST")
    ex.add_argument("--format", default="raw",
                    choices=["raw", "vhd", "vhd-fixed", "qcow2", "gow1", "gow2", "gow3"])
    ex.add_argument("--compress", action="store_true", help="compressed qcow2 clusters")
    ex.add_argument("--round-to-mib", action="store_true", help="vhd-fixed: whole MiB (Azure)")
    ex.add_argument("--incremental", action="store_true",
                    help="only what changed since the last --incremental export (full if none)")
    ex.add_argument("--full", action="store_true",
                    help="with --incremental: a full image that starts a new chain")
    ex.add_argument("--since", metavar="SNAPNAME", help="only what changed since this snapshot")
    ex.add_argument("--parent", type=Path, metavar="IMAGE",
                    help="with --since: the image exported at SNAPNAME (parent of DEST)")
    ex.add_argument("--json", action="store_true", help="print one summary line")
    _progress_option(ex)


def _mount_parsers(sub) -> None:
    m = sub.add_parser("mount", help="show every volume as read-only image files (FUSE)")
    m.set_defaults(run=cmd_mount)
    m.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    m.add_argument("vgs", nargs="*", metavar="VG", help="the VGs to show (default: all)")
    m.add_argument("--formats", default="raw,vhd,qcow2",
                   help="comma-separated: raw, vhd or vhd-fixed, qcow2, gow1 or gow2 or gow3 "
                   "(default raw,vhd,qcow2)")
    m.add_argument("--allow-other", action="store_true",
                   help="let other users in, as the files' 0600 root permissions allow")
    m.add_argument("--foreground", action="store_true", help="serve in this process (units)")
    u = sub.add_parser("umount", help="unmount a thinstack mount (refused while files are open)")
    u.set_defaults(run=cmd_umount)
    u.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")


def cmd_mount(args) -> int:
    from thinstack import mount

    mount.mount(args.mountpoint, args.vgs, [f for f in args.formats.split(",") if f],
                allow_other=args.allow_other, foreground=args.foreground)
    return 0


def cmd_umount(args) -> int:
    from thinstack import mount

    mount.umount(args.mountpoint)
    return 0


def _lab_parser(sub) -> None:
    lab = sub.add_parser("lab", help="a real kernel (User-Mode Linux) with device-mapper, on "
                         "demand")
    lab.set_defaults(run=cmd_lab)
    labsub = lab.add_subparsers(dest="lab_command", required=True)
    labsub.add_parser("setup", help="fetch and prepare the lab kernel (idempotent)")
    r = labsub.add_parser("run", help="boot the lab, run COMMAND inside as root, power off")
    r.add_argument("--disks", type=int, default=0,
                   help="blank scratch disks /dev/ubdb, /dev/ubdc, ...")
    r.add_argument("--disk-size", type=_size, default=1 << 30, metavar="SIZE")
    r.add_argument("--mem", type=_size, default=768 << 20, metavar="SIZE")
    r.add_argument("--state", type=Path, metavar="DIR", help="keep the disks here between runs")
    r.add_argument("--timeout", type=float, metavar="SECONDS", help="kill the lab after this long")
    r.add_argument("--rw", type=Path, action="append", default=[], metavar="PATH",
                   help="a host folder COMMAND may write (cwd and /tmp always are)")
    r.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]")


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _bytes(n: int | None) -> str:
    return "-" if n is None else format_size(n)


def _percent(value: float | None, spec: str) -> str:
    """None: an inactive pool's usage, or a pool without thinstack's growth tags."""
    return "-" if value is None else f"{value:{spec}}%"


def cmd_volume(args) -> int:
    from thinstack import volumes

    if args.command == "create":
        path = volumes.create(args.ref, args.size, args.pool)
    elif args.command == "snapshot":
        path = volumes.snapshot(args.ref, args.snapname, readonly=args.readonly)
    elif args.command == "gold":
        path = volumes.gold(args.ref)
    elif args.command == "clone":
        path = volumes.clone(args.origin, args.ref, args.pool)
    elif args.command == "cow":
        path = volumes.cow(args.origin, args.ref, args.store)
    elif args.command == "resize":
        path = volumes.resize(args.ref, args.size, shrink_ok=args.yes)
    else:
        volumes.delete(args.ref)
        print(f"deleted {args.ref}", file=sys.stderr)
        return 0
    print(path)
    return 0


def cmd_list(args) -> int:
    from thinstack import lvm, poolstatus, volumes

    # One `lvs` for every VG asked for; one thin_ls per pool for the usage columns.
    where = args.where
    lvs = lvm.volumes_of(where.vg) if where else lvm.lvs()
    if where and where.name:  # a tenant's volumes: NotFound for no such pool
        lvm.pool_of(where.vg, lvs, where.name)
    infos = []
    hydrations = _hydrations(lvs)
    for vg in [where.vg] if where else sorted({lv.vg for lv in lvs}):
        in_vg = [lv for lv in lvs if lv.vg == vg]
        infos += volumes.volume_infos(in_vg, poolstatus.thin_usage(vg, in_vg),
                                      hydrations=hydrations)
    if where and where.name:
        infos = [i for i in infos if i.pool == where.name]
    infos = volumes.sort_infos(infos, args.sort)
    if args.json:
        _print_json([i.to_json() for i in infos])
        return 0
    _table([[f"{i.vg}/{i.name}", _bytes(i.size), i.kind + _copying(i.hydration),
             "ro" if i.readonly else "rw",
             i.pool or "-", i.origin or "-", _bytes(i.mapped_bytes), _bytes(i.exclusive_bytes),
             ",".join(i.dependants) or "-"] for i in infos],
           ["VOLUME", "SIZE", "KIND", "MODE", "POOL", "ORIGIN", "MAPPED", "EXCLUSIVE",
            "DEPENDANTS"])
    return 0


def _hydrations(lvs) -> dict[str, dict]:
    """VG/NAME -> the progress of each live import among `lvs` (live.py, which loads every image
    reader, only when there is one)."""
    from thinstack import tags

    if not any(tags.LIVE in lv.tags for lv in lvs):
        return {}
    from thinstack import live

    return {p.volume: p.to_json() for p in live.status(lvs=lvs)}


def _copying(hydration: dict | None) -> str:
    """`list`'s note on a live import still copying in: how far, and how long to go."""
    if hydration is None:
        return ""
    done = 100 * hydration["copied"] // max(hydration["total"], 1)
    eta = f", ETA {hydration['eta']:.0f}s" if hydration["eta"] is not None else ""
    return f" (copying in {done}%{eta})"


def cmd_info(args) -> int:
    from thinstack import lvm, poolstatus, volumes
    from thinstack.errors import NotFound

    lvs = lvm.volumes_of(args.ref.vg)
    match = volumes.volume_infos(lvs, poolstatus.thin_usage(args.ref.vg, lvs), args.ref.name,
                                 _hydrations(lvs))
    if not match:
        raise NotFound(f"{args.ref}: no such volume")
    info = match[0]
    if args.json:
        _print_json(info.to_json())
    else:
        for key, value in info.to_json().items():
            if key == "hydration" and value is not None:
                value = _copying(value).strip(" ()")
            print(f"{key:16} {value if value is not None else '-'}")
    return 0


def cmd_recover(args) -> int:
    from thinstack import lvm, recovery
    from thinstack.journal import Journal
    from thinstack.lock import vg_lock

    journal = Journal()
    # Entries that cannot be read are the operator's to look at: say what to do with each (and
    # recovery leaves their volumes alone).
    damaged = [d for d in journal.damaged() if args.vg in (None, d.vg)]
    for d in damaged:
        journal.reported(d)
        print(f"thinstack: {d.advice()}", file=sys.stderr)
    # A pool creation killed before its VG existed is known only to the journal.
    vgs = [args.vg] if args.vg else sorted({v.name for v in lvm.vgs()} |
                                          {e.vg for e in journal.pending()})
    for vg in vgs:
        with vg_lock(vg):
            for action in recovery.recover_vg(vg, journal, explicit=True):
                print(f"{vg}: {action.kind} {action.target} {action.arg}".rstrip(), file=sys.stderr)
    return 1 if damaged else 0  # not all recovered: each line above says what is left


def cmd_pool(args) -> int:
    # Reading a pool needs none of the modules that make, attach or grow one.
    from thinstack import poolstatus

    c = args.pool_command
    ref = getattr(args, "pool", None)  # VG[/POOL] of the subcommands that name a pool
    if c in ("status", "list"):
        found = poolstatus.status(*((ref.vg, ref.name) if ref else ()))
        _pool_table(found, args.json)
        return 0
    from thinstack import pools

    if c == "create":
        status = pools.create(args.vg, devices=args.devices, file=args.file, raid1=args.raid1,
                              size=args.size, chunk=args.chunk, grow_threshold=args.grow_threshold,
                              grow_step=args.grow_step, name=args.name, limit=args.limit,
                              overcommit=args.overcommit)
        print(status.path)
    elif c == "attach":
        pools.attach(args.vg)
    elif ref is None:
        raise AssertionError(f"pool {c} without its VG[/POOL]")  # argparse requires it
    elif c == "set":
        changes = {k: getattr(args, k) for k in ("limit", "overcommit") if hasattr(args, k)}
        if not changes:
            raise _usage("pool set: give --limit or --overcommit")
        _pool_table([pools.set_pool(ref.vg, ref.name, **changes)], args.json)
    elif c == "check":
        print(pools.check(ref.vg, ref.name))
    elif c == "extend":
        print(pools.extend(ref.vg, args.size, ref.name).path)
    elif c == "repair":
        from thinstack import repair

        done = repair.repair(ref.vg, ref.name)
        if args.json:
            _print_json(done.to_json())
        else:
            print(f"{done.pool}: repaired, {done.volumes} volumes checked"
                  + (f"; old metadata kept as {done.old_metadata} (lvremove it when no "
                     "longer needed)" if done.old_metadata else "")
                  + (f"; deleted thin ids no volume had: {', '.join(map(str, done.deleted_ids))}"
                     if done.deleted_ids else "")
                  + (f"; lost in the pool, made again empty: {', '.join(done.emptied)}"
                     if done.emptied else ""))
    return 0


def _pool_table(found, as_json: bool) -> None:
    if as_json:
        _print_json([p.to_json() for p in found])
        return
    _table([[p.vg, p.name, _bytes(p.data_size), _percent(p.data_percent, ".1f"),
             _percent(p.metadata_percent, ".1f"), p.mode, _bytes(p.limit),
             _bytes(p.provisioned), "-" if p.overcommit is None else f"{p.overcommit:g}x",
             _percent(p.grow_threshold, "g"), _bytes(p.grow_step), _bytes(p.vg_free)]
            for p in found],
           ["VG", "POOL", "DATA", "DATA%", "META%", "MODE", "LIMIT", "PROVISIONED", "OVERCOMMIT",
            "GROW@", "STEP", "VG FREE"])


def cmd_import(args) -> int:
    from thinstack import imports

    if args.live or args.status or args.abort:
        return _live_import(args)
    if args.rate is not None:
        raise _usage("--rate bounds a live import's copy: give it with --live")
    if args.source is None or args.ref is None:
        raise _usage("import needs SOURCE and VG/NAME")
    summary = imports.import_image(args.source, args.ref, format=args.format, size=args.size,
                                   allow_dirs=tuple(args.allow_dir), resume=args.resume,
                                   progress=_progress(args), pool_name=args.pool)
    if args.json:
        print(json.dumps(summary.to_json(), sort_keys=True))
    else:
        print(summary.path)
    return 0


def _live_import(args) -> int:
    from thinstack import live

    # `--status VG/NAME` and `--abort VG/NAME`: the one positional given lands in SOURCE.
    ref = args.ref or (_ref_or_usage(args.source) if args.source else None)
    if args.status:
        found = live.status(ref)
        print(json.dumps([p.to_json() for p in found], sort_keys=True) if args.json
              else live.progress_lines(found))
        return 0
    if args.abort:
        if ref is None or args.ref is not None:
            raise _usage("import --live --abort takes VG/NAME only")
        live.abort(ref, force=args.force)
        return 0
    if args.wait and args.ref is None and ref is not None:  # wait for one already running
        live.wait_and_finish(ref, _progress(args))
        return 0
    if args.source is None or args.ref is None:
        raise _usage("import --live needs SOURCE and VG/NAME")
    summary = live.import_live(args.source, args.ref, format=args.format,
                               allow_dirs=tuple(map(str, args.allow_dir)), wait=args.wait,
                               show_progress=_progress(args), pool_name=args.pool,
                               rate=args.rate)
    print(json.dumps(summary.to_json(), sort_keys=True) if args.json else summary.path)
    return 0


def _usage(message: str):
    from thinstack.errors import Usage

    return Usage(message)


def _ref_or_usage(text: str):
    try:
        return _ref(text)
    except argparse.ArgumentTypeError as e:
        raise _usage(str(e)) from None


def cmd_export(args) -> int:
    from thinstack import exports

    summary = exports.export_volume(args.ref, args.dest, format=args.format,
                                    compress=args.compress, round_to_mib=args.round_to_mib,
                                    incremental=args.incremental, since=args.since,
                                    parent=args.parent, full=args.full,
                                    progress=_progress(args))
    if args.json:
        print(json.dumps(summary.to_json(), sort_keys=True))
    else:
        print(summary.path)
    return 0


def _progress(args) -> bool:
    return sys.stderr.isatty() if args.progress is None else args.progress


def cmd_monitor(args) -> int:
    from thinstack import monitor

    return monitor.run(once=args.once, interval=args.interval)


def cmd_lab(args) -> int:
    from thinstack import lab

    if args.lab_command == "setup":
        lab.setup(log=lambda m: print(m, file=sys.stderr))
        return 0
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    spec = lab.LabSpec(command=argv, disks=args.disks, disk_size=args.disk_size, mem=args.mem,
                       state=args.state, timeout=args.timeout, writable=args.rw)
    return lab.run_lab(spec)


def _terminate(signum, frame):
    # SIGTERM unwinds like Ctrl-C, so an operation in progress rolls back before exiting.
    raise KeyboardInterrupt


def _parse(argv: list[str] | None):
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `pool create VG --raid1 DEV DEV`: argparse hands a positional list that follows a flag
    # back as unknown; devices may come anywhere after the VG.
    if extra and args.command == "pool" and args.pool_command == "create" \
            and not any(e.startswith("-") for e in extra):
        args.devices += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        what = ("the import is kept: continue it with --resume, or remove it with "
                "`thinstack recover`") if args.command == "import" else \
            "the operation was rolled back"
        print(f"thinstack: interrupted; {what}", file=sys.stderr)
        return 130
    except Exception as e:
        status = _exit_status(e)
        if status is None:
            raise
        print(f"thinstack: {e}", file=sys.stderr)
        return status


def _exit_status(e: Exception) -> int | None:
    """The documented status of an error a user can meet; None for a bug (shown in full)."""
    from thinstack.dm.command import CommandError
    from thinstack.dm.errors import DmError
    from thinstack.errors import ThinstackError

    if isinstance(e, ThinstackError):
        return e.exit_status
    if isinstance(e, (DmError, CommandError)):
        return 1  # the dm layer's own, not translated where thinstack called it
    return None


if __name__ == "__main__":
    sys.exit(main())
