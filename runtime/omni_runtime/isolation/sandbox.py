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
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import signal
import socket
import struct
import sys
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
SYS_MOUNT_SETATTR = 442  # the same number on x86_64 and aarch64 (the generic table)
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
_MOUNT_OPTION_FLAGS = {
    "ro": MS_RDONLY,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}
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
# System calls a model process never needs, refused with EPERM by a seccomp filter: what
# container runtimes refuse by default (Docker's profile), and more that reach other processes
# or the kernel's rarer corners. Names the running architecture lacks are skipped.
REFUSED_SYSCALLS = (
    # namespaces and mounts: the sandbox's own view stays the only one
    "unshare", "setns", "mount", "umount", "umount2", "pivot_root", "chroot",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree",
    "mount_setattr",
    # other processes
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "migrate_pages", "move_pages",
    # the kernel itself
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "create_module", "get_kernel_syms", "query_module", "reboot", "swapon", "swapoff", "acct",
    "syslog", "bpf", "perf_event_open", "userfaultfd", "lookup_dcookie", "quotactl",
    "quotactl_fd", "nfsservctl", "uselib", "_sysctl", "sysfs", "ustat", "vm86", "vm86old",
    "iopl", "ioperm", "io_uring_setup", "io_uring_enter", "io_uring_register",
    # kernel keyrings, shared by every process of a user
    "keyctl", "add_key", "request_key",
    # the node's clock and names
    "settimeofday", "stime", "clock_settime", "clock_settime64", "clock_adjtime",
    "clock_adjtime64", "adjtimex", "sethostname", "setdomainname",
    # files by handle, past every mount
    "open_by_handle_at", "name_to_handle_at",
)  # fmt: skip
# clone() with any of these flags is refused; clone3() (whose flags a filter cannot read) says
# ENOSYS, so the C library falls back to clone().
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUSER = 0x10000000
CLONE_NAMESPACES = (
    CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWUSER,
    CLONE_NEWCGROUP,
)  # fmt: skip


