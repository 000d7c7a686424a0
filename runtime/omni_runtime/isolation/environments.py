"""One Python environment per model package, built with uv over a shared base layer.

The base layer is the runtime's own environment: torch, onnxruntime and every other heavy
framework installed there are shared by every model through a ``.pth`` file, never copied. A
package's environment holds only what the base layer does not satisfy, so two packages can pin
conflicting versions of one library side by side: each gets its own copy, found before the
base layer's.

Environments are cached by a hash of the package's pyproject.toml, the requirements it needs
beyond the base layer and the base layer itself. An unchanged package starts without any install
step; a changed one is built beside the old environment and swapped in only when the build
succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import sysconfig
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from omni_runtime.isolation.cgroups import CgroupError
from omni_runtime.isolation.plan import ENV_ALLOWED, ENV_ALLOWED_PREFIXES, Isolation
from omni_runtime.progress import BuildProgress, LoggedProgress, TerminalProgress
from omni_sdk import Resources

__all__ = [
    "BuildProgress",
    "EnvironmentBuilder",
    "EnvironmentError_",
    "LoggedProgress",
    "PackageEnvironment",
    "TerminalProgress",
    "build_environment",
]

log = logging.getLogger("omni.environments")
BUILDER_VERSION = "1"
# What a source build in the sandbox may use (the package's models' limits are not known yet).
BUILD_RESOURCES = Resources(memory=4 << 30, cpus=1.0)
COMPLETE_MARKER = ".omni-env-complete"


class EnvironmentError_(Exception):
    """A package's environment could not be built; the message carries uv's explanation."""


@dataclass(frozen=True)
class PackageEnvironment:
    package_dir: Path
    path: Path
    python: Path
    installed: tuple[str, ...]  # requirements installed beyond the base layer
    built: bool  # False when an existing environment was reused
    seconds: float


def _base_distributions() -> dict[str, str]:
    return {
        canonicalize_name(d.metadata["Name"]): d.version
        for d in importlib.metadata.distributions()
        if d.metadata["Name"]
    }


def _requirements(package_dir: Path) -> list[Requirement]:
    pyproject = package_dir / "pyproject.toml"
    try:
        data = tomllib.loads(pyproject.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise EnvironmentError_(f"{pyproject}: cannot read it: {exc}") from exc
    requirements = []
    for line in data.get("project", {}).get("dependencies", []):
        try:
            requirement = Requirement(line)
        except InvalidRequirement as exc:
            raise EnvironmentError_(f"{pyproject}: bad dependency {line!r}: {exc}") from exc
        if requirement.marker is None or requirement.marker.evaluate():
            requirements.append(requirement)
    return requirements


class EnvironmentBuilder:
    """Builds and caches package environments under ``root``."""

    def __init__(
        self,
        root: Path,
        uv: str | None = None,
        progress: BuildProgress | None = None,
        source_builds: bool = False,
        sandbox: Isolation | None = None,
    ) -> None:
        self.root = root
        # Building a dependency from source runs its build code (setup.py, a build backend):
        # only wheels unless the operator allows it, and then inside ``sandbox`` where there is
        # one, as a user of the package's own.
        self.source_builds = source_builds
        self.sandbox = sandbox if sandbox is not None and sandbox.namespaces else None
        self._builds = 0
        self.progress = progress or LoggedProgress()
        self.uv = uv or _find_uv()
        self.base_site = sysconfig.get_paths()["purelib"]
        self.base = _base_distributions()
        self._lock = asyncio.Lock()

    def missing(self, package_dir: Path) -> list[str]:
        """The package's requirements that the base layer does not satisfy."""
        needed = []
        for requirement in _requirements(package_dir):
            version = self.base.get(canonicalize_name(requirement.name))
            if version is None or not requirement.specifier.contains(version, prereleases=True):
                needed.append(str(requirement))
        return sorted(needed)

    def conflicts(self, site: Path) -> list[str]:
        """Dependencies of what the env installed that the base layer's versions do not meet.

        uv resolves an environment's own requirements with the base layer's packages left out,
        so it never sees that one of them needs another version of a base-layer library; this
        check does, and says which.
        """
        own = {
            canonicalize_name(d.metadata["Name"]): d
            for d in importlib.metadata.distributions(path=[str(site)])
            if d.metadata["Name"]
        }
        problems = []
        for name, dist in sorted(own.items()):
            for line in dist.requires or ():
                requirement = Requirement(line)
                if requirement.marker is not None and not requirement.marker.evaluate(
                    {"extra": ""}
                ):
                    continue
                needed = canonicalize_name(requirement.name)
                if needed in own:
                    continue
                version = self.base.get(needed)
                if version is not None and not requirement.specifier.contains(
                    version, prereleases=True
                ):
                    problems.append(
                        f"{name} {dist.version} needs {requirement}, but the base layer has "
                        f"{needed} {version}"
                    )
        return problems

    def key(self, package_dir: Path, missing: list[str]) -> str:
        digest = hashlib.sha256()
        digest.update((package_dir / "pyproject.toml").read_bytes())
        digest.update(
            json.dumps([BUILDER_VERSION, sys.executable, self.base_site, missing]).encode()
        )
        return digest.hexdigest()[:16]

    async def ensure(self, package_dir: Path) -> PackageEnvironment:
        """The package's environment: reused if its key is unchanged, else built and swapped in."""
        started = time.monotonic()
        missing = self.missing(package_dir)
        # Two packages may share a directory name; the path's hash keeps their envs apart.
        where = hashlib.sha256(str(package_dir.resolve()).encode()).hexdigest()[:8]
        name = f"{canonicalize_name(package_dir.name)}-{where}"
        path = self.root / f"{name}-{self.key(package_dir, missing)}"
        python = path / "bin" / "python"
        if (path / COMPLETE_MARKER).is_file():
            return PackageEnvironment(
                package_dir, path, python, tuple(missing), False, time.monotonic() - started
            )
        staging = path.with_name(f"{path.name}.building-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        what = ", ".join(missing) if missing else "nothing beyond the base layer"
        self.progress.started(package_dir.name, what)
        try:
            await self._run(
                package_dir, "venv", "--quiet", "--python", sys.executable, str(staging)
            )
            site = _site_packages(staging)
            # Read after the environment's own site-packages: its pins win over the base layer.
            (site / "_omni_base_layer.pth").write_text(
                f"import site; site.addsitedir({self.base_site!r})\n"
            )
            if missing:
                excludes = staging / "omni-base-layer.txt"
                named = {canonicalize_name(Requirement(r).name) for r in missing}
                excludes.write_text("\n".join(sorted(set(self.base) - named)) + "\n")
                install = (
                    "pip", "install", "--quiet",
                    "--python", str(staging / "bin" / "python"),
                    "--excludes", str(excludes),
                    *([] if self.source_builds else ["--no-build"]),
                    *missing,
                )  # fmt: skip
                async with self._lock:  # one resolver at a time keeps the 2-core machine usable
                    if self.source_builds and self.sandbox is not None:
                        await self._install_sandboxed(package_dir, staging, install)
                    else:
                        await self._run(package_dir, *install)
                conflicts = self.conflicts(site)
                if conflicts:
                    raise EnvironmentError_(
                        f"package {package_dir}: its environment would not work: "
                        + "; ".join(conflicts)
                        + ". Add the library, with a version that fits, to the package's own "
                        "dependencies to give it a copy of its own"
                    )
            (staging / COMPLETE_MARKER).write_text(json.dumps({"missing": missing}))
            staging.rename(path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            self.progress.finished(package_dir.name, time.monotonic() - started, ok=False)
            raise
        self._remove_older(name, keep=path)
        seconds = time.monotonic() - started
        self.progress.finished(package_dir.name, seconds, ok=True)
        return PackageEnvironment(package_dir, path, python, tuple(missing), True, seconds)

    async def _install_sandboxed(
        self, package_dir: Path, staging: Path, install: tuple[str, ...]
    ) -> None:
        """``uv pip install`` (and the build code it runs) in the sandbox, as the package's
        build user, with the node's network, a uv cache of its own and a cgroup: it can write
        the environment being built and nothing else."""
        assert self.sandbox is not None
        user = f"build:{package_dir}"
        uid = self.sandbox.user_ids.uid(user)
        self._builds += 1
        cache = staging.with_name(f"{staging.name}.cache")
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(mode=0o700)
        _chown_tree(staging, uid)  # made by root just now, in a directory only root can write
        cgroup = None
        if self.sandbox.cgroups is not None:
            with contextlib.suppress(CgroupError, OSError):
                cgroup = self.sandbox.cgroups.create(f"build-{self._builds}", BUILD_RESOURCES)
        try:
            launcher = self.sandbox.launcher(
                model=user,
                package=package_dir,
                environment=staging,
                memory_limit=BUILD_RESOURCES.memory if cgroup is not None else 0,
                network=True,
                cgroup=cgroup,
                writable=(staging, cache),
                cache=False,
            )
            env = build_environment(os.environ)
            env.update(HOME=str(cache), XDG_CACHE_HOME=str(cache), UV_CACHE_DIR=str(cache))
            await self._run(package_dir, *install, launcher=launcher, env=env)
        finally:
            if cgroup is not None:
                cgroup.kill()
                cgroup.remove()
            shutil.rmtree(cache, ignore_errors=True)
        # The build has ended with its sandbox (its pid namespace died with it): what it left
        # is checked and given back to root before the runtime reads a file of it.
        outside = _links_outside(staging)
        if outside:
            raise EnvironmentError_(
                f"package {package_dir}: its build left links out of its environment "
                f"({', '.join(outside[:3])}); it was not used"
            )
        _chown_tree(staging, 0)
        staging.chmod(0o755)  # the launcher gave it to the build user alone (0700)

    async def _run(
        self,
        package_dir: Path,
        *args: str,
        launcher: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        process = await asyncio.create_subprocess_exec(
            *(launcher or []), self.uv, *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env if env is not None else build_environment(os.environ),
            start_new_session=True,
        )  # fmt: skip
        output, _ = await process.communicate()
        if process.returncode != 0:
            text = output.decode(errors="replace").strip()
            hint = ""
            if not self.source_builds and "--no-build" in args:
                hint = (
                    ". Dependencies are installed from wheels only: publish a wheel, or set "
                    "[server] source_builds = true in the repository's omni.toml to let them "
                    "build from source (their build code then runs in the sandbox)"
                )
            raise EnvironmentError_(
                f"package {package_dir}: building its environment failed (uv {args[0]}): "
                f"{text}{hint}"
            )

    def _remove_older(self, name: str, keep: Path) -> None:
        for other in self.root.glob(f"{name}-*"):
            if other != keep and other.is_dir() and ".building-" not in other.name:
                shutil.rmtree(other, ignore_errors=True)


def _chown_tree(root: Path, uid: int) -> None:
    """Give a directory tree to ``uid``, never following a link in it."""
    os.chown(root, uid, uid, follow_symlinks=False)
    for top, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            os.chown(os.path.join(top, name), uid, uid, follow_symlinks=False)


def _links_outside(root: Path) -> list[str]:
    """Links in the tree that lead out of it (a venv's own python links to its base: allowed)."""
    allowed = [str(root.resolve()), sys.base_prefix, sys.prefix]
    found = []
    for top, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            path = os.path.join(top, name)
            if os.path.islink(path):
                target = os.path.realpath(path)
                if not any(target == a or target.startswith(a.rstrip("/") + "/") for a in allowed):
                    found.append(f"{path} -> {target}")
    return found


def build_environment(base: Mapping[str, str]) -> dict[str, str]:
    """What uv runs with: the workers' allow-list, uv's own settings, proxies and HOME (for
    uv's cache), never the runtime's tokens or cloud credentials."""
    env = {
        k: v
        for k, v in base.items()
        if k in ENV_ALLOWED
        or k.startswith((*ENV_ALLOWED_PREFIXES, "UV_"))
        or k.lower() in _PROXY_VARIABLES
        or k in ("HOME", "XDG_CACHE_HOME", "SSL_CERT_FILE", "SSL_CERT_DIR")
    }
    env.update(UV_NO_PROGRESS="1", VIRTUAL_ENV="")
    return env


_PROXY_VARIABLES = frozenset({"http_proxy", "https_proxy", "all_proxy", "no_proxy"})


def _site_packages(venv: Path) -> Path:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return venv / "lib" / version / "site-packages"


def _find_uv() -> str:
    try:
        import uv

        return str(uv.find_uv_bin())
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found is None:
            raise EnvironmentError_(
                "uv is not installed: `pip install uv`, or serve with --shared-env"
            ) from None
        return found
