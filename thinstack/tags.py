"""thinstack's state that belongs with the volumes lives in LVM tags, so it is committed
atomically with LVM's own metadata and travels with the disks. One place names them all."""

from __future__ import annotations

OP_PREFIX = "ts_op_"          # ts_op_<id>: made by operation <id>, not yet committed
GOLD = "ts_gold"              # a gold master: read-only, protected while cloned
POOL = "ts_pool"              # the thin pool thinstack manages in this VG
GROW_THRESHOLD = "ts_grow_threshold"  # =PCT on a pool or CoW volume: grow when use crosses it
GROW_STEP = "ts_grow_step"    # =BYTES on a pool or CoW volume: how much to add each time
BACKING_FILE = "ts_file"      # =PATH on a VG whose PV is a loop device over this file
NO_GROW = "ts_no_grow"        # growth switched off for this pool
LIMIT = "ts_limit"            # =BYTES on a pool: its data never grows past this (a quota)
OVERCOMMIT = "ts_overcommit"  # =RATIO on a pool: its volumes' sizes may add up to RATIO x LIMIT
EXT_ORIGIN = "ts_ext_origin"  # =PATH on a clone of a device outside the VG: its origin
EXT_SIZE = "ts_ext_size"      # =BYTES: that origin's size when the clone was made
LAST_EXPORT = "ts_last_export"  # NAME.last-export: the base of the next --incremental export
LIVE = "ts_live"              # a volume still being copied in by a live import (live.py)
LIVE_META = "ts_live_meta"    # NAME.clonemeta: that copy's dm-clone metadata


def value(tags: frozenset[str] | set[str], key: str) -> str | None:
    """The value of a `key=value` tag, or None."""
    for t in tags:
        if t.startswith(key + "="):
            return t[len(key) + 1:]
    return None


def kv(key: str, val: object) -> str:
    text = f"{key}={val}"
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_+.-/=!:&#")
    if not set(text) <= allowed or len(text) > 1024:
        raise ValueError(f"cannot store {text!r} as an LVM tag")
    return text
