"""LVM through one runner. Reports are read as JSON (`--reportformat json`) and parsed once, here,
into small types; nothing above this module sees LVM's text."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from thinstack.dm.command import CommandError, run

__all__ = ["CommandError", "LV", "VG", "PV", "VolumeRef", "check_name", "check_user_name", "lvm",
           "lvs", "vgs", "pvs", "lv", "find_lv"]

# LVM refuses these itself, but with messages an operator has to decode; ours name the rule.
_NAME = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}")
_RESERVED = ("_cdata", "_cmeta", "_corig", "_mimage", "_mlog", "_pmspare", "_rimage", "_rmeta",
             "_tdata", "_tmeta", "_vorigin", "_vdata")


class BadName(ValueError):
    pass


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
    def parse(cls, text: str) -> "VolumeRef":
        vg, sep, name = text.partition("/")
        if not sep or "/" in name:
            raise BadName(f"expected VG/NAME, got {text!r}")
        return cls(check_name(vg, "volume group name"), check_user_name(name, "volume name"))

    def __str__(self) -> str:
        return f"{self.vg}/{self.name}"


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
    vg_free: int = 0  # the VG's free bytes when this was read: a pool's room to grow

    @property
    def ref(self) -> VolumeRef:
        return VolumeRef(self.vg, self.name)

    @property
    def active(self) -> bool:
        return self.attr[4] == "a"

    @property
    def readonly(self) -> bool:
        return self.attr[1] == "r"

    @property
    def is_thin_pool(self) -> bool:
        return self.attr[0] == "t"

    @property
    def is_thin(self) -> bool:
        return self.attr[0] == "V"

    @property
    def is_cow_snapshot(self) -> bool:
        """An old-style (dm-snapshot) snapshot with its own COW store."""
        return self.attr[0] in "sS"

    @property
    def internal(self) -> bool:
        return self.name.startswith("[") or self.attr[0] in "iIlemrRTcCdDe"


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


def lvm(*args: str, timeout: float = 300) -> str:
    """Run one lvm command (`lvm lvcreate ...`), never interactively."""
    return run(["lvm", *args], timeout=timeout)


_LV_FIELDS = ("lv_name,vg_name,lv_uuid,lv_attr,lv_size,segtype,pool_lv,origin,data_percent,"
              "metadata_percent,lv_tags,lv_path,lv_dm_path,thin_id,chunk_size,lv_metadata_size,"
              "lv_skip_activation,lv_when_full,vg_free")


def _report(command: str, fields: str, key: str, *args: str) -> list[dict[str, str]]:
    out = lvm(command, "--reportformat", "json", "--units", "b", "--nosuffix", "--binary",
              "-o", fields, *args)
    rows: list[dict[str, str]] = []
    for report in json.loads(out).get("report", []):
        rows.extend(report.get(key, []))
    return rows


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
              vg_free=_int(row.get("vg_free", "")))


def lvs(vg: str | None = None, *, all_: bool = False) -> list[LV]:
    args = ["-a"] if all_ else []
    return [_lv(r) for r in _report("lvs", _LV_FIELDS, "lv", *args, *([vg] if vg else []))]


def lv(ref: VolumeRef) -> LV:
    found = find_lv(ref)
    if found is None:
        raise LookupError(f"{ref}: no such volume")
    return found


def find_lv(ref: VolumeRef) -> LV | None:
    try:
        rows = _report("lvs", _LV_FIELDS, "lv", str(ref))
    except CommandError as e:
        if "not found" in e.stderr or "Failed to find" in e.stderr:
            return None
        raise
    return _lv(rows[0]) if rows else None


def vgs(vg: str | None = None) -> list[VG]:
    fields = ("vg_name,vg_uuid,vg_size,vg_free,vg_extent_size,vg_extent_count,vg_free_count,"
              "pv_count,vg_tags")
    try:
        rows = _report("vgs", fields, "vg", *([vg] if vg else []))
    except CommandError as e:
        if vg and ("not found" in e.stderr or "Cannot process volume group" in e.stderr):
            return []
        raise
    return [VG(name=r["vg_name"], uuid=r["vg_uuid"], size=_int(r["vg_size"]),
               free=_int(r["vg_free"]), extent_size=_int(r["vg_extent_size"]),
               extent_count=_int(r["vg_extent_count"]), free_count=_int(r["vg_free_count"]),
               pv_count=_int(r["pv_count"]), tags=_tags(r["vg_tags"])) for r in rows]


def pvs() -> list[PV]:
    rows = _report("pvs", "pv_name,vg_name,pv_size,pv_free", "pv")
    return [PV(name=r["pv_name"], vg=r["vg_name"], size=_int(r["pv_size"]),
               free=_int(r["pv_free"])) for r in rows]