class SandboxError(OSError):
    pass


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    result = _libc().mount(
        os.fsencode(source) if source else None,
        os.fsencode(target),
        os.fsencode(fstype) if fstype else None,
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
        if _libc().unshare(flags) != 0:
            err = ctypes.get_errno()
            raise SandboxError(err, f"unshare: {os.strerror(err)}")
    except OSError as exc:
        sys.exit(f"omni sandbox: {exc}; the model was not started")
    if spec["pid_namespace"]:
        child = os.fork()
        if child:
            _mirror(child)
    try:
        _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        # Its pid as the runtime sees it, while the host's /proc still says.
        os.environ["OMNI_WORKER_PID"] = os.readlink("/proc/self")
        _build_view(spec)
        if not spec["network"]:
            _loopback_up()
        _become(spec["uid"])
        _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # a change of user cleared it
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
    _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
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


def _build_view(spec: dict[str, Any]) -> None:
    uid = spec["uid"]
    package = os.path.realpath(spec["package"])
    # Directories given to the model's user: opened, checked and handed over by descriptor,
    # never by a path someone else could have planted or redirected.
    owned = dict(_open_owned_dir(p, uid) for p in spec["writable"])
    writable = list(owned)
    keep = [os.path.realpath(p) for p in [package, *spec["keep"]] if os.path.isdir(p)]
    hidden = {os.path.realpath(p) for p in spec["hide"] if os.path.isdir(p)}
    # Hiding wins over keeping the very same directory (its own package is never hidden).
    needed = sorted({p for p in keep + writable if p not in hidden or p == package}, key=len)
    # Covers: an empty tmpfs over each; the needed paths inside are bound back.
    covers = set(hidden)
    covers |= {"/tmp", "/dev/shm"}
    if uid:
        covers |= {c for p in needed if (c := _unreachable_ancestor(p, uid))}
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    with open("/proc/meminfo") as f:
        host_meminfo = f.read()
    # Hold every needed directory open: once a tmpfs covers a path, the path leads nowhere,
    # the open directory still does.
    handles = {
        p: owned[p] if p in owned else os.open(p, os.O_PATH | os.O_DIRECTORY) for p in needed
    }
    _read_only_everywhere()
    base = MS_NOSUID | MS_NODEV
    mounted: list[str] = []
    # Shallow before deep, so a cover inside a path bound back (a neighbour's package inside
    # the runtime's source tree, say) is laid over that bind.
    for path, is_cover in sorted(
        [(c, True) for c in covers] + [(n, False) for n in needed],
        key=lambda item: (len(item[0]), not item[1]),
    ):
        if is_cover:
            if os.path.isdir(path):  # still reachable: not inside a cover of its own
                private = path in ("/tmp", "/dev/shm")
                size, mode = (spec["tmp_size"], "1777") if private else (64 << 10, "0755")
                name = "omni-" + path.strip("/").replace("/", "-")
                _mount(name, path, "tmpfs", base, f"size={size},mode={mode}")
                mounted.append(path)
            continue
        cover = max((c for c in mounted if _contains(c, path)), key=len, default="")
        ancestor = max((n for n in needed if n != path and _contains(n, path)), key=len, default="")
        if (cover and len(cover) >= len(ancestor)) or path in writable:
            _bind(handles[path], path, read_only=path not in writable)
    for handle in handles.values():
        os.close(handle)
    for cover in mounted:
        if cover not in ("/tmp", "/dev/shm"):
            _mount(None, cover, None, MS_REMOUNT | MS_RDONLY | base, "size=64k,mode=0755")
    for path in spec["mask"]:
        if os.path.isfile(path):  # still visible: not under a cover
            _mount("/dev/null", path, None, MS_BIND)
            _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | base)
    # A /proc of its own pid namespace: no other process, the runtime's included, is visible.
    proc_options = "" if spec["pid_namespace"] else "hidepid=invisible"
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, proc_options)
    if spec["memory_limit"]:
        path = "/dev/shm/.omni-meminfo"
        with open(path, "w") as f:
            f.write(meminfo_text(spec["memory_limit"], host_meminfo))
        _mount(path, "/proc/meminfo", None, MS_BIND)
        _mount(None, "/proc/meminfo", None, MS_REMOUNT | MS_BIND | MS_RDONLY | base)
        os.unlink(path)
    os.chdir(package)  # step onto the read-only bind mount


def _read_only_everywhere() -> None:
    """Make every mount of this namespace read-only and nosuid, shadowed ones included.

    One ``mount_setattr(AT_RECURSIVE)`` on ``/`` where the kernel has it (5.12+); else each
    mount in turn, failing closed: a mount that stays writable stops the start.
    """
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    libc = _libc()
    result = libc.syscall(
        SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)
    )
    if result == 0:
        return
    err = ctypes.get_errno()
    if err != errno.ENOSYS:
        raise SandboxError(err, f"mount_setattr(/, read-only): {os.strerror(err)}")
    for target, options in _mounts():
        if target == b"/proc" or target.startswith(b"/proc/"):
            continue  # /proc is replaced by the namespace's own
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
        for option in options.split(b","):
            flags |= _MOUNT_OPTION_FLAGS.get(option.decode(errors="replace"), 0)
        try:
            _mount(None, os.fsdecode(target), None, flags)
        except SandboxError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: not a mount point any more (shadowed)
                raise
    writable = [
        t for t, o in _mounts() if b"ro" not in o.split(b",") and not t.startswith(b"/proc")
    ]
    if writable:
        raise SandboxError(errno.EPERM, f"mounts still writable: {writable[:5]}")


def _mounts() -> list[tuple[bytes, bytes]]:
    """(mount point, per-mount options) of this namespace, from mountinfo, as bytes."""
    with open("/proc/self/mountinfo", "rb") as f:
        return [(_unescape(fields[4]), fields[5]) for fields in (line.split() for line in f)]


def _unescape(path: bytes) -> bytes:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040)."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), path)


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _unreachable_ancestor(path: str, uid: int) -> str | None:
    """The outermost directory above ``path`` that ``uid`` may not enter, if any."""
    parts = path.strip("/").split("/")
    current = ""
    for part in parts[:-1]:
        current += "/" + part
        st = os.stat(current)
        if st.st_uid == uid:
            enterable = bool(st.st_mode & 0o100)
        elif st.st_gid == uid:
            enterable = bool(st.st_mode & 0o010)
        else:
            enterable = bool(st.st_mode & 0o001)
        if not enterable:
            return current
    return None


