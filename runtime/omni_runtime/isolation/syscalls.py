"""What the sandbox launcher's modules share: the C library, the error a step raises, and the
namespace flags of ``unshare`` and ``clone``.

Like every module of the launcher (``sandbox.py``, ``mounts.py``, ``seccomp.py``), it runs in an
interpreter that has the standard library only: it imports nothing else.
"""

from __future__ import annotations

import ctypes

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000


class SandboxError(OSError):
    pass


def libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
