"""The lab: a real Linux kernel (User-Mode Linux) on demand, with device-mapper, md, loop and udev.

The kernel runs as an ordinary process with the host's / as its root (hostfs, under an overlay so
the host's files stay as they were) and runs one command as root, then powers off. Debian sid's
UML is used because older ones crash on CPUs with AMX; it needs a newer glibc than bookworm has,
so `setup()` fetches the kernel and a libc6 with a private apt configuration into a cache folder
and points the kernel binary at that libc with patchelf. The system's apt sources are never
touched.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from thinstack.dm import command
from thinstack.errors import ThinstackError

INIT = Path(__file__).with_name("lab_init.sh")
PACKAGES = ("user-mode-linux", "libc6")

# Exit statuses of `thinstack lab run` that are the lab's own, not COMMAND's.
EXIT_NO_KERNEL = 123
EXIT_TIMEOUT = 124
EXIT_BOOT_FAILED = 125

# Paths a job never gets to write through to the host, even when an argument names them.
_SYSTEM = {Path(p) for p in ("/", "/dev", "/proc", "/sys", "/run", "/usr", "/etc", "/bin", "/sbin",
                              "/lib", "/lib64", "/var", "/boot", "/root", "/home", "/opt", "/srv")}


class LabError(ThinstackError):
    """The lab itself failed: its status is one of the EXIT_* above (or 2, 127), not 1."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


def cache_dir() -> Path:
    if "THINSTACK_CACHE" in os.environ:
        return Path(os.environ["THINSTACK_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "thinstack"


@dataclass(frozen=True)
class Kernel:
    binary: Path
    modules: Path  # the folder that becomes /lib/modules/$(uname -r) inside the guest

    @classmethod
    def find(cls, cache: Path | None = None) -> Kernel:
        root = (cache or cache_dir()) / "uml"
        binary = root / "linux"
        versions = sorted((root / "root/usr/lib/uml/modules").glob("[0-9]*"))
        if not binary.exists() or not versions:
            raise LabError(f"lab kernel not installed in {root}: run `thinstack lab setup` "
                           "(or scripts/setup)", EXIT_NO_KERNEL)
        return cls(binary, versions[-1])


# ---------------------------------------------------------------------------------------------
# Setup: fetch sid's user-mode-linux and libc6 without touching the system's apt configuration.

def debian_mirror(sources_dir: Path = Path("/etc/apt")) -> tuple[str, str | None]:
    """The Debian mirror URI and keyring the machine's own apt sources use."""
    for f in sorted((sources_dir / "sources.list.d").glob("*.sources")):
        for stanza in f.read_text().split("\n\n"):
            fields = dict(_deb822_fields(stanza))
            uris = fields.get("URIs", "").split()
            suites = fields.get("Suites", "").split()
            if uris and suites and not any(s.endswith("-security") for s in suites) \
                    and "deb" in fields.get("Types", "deb").split():
                return uris[0], fields.get("Signed-By")
    lists = sorted((sources_dir / "sources.list.d").glob("*.list"))
    for f in [sources_dir / "sources.list", *lists]:
        if not f.exists():
            continue
        for line in f.read_text().splitlines():
            m = re.match(r"\s*deb\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)", line)
            if m and not m.group(3).endswith("-security") and "debian" in m.group(2):
                opts = dict(o.split("=", 1) for o in (m.group(1) or "").split() if "=" in o)
                return m.group(2), opts.get("signed-by")
    raise LabError(f"no Debian apt source found under {sources_dir}", EXIT_NO_KERNEL)


def _deb822_fields(stanza: str):
    for line in stanza.splitlines():
        if line.startswith("#") or ":" not in line or line[:1].isspace():
            continue
        key, value = line.split(":", 1)
        yield key.strip(), value.strip()


def setup(cache: Path | None = None, *, log=print) -> Kernel:
    """Install the lab kernel into the cache unless a working one is already there."""
    cache = cache or cache_dir()
    root = cache / "uml"
    try:
        kernel = Kernel.find(cache)
        run([str(kernel.binary), "--version"], timeout=30)
        return kernel
    except Exception:
        pass
    uri, keyring = debian_mirror()
    staging = Path(tempfile.mkdtemp(prefix=".uml-", dir=_mkdir(cache)))
    try:
        apt = staging / "apt"
        for d in ("lists/partial", "cache/archives/partial"):
            _mkdir(apt / d)
        signed = f"[signed-by={keyring}] " if keyring else ""
        (apt / "sources.list").write_text(f"deb {signed}{uri} sid main\n")
        opts = ["-o", f"Dir::Etc::SourceList={apt / 'sources.list'}",
                "-o", "Dir::Etc::SourceParts=/dev/null",
                "-o", f"Dir::State::Lists={apt / 'lists'}",
                "-o", f"Dir::Cache={apt / 'cache'}",
                "-o", "Dir::State::status=/dev/null",
                "-o", "Acquire::Check-Valid-Until=false",
                "-o", "APT::Sandbox::User=root"]
        log(f"lab: fetching {' '.join(PACKAGES)} from {uri} (sid) into {cache}")
        run(["apt-get", "-q", *opts, "update"], timeout=600)
        debs = _mkdir(staging / "debs")
        run(["sh", "-c", 'cd "$1" && shift && exec apt-get -q "$@"', "_", str(debs), *opts,
             "download", *PACKAGES], timeout=600)
        unpacked = _mkdir(staging / "root")
        for deb in sorted(debs.glob("*.deb")):
            run(["dpkg-deb", "-x", str(deb), str(unpacked)], timeout=300)
        libdir = root / "root/usr/lib/x86_64-linux-gnu"
        binary = staging / "linux"
        shutil.copy2(unpacked / "usr/bin/linux.uml", binary)
        # The interpreter path must be where the files will live after the move below.
        run(["patchelf", "--set-interpreter", str(libdir / "ld-linux-x86-64.so.2"),
             "--set-rpath", str(libdir), str(binary)], timeout=60)
        new = _mkdir(staging / "uml")
        (unpacked).rename(new / "root")
        binary.rename(new / "linux")
        if root.exists():
            shutil.rmtree(root)
        new.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    kernel = Kernel.find(cache)
    version = run([str(kernel.binary), "--version"], timeout=30).strip()
    log(f"lab: kernel {version} ready in {root}")
    return kernel


def run(argv: list[str], timeout: float, runner: command.Runner = command.RUNNER) -> str:
    """The project's one command runner, its failures reported as the lab's own."""
    try:
        return runner.run(argv, timeout=timeout)
    except command.CommandError as e:
        raise LabError(f"lab setup: {e}", EXIT_NO_KERNEL) from None


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------
# Running a command in the lab.

@dataclass
class LabSpec:
    command: list[str]
    disks: int = 0
    disk_size: int = 1 << 30
    mem: int = 768 << 20
    state: Path | None = None
    timeout: float | None = None
    writable: list[Path] = field(default_factory=list)
    cwd: Path = field(default_factory=Path.cwd)
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))


