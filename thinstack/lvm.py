"""LVM through one runner: `Lvm` runs lvm commands, reads its reports (JSON, parsed once here
into small types) and turns its failures into thinstack errors; nothing above this module sees
LVM's text. `LVM` is the instance over the real runner; tests build one over a fake."""

from __future__ import annotations

import atexit
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

from thinstack import hidden, lvmshell, tags
from thinstack.dm.command import RUNNER, CommandError, Runner
from thinstack.dm.errors import ParseError
from thinstack.errors import Exists, NoSpace, NotFound, Refused, ThinstackError, Usage

__all__ = [
    "LV",
    "LVM",
    "PV",
    "VG",
    "PoolRef",
    "CommandError",
    "Lvm",
    "VolumeRef",
    "check_name",
    "check_user_name",
    "classify",
    "external_origin",
    "find_lv",
    "holding_pool",
    "lv",
    "lvm",
    "lvs",
    "pool_of",
    "pools_of",
    "pvs",
    "vgs",
    "volume_pool",
    "volumes_of",
]

# LVM refuses these itself, but with messages an operator has to decode; ours name the rule.
_NAME = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}")
_RESERVED = ("_cdata", "_cmeta", "_corig", "_mimage", "_mlog", "_pmspare", "_rimage", "_rmeta",
             "_tdata", "_tmeta", "_vorigin", "_vdata")


class BadName(Usage, ValueError):
    """A name or argument the operator gave wrong: a usage error."""
    exit_status = 2


def check_name(name: str, what: str = "name") -> str:
    if not _NAME.fullmatch(name) or name in (".", "..") or name.startswith(("snapshot", "pvmove")) \
            or any(r in name for r in _RESERVED):
        raise BadName(f"invalid {what} {name!r}: use letters, digits, '+', '_', '.', '-' "
                         "(not starting with '-', 'snapshot' or 'pvmove', no LVM suffixes)")
    return name


# The names thinstack gives its own volumes: NAME.importing (an import in progress),
# NAME.export-ID (an export's snapshot), NAME.last-export (the next incremental export's base).
# An operator's volume by such a name would be taken for thinstack's and used or removed.
_OWN = re.compile(r".*(\.importing|\.last-export|\.export-.*)")


def check_user_name(name: str, what: str = "name") -> str:
    """check_name, and none of the names thinstack makes for itself: for every name an operator
    gives (thinstack builds its own through check_name)."""
    check_name(name, what)
    if _OWN.fullmatch(name):
        raise BadName(f"invalid {what} {name!r}: names ending in '.importing' or '.last-export' "
                      "or with '.export-' are thinstack's own")
    return name


@dataclass(frozen=True)
class VolumeRef:
    vg: str
    name: str

    @classmethod
    def parse(cls, text: str) -> VolumeRef:
        vg, sep, name = text.partition("/")
        if not sep or "/" in name:
            raise BadName(f"expected VG/NAME, got {text!r}")
        return cls(check_name(vg, "volume group name"), check_user_name(name, "volume name"))

    def __str__(self) -> str:
        return f"{self.vg}/{self.name}"

    @property
    def path(self) -> str:
        """Where the volume's device is (LVM's link; thinstack's, for clones of outside
        devices)."""
        return f"/dev/{self.vg}/{self.name}"


@dataclass(frozen=True)
class LV:
    vg: str
    name: str
    uuid: str
    attr: str
    size: int
    segtype: str
    pool: str
    origin: str
    data_percent: float | None
    metadata_percent: float | None
    tags: frozenset[str]
    path: str
    dm_path: str
    thin_id: int | None
    chunk_size: int
    metadata_size: int
    skip_activation: bool
    when_full: str
    # The VG's, read in the same report (so no command needs a `vgs` as well): its free bytes
    # (a pool's room to grow), size, extent size and tags.
    vg_free: int = 0
    vg_size: int = 0
    vg_extent_size: int = 0
    vg_tags: frozenset[str] = frozenset()
    vg_uuid: str = ""
    open: bool = False  # something (a VM, a mount) holds the device open

    @property
    def ref(self) -> VolumeRef:
        return VolumeRef(self.vg, self.name)

    @property
    def op_tags(self) -> frozenset[str]:
        """The tags of operations that made this volume and have not committed it (the
        commit removes the tag): an unfinished volume, hidden from the operator."""
        return frozenset(t for t in self.tags if t.startswith(tags.OP_PREFIX))

    @property
    def active(self) -> bool:
        # "c": a thin pool active in the kernel that needs a check (needs_check).
        return self.attr[4] in "ac"

    @property
    def readonly(self) -> bool:
        return self.attr[1] == "r"

    @property
    def is_thin_pool(self) -> bool:
        return self.attr[0] == "t"

    @property
    def is_thin(self) -> bool:
        # "o": a thin volume that is the external origin of clones in another pool.
        return self.attr[0] == "V" or self.segtype == "thin"

    @property
    def is_cow_snapshot(self) -> bool:
        """An old-style (dm-snapshot) snapshot with its own COW store."""
        return self.attr[0] in "sS"

    @property
    def internal(self) -> bool:
        return self.name.startswith("[") or self.attr[0] in "iIlemrRTcCdDe"


