"""What isolation this runtime gives its workers, decided once at start."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from omni_runtime.isolation import sandbox
from omni_runtime.isolation.cgroups import Cgroups, WorkerCgroup, detect_cgroups
from omni_sdk.model_config import CONFIG_NAME, is_zero_code

__all__ = ["CacheQuota", "Isolation", "UserIds", "model_uid", "worker_environment"]

log = logging.getLogger("omni.isolation")

# A model's workers run as a user of their own: MODEL_UID_BASE + a hash of the model's name.
MODEL_UID_BASE = 100_000
MODEL_UID_RANGE = 100_000
# What a worker's environment keeps of the runtime's; the rest is the model's own
# ([models."X".env] in omni.toml) and what the runtime sets for it.
ENV_ALLOWED = frozenset(
    {
        "PATH", "LANG", "LANGUAGE", "TZ", "TERM",
        "PYTHONUNBUFFERED", "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE", "PYTHONFAULTHANDLER",
        "OMNI_LOG_LEVEL", "OMNI_LOAD_PLUGINS", "OMNI_TRACE_PLUGINS", "OMNI_EXAMPLES_CACHE",
        "OMNI_CUDA_MODE", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NVIDIA_VISIBLE_DEVICES",
        "NVIDIA_DRIVER_CAPABILITIES", "LD_LIBRARY_PATH",
        "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM",
        "OMP_NUM_THREADS", "MKL_NUM_THREADS",
        "SSL_CERT_FILE", "SSL_CERT_DIR",
    }
)  # fmt: skip
ENV_ALLOWED_PREFIXES = ("LC_",)
# The runtime's sys.path may hold these themselves (python started in /tmp): a worker gets
# its own /tmp, /dev/shm and /proc, and never the whole file system bound back.
_NEVER_KEPT = (Path("/"), Path("/tmp"), Path("/dev/shm"), Path("/proc"))


def model_uid(name: str) -> int:
    """Where a model's user id is first looked for: a hash of its name in the uid range."""
    return MODEL_UID_BASE + zlib.crc32(name.encode()) % MODEL_UID_RANGE


