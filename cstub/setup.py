"""Builds libomnicuda.so from src/ with the system C compiler as part of the package build."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = Path(__file__).resolve().parent
SOURCES = sorted((HERE / "src").glob("*.c"))
LIBRARY = "libomnicuda.so"
GLIBC_BASE_VERSION = {"x86_64": "GLIBC_2.2.5", "aarch64": "GLIBC_2.17"}

# dlsym is exported under the versions glibc gives it, so versioned references bind to the hook.
VERSION_SCRIPT = """\
{base} {{ global: dlsym; local: omni_dlsym_base; omni_dlsym_2_34; }};
GLIBC_2.34 {{ global: dlsym; }} {base};
"""


def compile_library(output: Path) -> None:
    machine = platform.machine()
    if machine not in GLIBC_BASE_VERSION:
        raise RuntimeError(f"libomnicuda supports x86_64 and aarch64 Linux, not {machine}")
    compiler = shlex.split(os.environ.get("CC", "cc"))
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "exports.map"
        script.write_text(VERSION_SCRIPT.format(base=GLIBC_BASE_VERSION[machine]))
        command = [
            *compiler,
            "-std=gnu11",
            "-O2",
            "-g",
            "-fPIC",
            "-shared",
            "-fvisibility=hidden",
            "-Wall",
            "-Wextra",
            "-pthread",
            f"-Wl,--version-script={script}",
            # Addresses the hooks take of their own exported functions stay inside this library.
            "-Wl,-Bsymbolic-functions",
            "-o",
            str(output),
            *map(str, SOURCES),
            "-ldl",
            "-lm",
        ]
        try:
            subprocess.run(command, check=True)
        except FileNotFoundError as exc:
            raise RuntimeError(
                f"building {LIBRARY} needs a C compiler; install gcc or set CC ({exc})"
            ) from exc


class BuildWithLibrary(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            compile_library(HERE / "omni_cstub" / LIBRARY)
        else:
            compile_library(Path(self.build_lib) / "omni_cstub" / LIBRARY)


class BinaryDistribution(Distribution):
    """The wheel carries a native library, so it is tagged for this platform."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_py": BuildWithLibrary}, distclass=BinaryDistribution)