def dm_name(vg: str, name: str) -> str:
    """The dm name LVM gives an LV: VG-NAME, each name's dashes doubled."""
    return f"{vg.replace('-', '--')}-{name.replace('-', '--')}"


_UUID_GROUPS = (0, 6, 10, 14, 18, 22, 26, 32)  # LVM prints a uuid's 32 characters so dashed


def lv_uuid(dm_uuid: str) -> str:
    """The LV's uuid as LVM reports it, from its own device's dm uuid: "LVM-", then the VG's
    uuid and the LV's, 32 characters each without their dashes."""
    raw = dm_uuid.removeprefix("LVM-")
    if raw == dm_uuid or len(raw) != 64 or not raw.isalnum():
        raise ParseError(f"not the dm uuid of an LV's own device: {dm_uuid!r}")
    return "-".join(raw[32 + a:32 + b] for a, b in pairwise(_UUID_GROUPS))


@dataclass(frozen=True)
class VG:
    name: str
    uuid: str
    size: int
    free: int
    extent_size: int
    extent_count: int
    free_count: int
    pv_count: int
    tags: frozenset[str]


@dataclass(frozen=True)
class PV:
    name: str
    vg: str
    size: int
    free: int


_LV_FIELDS = ("lv_name,vg_name,lv_uuid,lv_attr,lv_size,segtype,pool_lv,origin,data_percent,"
              "metadata_percent,lv_tags,lv_path,lv_dm_path,thin_id,chunk_size,lv_metadata_size,"
              "lv_skip_activation,lv_when_full,lv_device_open,vg_free,vg_size,vg_extent_size,"
              "vg_tags,vg_uuid")


def _int(text: str) -> int:
    return int(float(text)) if text else 0


def _pct(text: str) -> float | None:
    return float(text) if text else None


def _tags(text: str) -> frozenset[str]:
    return frozenset(t for t in text.split(",") if t)


def _lv(row: dict[str, str]) -> LV:
    return LV(vg=row["vg_name"], name=row["lv_name"], uuid=row["lv_uuid"], attr=row["lv_attr"],
              size=_int(row["lv_size"]), segtype=row["segtype"], pool=row["pool_lv"],
              origin=row["origin"], data_percent=_pct(row["data_percent"]),
              metadata_percent=_pct(row["metadata_percent"]), tags=_tags(row["lv_tags"]),
              path=row["lv_path"], dm_path=row["lv_dm_path"],
              thin_id=int(row["thin_id"]) if row["thin_id"] else None,
              chunk_size=_int(row["chunk_size"]), metadata_size=_int(row["lv_metadata_size"]),
              skip_activation=row["lv_skip_activation"] == "1", when_full=row["lv_when_full"],
              vg_free=_int(row.get("vg_free", "")), vg_size=_int(row.get("vg_size", "")),
              vg_extent_size=_int(row.get("vg_extent_size", "")),
              vg_tags=_tags(row.get("vg_tags", "")), vg_uuid=row.get("vg_uuid", ""),
              open=row.get("lv_device_open") == "1")


# LVM's messages for each kind of failure, as lvm2 prints them (one per line of its stderr).
_KINDS: list[tuple[type[ThinstackError], re.Pattern[str]]] = [
    (NotFound, re.compile(r'^(Volume group "[^"]*" not found|Failed to find logical volume '
                          r'"[^"]*"|Cannot process volume group \S+)')),
    (Exists, re.compile(r'^Logical [Vv]olume "?[^"\s]*"? already exists in volume group')),
    (NoSpace, re.compile(r'^(Insufficient free space: |Volume group "[^"]*" has insufficient '
                         r'free space|Cannot create new thin volume, free space in thin pool '
                         r'|Thin pool \S+ .*out of data space)')),
    (Refused, re.compile(r"^(Logical volume \S+ (is )?(in use|used by another device|contains "
                         r"a filesystem in use)|Can't (remove|deactivate|change) open "
                         r"|Logical volume \S+ is open\b)")),
]


def classify(e: CommandError) -> ThinstackError:
    """An lvm failure as the operator should read it: the first line of LVM's stderr that names
    a known kind of failure, else its last line, as a thinstack error of that kind."""
    lines = [line.strip() for line in e.stderr.splitlines() if line.strip()]
    for line in lines:
        for kind, pattern in _KINDS:
            if pattern.match(line):
                return kind(line)
    return ThinstackError(lines[-1] if lines else str(e))


