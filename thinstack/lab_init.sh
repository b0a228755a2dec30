#!/bin/sh
# PID 1 of the lab kernel. The kernel's root is the host's / over hostfs, which is writable: so
# this script writes nothing there. It builds an overlay root (host / below, tmpfs above), binds
# through only the paths the job may write (listed by the host), and runs the job in it.
# THINSTACK_JOB (from the kernel command line) is the host folder holding job.sh, binds, modules.
# Whatever happens, it ends in a power-off: a PID 1 that exits makes the kernel panic.

job=$THINSTACK_JOB
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH

fail() {
    echo "$*" > "$job/boot-error"
    poweroff_now
}

poweroff_now() {
    sync
    echo o > /proc/sysrq-trigger
    # The power-off runs asynchronously; PID 1 must outlive it.
    while :; do sleep 10; done
}

mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sys /sys || fail "cannot mount /sys"
mount -t tmpfs -o mode=0755 lab /run || fail "cannot mount a tmpfs on /run"
modules=$(cat "$job/modules") || fail "job folder $job unreadable"
insmod "$modules/kernel/fs/overlayfs/overlay.ko" || fail "cannot load overlayfs from $modules"

new=/run/lab/root
mkdir -p /run/lab/upper /run/lab/work $new
mount -t overlay lab -o lowerdir=/,upperdir=/run/lab/upper,workdir=/run/lab/work $new \
    || fail "cannot mount the overlay root"

# Writes under these paths reach the host; everywhere else they land in the tmpfs and vanish.
while IFS= read -r path; do
    [ -n "$path" ] || continue
    mount --bind "$path" "$new$path" || fail "cannot bind $path into the lab"
done < "$job/binds"

# /dev is the kernel's devtmpfs: on a real system udev and systemd add these links, which bash's
# process substitution (<(...)) and programs reading /dev/stdin need.
if grep -q "^devtmpfs /dev " /proc/mounts; then
    [ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
    for n in 0:stdin 1:stdout 2:stderr; do
        [ -e "/dev/${n#*:}" ] || ln -s "/proc/self/fd/${n%%:*}" "/dev/${n#*:}"
    done
fi
mount --rbind /dev $new/dev || fail "cannot bind /dev"
mount -t proc proc $new/proc
mount -t sysfs sys $new/sys
mount -t tmpfs -o mode=0755 lab $new/run
mkdir -p $new/run/lock $new/run/lvm $new/tmp
release=$(uname -r)
mkdir -p "$new/lib/modules/$release"
mount --bind "$modules" "$new/lib/modules/$release" || fail "cannot bind the kernel modules"

exec chroot $new /bin/sh -s "$job" <<'STAGE2'
job=$1
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH

fail() {
    echo "$*" > "$job/boot-error"
    sync; echo o > /proc/sysrq-trigger; while :; do sleep 10; done
}

# Console lines to the caller's stdout and stderr: raw, so bytes pass unchanged.
stty -F /dev/tty1 raw -echo 2>/dev/null
stty -F /dev/tty2 raw -echo 2>/dev/null

for m in dm-mod dm-thin-pool dm-snapshot loop; do
    modprobe "$m" || fail "modprobe $m failed"
done
# Live import (thinstack/live.py) serves images on nbd devices; 16 of them, as on a host.
modprobe nbd nbds_max=16 || fail "modprobe nbd failed"
# As kmod's static nodes do at boot: the first open of /dev/fuse loads the fuse module.
[ -e /dev/fuse ] || mknod -m 0666 /dev/fuse c 10 229

/lib/systemd/systemd-udevd --daemon >/dev/null 2>&1 || fail "systemd-udevd did not start"
udevadm trigger --action=add --subsystem-match=block --subsystem-match=misc >/dev/null 2>&1
udevadm settle --timeout=30 || fail "udev did not settle"

echo booted > "$job/booted"
sh "$job/job.sh" </dev/null >/dev/tty1 2>/dev/tty2
echo $? > "$job/status"

udevadm control --exit >/dev/null 2>&1
sync
echo o > /proc/sysrq-trigger
while :; do sleep 10; done
STAGE2
