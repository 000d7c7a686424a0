"""The seccomp filter every model process runs under: REFUSED_SYSCALLS answer EPERM, and so does
a ``clone`` that would make a namespace.

Part of the sandbox launcher (``sandbox.py`` installs it last, just before the model's program
starts): the standard library only.
"""

from __future__ import annotations

import ctypes
import errno
import os

from omni_runtime.isolation.syscalls import (
    CLONE_NEWCGROUP,
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    CLONE_NEWUTS,
    SandboxError,
)

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
CLONE_NAMESPACES = (
    CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWUSER,
    CLONE_NEWCGROUP,
)  # fmt: skip


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