def _open_owned_dir(path: str, uid: int) -> tuple[str, int]:
    """Open a directory the runtime made for the model, check it, and give it to ``uid``.

    Its parent is resolved (the operator's choice) and must admit no other user's entries
    (root's, and not writable by others unless sticky); the directory itself is opened without
    following a link and must belong to root or to ``uid``. Owner and mode change on the
    descriptor, which is also what gets bound: a name swapped afterwards changes nothing.
    """
    parent = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    name = os.path.basename(path.rstrip("/"))
    parent_fd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(parent_fd)
        if st.st_uid != 0 or (st.st_mode & 0o022 and not st.st_mode & 0o1000):
            raise SandboxError(
                errno.EPERM,
                f"{parent} (which holds {name}) is not root's alone: choose a state directory "
                "that no other user can write",
            )
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=parent_fd)  # fmt: skip
        except OSError as exc:
            raise SandboxError(
                exc.errno, f"{parent}/{name}: {exc.strerror} (a link or no directory)"
            ) from None
    finally:
        os.close(parent_fd)
    st = os.fstat(fd)
    if st.st_uid not in (0, uid):
        os.close(fd)
        raise SandboxError(
            errno.EPERM, f"{parent}/{name} belongs to user {st.st_uid}, not to root or the model"
        )
    os.fchown(fd, uid, uid)
    os.fchmod(fd, 0o700)
    return f"{parent}/{name}", fd


def _bind(handle: int, path: str, read_only: bool) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)
    _mount(f"/proc/self/fd/{handle}", path, None, MS_BIND | MS_REC)
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | (MS_RDONLY if read_only else 0)
    _mount(None, path, None, flags)


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))


def _become(uid: int) -> None:
    """The model's own user: no groups, no capabilities, no way to gain any back."""
    libc = _libc()
    if uid:
        for cap in range(64):
            libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the last known cap
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # and with it every capability
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise SandboxError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")


class _ArgCmp(ctypes.Structure):
    """libseccomp's ``struct scmp_arg_cmp``."""

    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO = 0x00050000
SCMP_CMP_MASKED_EQ = 7


def install_seccomp_filter() -> None:
    """Refuse REFUSED_SYSCALLS and namespace-creating clones, for this process and its children.

    The filter is built by libseccomp (``libseccomp.so.2``, through ctypes: this launcher has
    the standard library only), which knows each architecture's system call numbers and
    refuses other ABIs (x32, 32-bit) outright. It is the library runc and systemd build theirs
    with. Without it the model does not start.
    """
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError as exc:
        raise SandboxError(
            errno.ENOENT,
            f"libseccomp.so.2 cannot be loaded ({exc}): install libseccomp2 to run models",
        ) from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp),
    ]  # fmt: skip
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    context = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not context:
        raise SandboxError(errno.ENOMEM, "seccomp_init failed")

    def refuse(name: str, code: int, *conditions: _ArgCmp) -> None:
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:  # not a system call of this architecture
            return
        array = (_ArgCmp * len(conditions))(*conditions) if conditions else None
        result = lib.seccomp_rule_add_array(
            context, SCMP_ACT_ERRNO | code, number, len(conditions), array
        )
        if result < 0:
            raise SandboxError(-result, f"seccomp rule for {name}: {os.strerror(-result)}")

    try:
        for name in REFUSED_SYSCALLS:
            refuse(name, errno.EPERM)
        for flag in CLONE_NAMESPACES:  # flags are clone's first argument on x86_64 and arm64
            refuse("clone", errno.EPERM, _ArgCmp(0, SCMP_CMP_MASKED_EQ, flag, flag))
        refuse("clone3", errno.ENOSYS)
        result = lib.seccomp_load(context)
        if result < 0:
            raise SandboxError(-result, f"seccomp_load: {os.strerror(-result)}")
    finally:
        lib.seccomp_release(context)


def _contains(outer: str, inner: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


if __name__ == "__main__":
    main(sys.argv[1:])