class UserIds:
    """A user id of its own for every model: the hash of its name, or the next free one when
    that is taken. Kept in ``<state>/uids.json`` (under a lock, for two runtimes or a
    ``models`` beside ``serve``), so a model keeps its user, and its cache, across restarts."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.uids: dict[str, int] = {}

    def uid(self, name: str) -> int:
        if name in self.uids:
            return self.uids[name]
        if self.path is None:
            return self._allocate(name)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.uids = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.uids = {}
            uid = self._allocate(name)
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(self.uids, indent=1, sort_keys=True))
            temporary.replace(self.path)
        return uid

    def _allocate(self, name: str) -> int:
        if name not in self.uids:
            taken = set(self.uids.values())
            uid = model_uid(name)
            while uid in taken:
                uid = MODEL_UID_BASE + (uid - MODEL_UID_BASE + 1) % MODEL_UID_RANGE
            self.uids[name] = uid
        return self.uids[name]


def worker_environment(
    base: Mapping[str, str], model_env: Mapping[str, str], cache_dir: Path | None
) -> dict[str, str]:
    """The environment a worker starts with: the allow-list of ``base`` plus the model's own."""
    env = {k: v for k, v in base.items() if k in ENV_ALLOWED or k.startswith(ENV_ALLOWED_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"
    env["TMPDIR"] = "/tmp"
    if cache_dir is not None:
        env["HOME"] = env["XDG_CACHE_HOME"] = str(cache_dir)
    env.update(model_env)
    return env


class CacheQuota:
    """Each model's cache directory a filesystem of ``size`` bytes of its own, so that a model
    cannot fill the disk that holds the state directory: an ext4 image beside the directory
    (``<cache>.img``, sparse), loop-mounted on it while the runtime runs. One mount serves
    every replica of the model; an image keeps its size (remove it to resize)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.mounted: list[Path] = []

    @staticmethod
    def unavailable() -> str | None:
        """Why this machine cannot give quotas, or None."""
        if os.geteuid() != 0:
            return "not root"
        missing = [tool for tool in ("mkfs.ext4", "mount", "umount") if not shutil.which(tool)]
        if missing:
            return f"{', '.join(missing)} not found (install e2fsprogs and util-linux)"
        if not os.path.exists("/dev/loop-control"):
            return "no loop devices (/dev/loop-control)"
        return None

    def ensure(self, directory: Path) -> None:
        """Mount the directory's image on it (making the image first); OSError if impossible."""
        if os.path.ismount(directory):
            return  # mounted already (by this runtime, or one before it that was killed)
        image = directory.with_name(directory.name + ".img")
        if not image.exists():
            fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.ftruncate(fd, self.size)
            finally:
                os.close(fd)
            try:
                _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-L", "omni-cache", str(image)], image)
            except OSError:
                image.unlink()  # made again at the next start, not mounted half-made
                raise
        _run(["mount", "-o", "loop,nosuid,nodev", str(image), str(directory)], image)
        self.mounted.append(directory)

    def close(self) -> None:
        for directory in reversed(self.mounted):
            subprocess.run(["umount", str(directory)], capture_output=True, check=False)
        self.mounted.clear()


def _run(command: list[str], image: Path) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise OSError(
            f"its cache directory's quota ([server] cache_quota) could not be set up: "
            f"{command[0]} {image}: {result.stderr.strip() or result.returncode}"
        )


@dataclass
class Isolation:
    """cgroups for limits, mount namespaces for files; either may be missing on a machine."""

    cgroups: Cgroups | None = None
    namespaces: bool = False
    hidden: tuple[Path, ...] = field(default_factory=tuple)
    description: str = "none"
    state_dir: Path | None = None
    # Files no model may read (omni.toml files, token files): /dev/null is bound on them.
    masked: tuple[Path, ...] = field(default_factory=tuple)
    cache_quota: CacheQuota | None = None

    def __post_init__(self) -> None:
        self.user_ids = UserIds(self.state_dir / "uids.json" if self.state_dir else None)

    @classmethod
    def detect(
        cls,
        packages: list[Path],
        state_dir: Path | None = None,
        masked: tuple[Path, ...] = (),
        cache_quota: int = 0,
    ) -> Isolation:
        """Probe the machine; warn once, here, about whatever is missing."""
        cgroups, cgroup_note = detect_cgroups()
        namespaces = os.geteuid() == 0 and os.path.exists("/proc/self/ns/mnt")
        parts = [cgroup_note if cgroups else "no cgroups"]
        parts.append("mount namespaces" if namespaces else "no mount namespaces")
        if cgroups is None:
            log.warning("isolation: %s (see `omni-runtime doctor`)", cgroup_note)
        if not namespaces:
            log.warning(
                "isolation: not root, so workers share the runtime's view of the file system"
            )
        hidden = [*packages, *([state_dir] if state_dir else [])]
        quota = None
        if cache_quota and state_dir is not None:
            why = CacheQuota.unavailable()
            if why is None:
                quota = CacheQuota(cache_quota)
                parts.append(f"cache quota {cache_quota >> 20} MiB")
            else:
                log.warning("isolation: [server] cache_quota is set but %s: no cache quota", why)
        isolation = cls(
            cgroups, namespaces, tuple(hidden), ", ".join(parts), state_dir, masked, quota
        )
        log.info("isolation: %s", isolation.description)
        return isolation

    @classmethod
    def sandbox_only(
        cls, hidden: list[Path], state_dir: Path | None, masked: tuple[Path, ...] = ()
    ) -> Isolation | None:
        """Namespaces without cgroups (discovery), where the machine allows; else None."""
        if os.geteuid() != 0 or not os.path.exists("/proc/self/ns/mnt"):
            return None
        return cls(None, True, tuple(hidden), "namespaces", state_dir, masked)

    def hide(self, package: Path) -> None:
        """Keep ``package`` (added while serving) out of every other model's sandbox."""
        if package not in self.hidden:
            self.hidden = (*self.hidden, package)

    def cache_dir(self, model: str) -> Path | None:
        """The model's own writable directory (its HOME), kept across restarts."""
        if self.state_dir is None:
            return None
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-.") or "model"
        return self.state_dir / "cache" / f"{slug}-{zlib.crc32(model.encode()):08x}"

    def launcher(
        self,
        *,
        model: str,
        package: Path,
        environment: Path | None,
        memory_limit: int = 0,
        network: bool = False,
        cgroup: WorkerCgroup | None = None,
        keep_fds: tuple[int, ...] = (),
        writable: tuple[Path, ...] = (),
        pid_namespace: bool = True,
        setenv: Mapping[str, str] | None = None,
        cache: bool = True,
    ) -> list[str]:
        """The command that starts a model's program inside its sandbox; [] where none can be.

        Its arguments follow (``[*launcher, python, "-m", ...]``).
        """
        if not self.namespaces:
            return []
        cache_dir = self.cache_dir(model) if cache else None
        writable_dirs = [*writable]
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            if self.cache_quota is not None:
                self.cache_quota.ensure(cache_dir)  # OSError: the model does not start
            writable_dirs.append(cache_dir)
        # What the worker's interpreter reads besides its package: its environment, and the
        # runtime's own (the base layer its environment shares, editable sources).
        hide = [p for p in self.hidden if p != package]
        base = [Path(p) for p in (sys.prefix, sys.base_prefix, *sys.path) if os.path.isabs(p)]
        # Hiding wins: a neighbour's package on the runtime's sys.path (installed editable
        # beside it) stays hidden. The model's own environment is kept, though inside the state.
        keep = [str(environment)] if environment else []
        keep += [
            str(p)
            for p in base
            if p.is_dir()
            and not any(p == h or p.is_relative_to(h) for h in hide)
            and p not in _NEVER_KEPT
        ]
        # A zero-code package's own omni.toml is its model's definition: that one it reads.
        own_definition = package / CONFIG_NAME if is_zero_code(package) else None
        spec = {
            "package": str(package),
            "hide": [str(p) for p in hide],
            "keep": list(dict.fromkeys(keep)),
            "writable": [str(p) for p in writable_dirs],
            "mask": [str(p) for p in self.masked if p != own_definition],
            "memory_limit": memory_limit,
            "uid": self.user_ids.uid(model),
            "network": network,
            "cgroup_procs": [str(p) for p in cgroup.procs_files] if cgroup is not None else [],
            "keep_fds": list(keep_fds),
            "pid_namespace": pid_namespace,
            "setenv": dict(setenv or {}),
        }
        return [sys.executable, "-I", "-S", sandbox.__file__, json.dumps(spec), "--"]

    def close(self) -> None:
        if self.cgroups is not None:
            self.cgroups.close()
        if self.cache_quota is not None:
            self.cache_quota.close()
