"""What isolation this runtime gives its workers, decided once at start."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from omni_runtime.isolation.cgroups import Cgroups, detect_cgroups
from omni_sdk._sandbox import SandboxSpec

__all__ = ["Isolation"]

log = logging.getLogger("omni.isolation")


@dataclass
class Isolation:
    """cgroups for limits, mount namespaces for files; either may be missing on a machine."""

    cgroups: Cgroups | None = None
    namespaces: bool = False
    hidden: tuple[Path, ...] = field(default_factory=tuple)
    description: str = "none"

    @classmethod
    def detect(cls, packages: list[Path], state_dir: Path | None = None) -> Isolation:
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
        isolation = cls(cgroups, namespaces, tuple(hidden), ", ".join(parts))
        log.info("isolation: %s", isolation.description)
        return isolation

    def sandbox(self, package: Path, memory_limit: int, environment: Path | None) -> str | None:
        """The ``--sandbox`` argument for a worker of ``package``, or None."""
        if not self.namespaces:
            return None
        hide = [str(p) for p in self.hidden if p != package]
        keep = [str(environment)] if environment else []
        return SandboxSpec(str(package), hide, memory_limit, keep=keep).to_json()

    def close(self) -> None:
        if self.cgroups is not None:
            self.cgroups.close()