def disk_path(index: int) -> str:
    """The guest's name for scratch disk `index` (0-based): /dev/ubdb, /dev/ubdc, ..."""
    return "/dev/ubd" + chr(ord("b") + index)


def binds_for(spec: LabSpec, job: Path) -> list[Path]:
    """Host paths the job may write through the overlay: its cwd, /tmp, the job folder, the state
    folder, explicit --rw paths, and folders that the command's own arguments name."""
    wanted = [spec.cwd, Path("/tmp"), job, *spec.writable]
    if spec.state:
        wanted.append(spec.state)
    for arg in spec.command[1:]:
        if arg.startswith("/"):
            p = Path(arg)
            wanted.append(p if p.is_dir() else p.parent)
    out: list[Path] = []
    for p in wanted:
        p = Path(os.path.realpath(p))
        if p in _SYSTEM or not p.is_dir() or p.is_relative_to("/dev") or \
                p.is_relative_to("/proc") or p.is_relative_to("/sys") or p.is_relative_to("/run"):
            continue
        if "\n" in str(p) or p in out:
            continue
        out.append(p)
    # Parents before children, so a child bind is not hidden by its parent's.
    return sorted(out, key=lambda p: len(p.parts))


def job_script(spec: LabSpec) -> str:
    env = {**spec.env, "THINSTACK_IN_LAB": "1"}
    lines = ["# generated by thinstack lab", "unset $(env | sed -n 's/=.*//p') 2>/dev/null"]
    lines += [f"export {shlex.quote(k + '=' + v)}" for k, v in env.items()
              if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
    lines.append(f"cd {shlex.quote(str(spec.cwd))} || exit 126")
    lines.append("exec " + " ".join(shlex.quote(a) for a in spec.command))
    return "\n".join(lines) + "\n"


def kernel_args(kernel: Kernel, spec: LabSpec, job: Path, disks: list[Path],
                console_fd: int) -> list[str]:
    args = [str(kernel.binary), f"mem={spec.mem // (1 << 20)}M", "rootfstype=hostfs",
            "rootflags=/", "rw", f"init={job / 'init'}", f"THINSTACK_JOB={job}", "quiet",
            "con=null", f"con0=null,fd:{console_fd}", "con1=null,fd:1", "con2=null,fd:2",
            "ssl=null"]
    # ubd0 is UML's default root disk and complains when absent; give it a tiny placeholder so
    # the scratch disks keep their documented names (/dev/ubdb, ...).
    args.append(f"ubd0r={job / 'ubda.img'}")
    args += [f"ubd{i + 1}={d}" for i, d in enumerate(disks)]
    return args


def prepare_disks(spec: LabSpec, scratch: Path) -> list[Path]:
    folder = spec.state or scratch
    disks = []
    for i in range(spec.disks):
        d = folder / f"disk{i + 1}.img"
        if not d.exists():
            with open(d, "wb") as f:
                f.truncate(spec.disk_size)
        disks.append(d)
    return disks


def run_lab(spec: LabSpec, *, stdout=None, stderr=None) -> int:
    """Boot the kernel, run spec.command inside, power off; return COMMAND's exit status.

    Raises LabError (with one of the EXIT_* statuses) when the lab itself fails.
    """
    if not spec.command:
        raise LabError("lab run: no command given", 2)
    kernel = Kernel.find()
    program = spec.command[0]
    if "/" not in program and not shutil.which(program, path=spec.env.get("PATH", os.defpath)):
        raise LabError(f"lab: command not found: {program}", 127)
    if spec.state:
        _mkdir(spec.state)
    job = Path(tempfile.mkdtemp(prefix="thinstack-lab-", dir="/tmp"))
    proc = None
    try:
        (job / "job.sh").write_text(job_script(spec))
        # The init runs from the job folder so its mode never depends on how we were installed.
        shutil.copyfile(INIT, job / "init")
        os.chmod(job / "init", 0o755)
        with open(job / "ubda.img", "wb") as f:
            f.truncate(4096)
        (job / "modules").write_text(str(kernel.modules) + "\n")
        (job / "binds").write_text("".join(f"{p}\n" for p in binds_for(spec, job)))
        disks = prepare_disks(spec, job)
        console = os.open(job / "console.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            # UML keeps its physical memory in a file under TMPDIR (best on a tmpfs) and its
            # umid folder under HOME; neither belongs in the caller's paths.
            shm = Path("/dev/shm")
            tmp = shm if shm.is_dir() and os.access(shm, os.W_OK) else job
            env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TMPDIR": str(tmp), "HOME": str(job)}
            proc = subprocess.Popen(kernel_args(kernel, spec, job, disks, console),
                                    stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                    pass_fds=(console,), env=env, start_new_session=True)
        finally:
            os.close(console)
        try:
            proc.wait(timeout=spec.timeout)
        except subprocess.TimeoutExpired:
            raise LabError(f"lab: command timed out after {spec.timeout:g} s and was killed",
                           EXIT_TIMEOUT) from None
        return _outcome(job, proc.returncode)
    finally:
        if proc is not None:
            _kill_group(proc)
        shutil.rmtree(job, ignore_errors=True)


def _outcome(job: Path, kernel_status: int) -> int:
    status = job / "status"
    if status.exists():
        return int(status.read_text().strip() or 1)
    error = job / "boot-error"
    if error.exists():
        raise LabError(f"lab: boot failed: {error.read_text().strip()}", EXIT_BOOT_FAILED)
    if (job / "booted").exists():
        reason = "the kernel stopped while the command ran"
    else:
        reason = "the kernel did not boot"
    raise LabError(f"lab: {reason} (kernel exit {kernel_status}): {_last_console_line(job)}",
                   EXIT_BOOT_FAILED)


def _last_console_line(job: Path) -> str:
    try:
        text = (job / "console.log").read_text(errors="replace")
    except OSError:
        return "no console output"
    lines = [line.strip() for line in text.splitlines()]
    panics = [line for line in lines if "panic" in line.lower() or "error" in line.lower()]
    return (panics or [line for line in lines if line] or ["no console output"])[-1]


def _kill_group(proc: subprocess.Popen) -> None:
    """UML forks helper processes; none may outlive the lab."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    # Helpers may still be exiting; give them a moment so nothing is left behind.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
