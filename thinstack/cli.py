"""The `thinstack` command line. Each subcommand parses its arguments, calls one function of the
library, and turns the library's errors into one line on stderr and a documented exit status."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from thinstack.sizes import parse_size

# Documented exit statuses (README "Exit statuses").
EXIT_OK = 0
EXIT_ERROR = 1  # the operation failed; nothing was left half-made
EXIT_USAGE = 2


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="thinstack", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    lab = sub.add_parser("lab", help="a real kernel (User-Mode Linux) with device-mapper, on demand")
    labsub = lab.add_subparsers(dest="lab_command", required=True)
    labsub.add_parser("setup", help="fetch and prepare the lab kernel (idempotent)")
    r = labsub.add_parser("run", help="boot the lab, run COMMAND inside as root, power off")
    r.add_argument("--disks", type=int, default=0, help="blank scratch disks /dev/ubdb, /dev/ubdc, ...")
    r.add_argument("--disk-size", type=_size, default=1 << 30, metavar="SIZE")
    r.add_argument("--mem", type=_size, default=768 << 20, metavar="SIZE")
    r.add_argument("--state", type=Path, metavar="DIR", help="keep the disks here between runs")
    r.add_argument("--timeout", type=float, metavar="SECONDS", help="kill the lab after this long")
    r.add_argument("--rw", type=Path, action="append", default=[], metavar="PATH",
                   help="a host folder COMMAND may write (cwd and /tmp always are)")
    r.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]")
    return p


def cmd_lab(args) -> int:
    from thinstack import lab

    if args.lab_command == "setup":
        lab.setup(log=lambda m: print(m, file=sys.stderr))
        return EXIT_OK
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    spec = lab.LabSpec(command=argv, disks=args.disks, disk_size=args.disk_size, mem=args.mem,
                       state=args.state, timeout=args.timeout, writable=args.rw)
    return lab.run_lab(spec)


def main(argv: list[str] | None = None) -> int:
    from thinstack.lab import LabError

    args = build_parser().parse_args(argv)
    try:
        return {"lab": cmd_lab}[args.command](args)
    except LabError as e:
        print(f"thinstack: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("thinstack: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
