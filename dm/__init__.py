"""thinstack's device-mapper layer: dm devices, dm-thin pools and thin-provisioning-tools, with
every table, status line and tool output as a type. It knows nothing of LVM or image formats.

Modules: command (running programs, CommandError), targets (tables), status (status lines),
client (DeviceMapper: ioctls for reads and messages, dmsetup where nodes appear or vanish), ioctl
(the control node's ioctls), udev (waiting for udev), pool (raw thin pools and their
transactions), tools (thin_dump, thin_delta, thin_ls, thin_check), errors.
"""