_REPORTS = ("lvs", "vgs", "pvs")  # LVM commands that change nothing, so may run twice


class Lvm:
    """lvm commands (`lvm lvcreate ...`, never interactive): each a line to `shell` where it can
    be one (lvmshell), else a process through `runner`."""

    def __init__(self, runner: Runner = RUNNER, shell: lvmshell.LvmShell | None = None,
                 hide: Callable[[], list[str]] = hidden.devices):
        """hide: the devices LVM must not scan now (a live import's: see hidden.py)."""
        self.runner = runner
        self.shell = shell
        self.hide = hide
        self._host_filter: list[str] | None = None

    def run(self, *args: str, timeout: float | None = None) -> str:
        """Run one lvm command; a failure raises its classified thinstack error. Returns its
        JSON report (what a process prints to stdout, or the shell to its report descriptor)."""
        try:
            args = self._filtered(args)
            if self.shell is not None and (text := lvmshell.line(args)) is not None:
                try:
                    return self.shell.run(args, text, timeout)
                except lvmshell.Unexplained:
                    if args[0] not in _REPORTS:
                        raise
            return self.runner.run(["lvm", *args], timeout=timeout)
        except CommandError as e:
            raise classify(e) from e

    def _filtered(self, args: tuple[str, ...]) -> tuple[str, ...]:
        """args with a device filter that hides what a live import shows, while there is one
        (asking LVM once for the host's own filter, to keep it)."""
        devices = self.hide()
        if not devices:
            return args
        if self._host_filter is None:
            self._host_filter = hidden.host_patterns(self.runner.run(
                ["lvmconfig", "--typeconfig", "full", "devices/filter"]))
        ours = hidden.config(hidden.aliases(devices), self._host_filter)
        if "--config" in args:  # LVM takes the option once: one string holds both
            at = args.index("--config") + 1
            return (*args[:at], f"{args[at]} {ours}", *args[at + 1:])
        return (args[0], "--config", ours, *args[1:])

    def close(self) -> None:
        """End the shell, if any (the next command starts another): so that a long-running
        process (the monitor) does not keep one LVM process, and its view of the
        configuration (the host's device filter too), for ever."""
        self._host_filter = None
        if self.shell is not None:
            self.shell.close()

    def _report(self, command: str, fields: str, key: str, *args: str) -> list[dict[str, str]]:
        out = self.run(command, "--reportformat", "json", "--units", "b", "--nosuffix",
                       "--binary", "-o", fields, *args)
        rows: list[dict[str, str]] = []
        for report in json.loads(out).get("report", []):
            rows.extend(report.get(key, []))
        return rows

    def lvs(self, vg: str | None = None, *, all_: bool = False, select: str | None = None
            ) -> list[LV]:
        """`select`: LVM's selection (`-S`), so that LVM reports only the rows wanted."""
        args = [*(["-a"] if all_ else []), *(["-S", select] if select else [])]
        return [_lv(r) for r in self._report("lvs", _LV_FIELDS, "lv", *args,
                                             *([vg] if vg else []))]

    def lv(self, ref: VolumeRef) -> LV:
        found = self.find_lv(ref)
        if found is None:
            raise NotFound(f"{ref}: no such volume")
        return found

    def find_lv(self, ref: VolumeRef) -> LV | None:
        try:
            rows = self._report("lvs", _LV_FIELDS, "lv", str(ref))
        except NotFound:
            return None
        return _lv(rows[0]) if rows else None

    def vgs(self, vg: str | None = None) -> list[VG]:
        fields = ("vg_name,vg_uuid,vg_size,vg_free,vg_extent_size,vg_extent_count,"
                  "vg_free_count,pv_count,vg_tags")
        try:
            rows = self._report("vgs", fields, "vg", *([vg] if vg else []))
        except NotFound:
            if vg:
                return []
            raise
        return [VG(name=r["vg_name"], uuid=r["vg_uuid"], size=_int(r["vg_size"]),
                   free=_int(r["vg_free"]), extent_size=_int(r["vg_extent_size"]),
                   extent_count=_int(r["vg_extent_count"]), free_count=_int(r["vg_free_count"]),
                   pv_count=_int(r["pv_count"]), tags=_tags(r["vg_tags"])) for r in rows]

    def pvs(self) -> list[PV]:
        rows = self._report("pvs", "pv_name,vg_name,pv_size,pv_free", "pv")
        return [PV(name=r["pv_name"], vg=r["vg_name"], size=_int(r["pv_size"]),
                   free=_int(r["pv_free"])) for r in rows]

    def volumes_of(self, vg: str) -> list[LV]:
        """The VG's volumes; NotFound when there is no such VG."""
        try:
            return self.lvs(vg)
        except NotFound:
            raise NotFound(f"volume group {vg} not found") from None


