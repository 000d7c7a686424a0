"""The file system a sandboxed process sees, laid out by the launcher in its new mount namespace:
everything read-only, covers over what it must not see, binds back of what it needs, a private
``/tmp`` and ``/dev/shm``, its own ``/proc`` and a ``/proc/meminfo`` with its memory limit.

Part of the sandbox launcher (``sandbox.py`` calls ``build_view``): the standard library only.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from typing import Any

from omni_runtime.isolation.syscalls import SandboxError, libc

SYS_MOUNT_SETATTR = 442  # the same number on x86_64 and aarch64 (the generic table)
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
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


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    result = libc().mount(
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


def build_view(spec: dict[str, Any]) -> None:
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
    result = libc().syscall(
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


def _contains(outer: str, inner: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")
