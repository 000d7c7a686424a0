"""The sandbox, applied before a single line of model code runs.

The runtime does not start a model's interpreter itself. It runs this file with its own
interpreter, isolated (``python -I -S sandbox.py SPEC -- PROGRAM ARGS...``: no site-packages, no
``.pth`` file, no environment variable read, the standard library only), and this launcher, as
root:

1. joins the worker's cgroup, so everything after is charged and limited;
2. unshares mount, pid and (unless the model has ``network = "host"``) network namespaces, and
   forks: the child is pid 1 of the new pid namespace, the parent waits and ends as it ended;
3. in the child, remounts every file system read-only, then covers with tmpfs what the worker
   must not see (other models' packages, the runtime's state, directories its user could not
   enter anyway) and binds back, read-only, the paths it needs (its package, its environment,
   the runtime's base layer); mounts a private, size-limited ``/tmp`` and ``/dev/shm``, binds its
   cache directory read-write, mounts a ``/proc`` of its own pid namespace and a
   ``/proc/meminfo`` that shows its memory limit (as LXCFS does), and brings up loopback;
4. becomes the model's own unprivileged user (no supplementary groups, no capabilities,
   no_new_privs), installs a seccomp filter that refuses REFUSED_SYSCALLS, closes every
   descriptor but the ones it was told to keep, and executes PROGRAM with exactly the
   environment it was given.

So the model's interpreter, and every ``.pth`` file and module it runs, starts inside. Pre-warmed
processes and discovery start through it the same way.

Step 3 lives in ``mounts.py`` and step 4's filter in ``seccomp.py``; ``syscalls.py`` holds what
they share. Like this file, they import the standard library only.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import signal
import socket
import struct
import sys
import types
from typing import Any

if not __package__:
    # Run as a file by an isolated interpreter (``python -I -S sandbox.py``), which finds the
    # standard library only: the launcher's modules are found beside this file, by their
    # package's name, without running any package's ``__init__``.
    _isolation = types.ModuleType("omni_runtime.isolation")
    _isolation.__path__ = [os.path.dirname(os.path.abspath(__file__))]
    sys.modules[_isolation.__name__] = _isolation

from omni_runtime.isolation.mounts import build_view
from omni_runtime.isolation.seccomp import install_seccomp_filter
from omni_runtime.isolation.syscalls import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUTS,
    SandboxError,
    libc,
)

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
# The spec's fields and their defaults; the runtime writes it (isolation/plan.py).
SPEC_FIELDS = {
    "package": "",  # the model's package: read-only, the working directory
    "hide": [],  # directories to cover with an empty tmpfs (other packages, the state)
    "keep": [],  # directories it needs, even inside hidden or unreachable ones (read-only)
    "writable": [],  # directories bound read-write (its cache)
    "mask": [],  # files /dev/null is bound on (configuration and token files: others' secrets)
    "memory_limit": 0,  # what /proc/meminfo says, in bytes; 0 leaves it alone
    "tmp_size": 256 << 20,  # /tmp and /dev/shm, each
    "uid": 0,  # the model's user and group; 0 stays root (only where no other is possible)
    "network": False,  # True: the host's network; False: loopback only
    "cgroup_procs": [],  # cgroup.procs files to join, before anything else
    "keep_fds": [],  # descriptors the program inherits besides 0, 1 and 2
    # False for a pre-warmed process: its forks keep pids the runtime can see, and its /proc
    # shows only its own user's processes (hidepid) instead of a namespace of its own.
    "pid_namespace": True,
    "setenv": {},  # set just before PROGRAM starts (LD_PRELOAD: not for this launcher)
    "seccomp": True,  # refuse the system calls in REFUSED_SYSCALLS (and namespaces in clone)
}


def parse_spec(text: str) -> dict[str, Any]:
    spec = json.loads(text)
    unknown = set(spec) - set(SPEC_FIELDS)
    if unknown:
        raise ValueError(f"unknown sandbox fields: {sorted(unknown)}")
    return {**SPEC_FIELDS, **spec}


def main(argv: list[str]) -> None:
    """``sandbox.py SPEC -- PROGRAM ARGS...``: set up, then become PROGRAM. Never returns."""
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: sandbox.py SPEC -- PROGRAM [ARGS...]")
    spec = parse_spec(argv[0])
    program = argv[2:]
    try:
        _join_cgroup(spec["cgroup_procs"])
        # Its own IPC namespace too: no System V shared memory outside its cgroup, none shared.
        flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | (0 if spec["network"] else CLONE_NEWNET)
        if spec["pid_namespace"]:
            flags |= CLONE_NEWPID
        if libc().unshare(flags) != 0:
            err = ctypes.get_errno()
            raise SandboxError(err, f"unshare: {os.strerror(err)}")
    except OSError as exc:
        sys.exit(f"omni sandbox: {exc}; the model was not started")
    if spec["pid_namespace"]:
        child = os.fork()
        if child:
            _mirror(child)
    try:
        libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        # Its pid as the runtime sees it, while the host's /proc still says.
        os.environ["OMNI_WORKER_PID"] = os.readlink("/proc/self")
        build_view(spec)
        if not spec["network"]:
            _loopback_up()
        _become(spec["uid"])
        libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # a change of user cleared it
        if spec["seccomp"]:
            install_seccomp_filter()
        keep = sorted(set(spec["keep_fds"]))
        start = 3
        for fd in [*keep, 1 << 16]:
            os.closerange(start, fd)
            start = fd + 1
        for fd in keep:
            os.set_inheritable(fd, True)
        os.environ.update(spec["setenv"])
        os.execv(program[0], program)
    except OSError as exc:
        print(f"omni sandbox: {exc}; the model was not started", file=sys.stderr, flush=True)
        os._exit(126)


def _join_cgroup(files: list[str]) -> None:
    for path in files:
        with open(path, "w") as f:
            f.write(str(os.getpid()))


def _mirror(child: int) -> None:
    """The launcher's life: hold nothing, wait for the worker, end as it ended."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the runtime stops workers with SHUTDOWN or SIGKILL
    libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
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


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))


def _become(uid: int) -> None:
    """The model's own user: no groups, no capabilities, no way to gain any back."""
    lib = libc()
    if uid:
        for cap in range(64):
            lib.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the last known cap
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # and with it every capability
    if lib.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise SandboxError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")


if __name__ == "__main__":
    main(sys.argv[1:])