@dataclass(frozen=True)
class PoolRef:
    """A pool as commands name it: `VG/POOL`, or `VG` alone for a VG's only pool (name None)."""
    vg: str
    name: str | None = None

    @classmethod
    def parse(cls, text: str) -> PoolRef:
        vg, sep, name = text.partition("/")
        if sep and (not name or "/" in name):
            raise BadName(f"expected VG or VG/POOL, got {text!r}")
        return cls(check_name(vg, "volume group name"),
                   check_user_name(name, "pool name") if sep else None)

    def __str__(self) -> str:
        return self.vg if self.name is None else f"{self.vg}/{self.name}"


def pools_of(lvs: list[LV]) -> list[LV]:
    """thinstack's pools among `lvs` (one VG's): the thin pools tagged as thinstack's; in a VG
    with none tagged, its only thin pool (a pool LVM made, adopted as it is)."""
    pools = [lv for lv in lvs if lv.is_thin_pool]
    ours = [p for p in pools if tags.POOL in p.tags]
    return ours or (pools if len(pools) == 1 else [])


def pool_of(vg: str, lvs: list[LV], name: str | None = None) -> LV:
    """The pool called `name` among the VG's `lvs`; with no name, the VG's only pool. A VG of
    several pools needs the name (a usage error without it: which tenant is meant is the
    operator's to say)."""
    pools = pools_of(lvs)
    if name is not None:
        found = next((p for p in pools if p.name == name), None)
        if found is None:
            raise NotFound(f"{vg}/{name}: no such thin pool" + (
                f" (the volume group has {', '.join(sorted(p.name for p in pools))})"
                if pools else ""))
        return found
    if len(pools) == 1:
        return pools[0]
    if pools:
        raise Usage(f"volume group {vg} has several pools "
                      f"({', '.join(sorted(p.name for p in pools))}): name one (VG/POOL, or "
                      "--pool POOL for a new volume)")
    several = sum(1 for lv in lvs if lv.is_thin_pool)
    raise NotFound(f"volume group {vg} has no thin pool; create one with `thinstack pool create`"
                   if not several else
                   f"volume group {vg} has several thin pools and none tagged {tags.POOL}")


def holding_pool(lv: LV, lvs: list[LV]) -> LV | None:
    """The pool among `lvs` that holds `lv`'s blocks; None for a volume in no pool."""
    return next((p for p in lvs if p.is_thin_pool and p.name == lv.pool), None) \
        if lv.pool else None


def external_origin(lv: LV, lvs: list[LV]) -> LV | None:
    """The LV whose blocks thin volume `lv` reads wherever it maps none, when they are not in
    its own pool: a read-only LV outside any pool, or a gold master of another pool (a clone
    across tenants). None: what it does not map reads zeros or its pool's shared blocks."""
    origin = next((o for o in lvs if o.name == lv.origin), None) if lv.origin else None
    if origin is None or (origin.is_thin and origin.pool == lv.pool):
        return None
    return origin


def volume_pool(lv: LV, lvs: list[LV]) -> LV:
    """The pool that holds thin volume `lv`'s blocks."""
    found = holding_pool(lv, lvs)
    if found is None:
        raise NotFound(f"{lv.ref} is in no thin pool")
    return found


def _shell() -> lvmshell.LvmShell | None:
    """The shell the real Lvm uses: none when lvm2's profile for it is missing, or when
    THINSTACK_LVM_SHELL=0 (one process per LVM command, as by hand)."""
    if os.environ.get("THINSTACK_LVM_SHELL") == "0" or not lvmshell.LvmShell.available():
        return None
    shell = lvmshell.LvmShell()
    atexit.register(shell.close)
    # A forked child (a daemon) must not share the parent's pipes: it starts its own shell.
    os.register_at_fork(after_in_child=shell.forget)
    return shell


LVM = Lvm(RUNNER, _shell())  # the real one; tests put a fake in its place


def default_lvm() -> Lvm:
    """The Lvm of callers that were handed none."""
    return LVM


# The default Lvm's methods, for callers with no Lvm of their own (looked up at each call).
def lvm(*args: str, timeout: float | None = None) -> str:
    return LVM.run(*args, timeout=timeout)


def lvs(vg: str | None = None, *, all_: bool = False) -> list[LV]:
    return LVM.lvs(vg, all_=all_)


def lv(ref: VolumeRef) -> LV:
    return LVM.lv(ref)


def find_lv(ref: VolumeRef) -> LV | None:
    return LVM.find_lv(ref)


def vgs(vg: str | None = None) -> list[VG]:
    return LVM.vgs(vg)


def pvs() -> list[PV]:
    return LVM.pvs()


def volumes_of(vg: str) -> list[LV]:
    return LVM.volumes_of(vg)
