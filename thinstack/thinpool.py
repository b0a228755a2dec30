"""The kernel's view of an LVM thin pool: its dm-thin device, the one metadata snapshot readers
share (and the lock they take turns by), and whether its metadata has room for one more
snapshot. Knows dm and locks, not LVM: callers hand in the pool's LV."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from thinstack import growth
from thinstack.dm.client import DeviceMapper
from thinstack.dm.command import CommandError
from thinstack.dm.errors import DmError, MetadataSnapHeld
from thinstack.dm.pool import Pool
from thinstack.dm.status import ThinPoolStatus
from thinstack.errors import NoSpace, Refused, ThinstackError
from thinstack.lock import LockTimeout, flocked
from thinstack.state import run_dir

if TYPE_CHECKING:
    from thinstack.lvm import LV

T = TypeVar("T")

# A reader holding the metadata snapshot for longer than this is stuck, not slow.
METADATA_READER_WAIT = 30.0


@contextmanager
def metadata_reader(name: str) -> Iterator[Path]:
    """Pool.reader_lock for thin-pool device `name`: see Pool."""
    path = run_dir() / "locks" / f"{name}.metasnap"
    with flocked(path, METADATA_READER_WAIT, f"thin-pool {name}: another reader has held its "
                 f"metadata snapshot for over {METADATA_READER_WAIT:g} s"):
        yield path.with_name(f"{name}.metasnap-held")


def kernel_pool(pool: LV, dm: DeviceMapper | None = None) -> Pool | None:
    """The kernel's thin-pool device of an LVM pool, or None when it is not active. LVM stacks
    it as VG-pool-tpool once thin volumes use the pool, and as VG-pool itself before."""
    dm = dm or DeviceMapper()
    name = os.path.basename(pool.dm_path)
    for candidate in (f"{name}-tpool", name):
        if dm.exists(candidate):
            return Pool(dm, candidate, reader_lock=partial(metadata_reader, candidate))
    return None


def reading_metadata(pool: LV, read: Callable[[], T]) -> T:
    """Run `read` (which reserves the pool's one metadata snapshot): Refused if another reader,
    thinstack's or anyone's, holds it now; any other failure as a thinstack error."""
    try:
        return read()
    except LockTimeout as e:  # another thinstack reader, for longer than we wait
        raise Refused(f"{pool.ref}: {e}; try again shortly") from None
    except (MetadataSnapHeld, CommandError) as e:
        if isinstance(e, MetadataSnapHeld) or "reserve_metadata_snap" in e.argv:
            raise Refused(f"{pool.ref}: another reader holds the pool's metadata snapshot; "
                          "try again shortly") from None
        raise ThinstackError(f"{pool.ref}: {e}") from None
    except DmError as e:
        raise ThinstackError(f"{pool.ref}: {e}") from None


def refuse_if_metadata_would_run_out(pool: LV, kernel: Pool | None = None) -> None:
    """A pool whose metadata fills turns read-only for every volume in it; one more snapshot
    is not worth that. Refuse it while there is still time for the operator to act.
    `kernel`: the pool's kernel device (kernel_pool), if the caller has it already."""
    kernel = kernel or kernel_pool(pool)
    status = kernel.status() if kernel is not None else None
    if not isinstance(status, ThinPoolStatus):
        return  # an inactive or failed pool: LVM itself will refuse
    room = pool.vg_free  # read with the pool: no need to ask LVM again
    if not growth.metadata_projection_ok(status, chunk=pool.chunk_size, room=room):
        raise NoSpace(f"pool {pool.vg}/{pool.name}: metadata is projected to run out if another "
                      "snapshot shares its blocks; grow it (`lvextend --poolmetadatasize`) or "
                      "free space in the volume group first")
