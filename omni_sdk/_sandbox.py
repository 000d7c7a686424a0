"""The worker's own view of the system: namespaces set up before any model code runs.

The runtime passes a ``SandboxSpec`` as JSON; as root the worker then

- unshares its mount and pid namespaces (it forks: the child is pid 1 of its own namespace and
  mounts a /proc of it, so no other process, the runtime's included, is visible), and makes
  every mount private to it,
- mounts an empty read-only tmpfs over every other model package and the runtime's state,
- bind-mounts its own package read-only,
- mounts a private tmpfs on ``/tmp``,
- bind-mounts a ``/proc/meminfo`` whose MemTotal is the worker's memory limit (as LXCFS does), so
  psutil and frameworks size themselves to it.

and finally drops every capability but CAP_IPC_LOCK, with no_new_privs set, so it can neither
undo those mounts nor gain privileges back. Without the privilege to do all this it logs one
warning and runs unconfined.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NoReturn

__all__ = ["SandboxSpec", "enter_sandbox", "meminfo_text"]

log = logging.getLogger("omni.sandbox")

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
CAP_IPC_LOCK = 14
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000


@dataclass
class SandboxSpec:
    package: str
    hide: list[str] = field(default_factory=list)
    memory_limit: int = 0
    tmp_size: int = 256 << 20
    keep: list[str] = field(default_factory=list)  # paths inside hidden ones it still needs

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SandboxSpec:
        return cls(**json.loads(text))


class SandboxError(OSError):
    pass


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    libc = _libc()
    result = libc.mount(
        source.encode() if source else None,
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    if result != 0:
        err = ctypes.get_errno()
        raise SandboxError(err, f"mount {fstype or source} on {target}: {os.strerror(err)}")


def meminfo_text(limit: int, host: str) -> str:
    """``/proc/meminfo`` with MemTotal, MemFree and MemAvailable capped at ``limit`` bytes."""
    lines = []
    capped = {"MemTotal", "MemFree", "MemAvailable"}
    for line in host.splitlines():
        key, _, rest = line.partition(":")
        if key in capped:
            value_kb = int(rest.split()[0])
            line = f"{key}:{min(value_kb, limit // 1024):>15} kB"
        elif key in ("SwapTotal", "SwapFree"):
            line = f"{key}:{0:>15} kB"
        lines.append(line)
    return "\n".join(lines) + "\n"


def enter_sandbox(spec: SandboxSpec) -> bool:
    """Move the worker into its own mount and pid namespaces; False if not allowed.

    The calling process forks: the child, pid 1 of the new pid namespace, returns and becomes
    the worker; the parent stays outside, waits, and ends exactly as the child did (the same
    exit status, or the same signal), so the runtime sees one process die one way.
    """
    libc = _libc()
    if libc.unshare(CLONE_NEWNS | CLONE_NEWPID) != 0:
        reason = os.strerror(ctypes.get_errno())
        log.warning("no mount namespace for this worker (%s); it sees the host's files", reason)
        return False
    child = os.fork()
    if child:
        _mirror(child)
    # The worker. The host's /proc is still mounted: it gives this process's pid out there.
    os.environ["OMNI_WORKER_PID"] = os.readlink("/proc/self")
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    flags = MS_NOSUID | MS_NODEV
    package = spec.package
    hidden = [p for p in spec.hide if os.path.isdir(p) and not _contains(p, package)]
    # What lives under /tmp and the worker still needs once its private /tmp covers it: the
    # interpreter, the base layer and editable sources (a checkout in /tmp, say), less whatever
    # is to be hidden anyway.
    under_tmp = _outermost(
        p
        for p in [sys.prefix, sys.base_prefix, *sys.path]
        if p
        and _contains("/tmp", p)
        and os.path.isdir(p)
        and not any(_contains(h, p) for h in hidden)
    )
    # Hold them open: once a tmpfs covers a path, the path leads nowhere, the open directory
    # still does.
    handles = {p: _open_dir(p) for p in [*under_tmp, *spec.keep, package]}
    _mount("omni-tmp", "/tmp", "tmpfs", flags, f"size={spec.tmp_size},mode=1777")
    for path in under_tmp:
        _bind_read_only(handles.pop(path), path)
    hidden = [p for p in hidden if os.path.isdir(p)]  # under /tmp and not kept: gone already
    for path in hidden:
        _mount("omni-hidden", path, "tmpfs", flags, "size=64k,mode=0755")
    for path, handle in handles.items():  # its environment, then its own package
        _bind_read_only(handle, path)
    for path in hidden:
        _mount(None, path, None, MS_REMOUNT | MS_RDONLY | flags, "size=64k,mode=0755")
    host_meminfo = Path("/proc/meminfo").read_text()
    # A /proc of its own pid namespace: no other process, the runtime's included, is visible.
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if spec.memory_limit:
        meminfo = Path("/tmp/.omni-meminfo")
        meminfo.write_text(meminfo_text(spec.memory_limit, host_meminfo))
        meminfo.chmod(0o444)
        _mount(str(meminfo), "/proc/meminfo", None, MS_BIND)
    os.chdir(package)  # step onto the read-only bind mount
    _drop_privileges(libc)
    return True


def _mirror(child: int) -> NoReturn:
    """The launcher's life: hold nothing, wait for the worker, end as it ended."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the runtime stops workers with SHUTDOWN or SIGKILL
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # the socket is the worker's alone
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        ended_by = signal.Signals(os.WTERMSIG(status))
        with contextlib.suppress(OSError, ValueError):  # SIGKILL has no handler to reset
            signal.signal(ended_by, signal.SIG_DFL)
        os.kill(os.getpid(), ended_by)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


def _drop_privileges(libc: ctypes.CDLL) -> None:
    """Root without capabilities: no mounts, no unmounting its covers, no ptrace, no new ones.

    CAP_IPC_LOCK stays: CUDA pins host memory for transfers.
    """
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise SandboxError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    for cap in range(64):
        if cap != CAP_IPC_LOCK:
            libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the last known cap
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = 1 << CAP_IPC_LOCK
    if libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise SandboxError(err, f"capset: {os.strerror(err)}")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _open_dir(path: str) -> int:
    return os.open(path, os.O_PATH | os.O_DIRECTORY)


def _bind_read_only(handle: int, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    _mount(f"/proc/self/fd/{handle}", path, None, MS_BIND | MS_REC)
    _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.close(handle)


def _outermost(paths: Iterable[str]) -> list[str]:
    """The given directories minus those inside another one of them."""
    unique = sorted({str(Path(p).resolve()) for p in paths}, key=len)
    kept: list[str] = []
    for path in unique:
        if not any(_contains(outer, path) for outer in kept):
            kept.append(path)
    return kept


def _contains(outer: str, inner: str) -> bool:
    outer_path, inner_path = Path(outer).resolve(), Path(inner).resolve()
    return inner_path == outer_path or outer_path in inner_path.parents
